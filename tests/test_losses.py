"""Losses against numpy restatements of PROTOCOLS.md section 3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax import losses

T = 0.07


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


# numpy restatements (float64), on the valid rows only.


def np_contrastive(k, q):
  k, q = _unit(k), _unit(q)
  logits = k @ q.T / T
  log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))[:, None]
  log_softmax -= logits.max(1, keepdims=True)
  return -np.mean(np.diag(log_softmax))


def np_similarity(k, q, variant):
  k, q = _unit(k), _unit(q)
  if variant == "cosine":
    return np.mean(1 - np.sum(k * q, 1))
  return np.mean(np.linalg.norm(k - q, axis=1))


def np_relational(k, q, w_cross=1.0, w_intra=1.0, diagonal=True, distance="l1"):
  k, q = _unit(k), _unit(q)
  n = len(k)
  off = ~np.eye(n, dtype=bool)
  dist = np.abs if distance == "l1" else np.square
  c = dist(k @ q.T - q @ q.T)
  cross = c[off].sum() / (n * n - n) + (np.mean(np.diag(c)) if diagonal else 0.0)
  intra = dist(k @ k.T - q @ q.T)[off].sum() / (n * n - n)
  return {"loss": w_cross * cross + w_intra * intra, "cross": cross, "intra": intra}


def np_superpixel(k, q, ids):
  """SLidR: mean-pool per superpixel, drop empty ones, InfoNCE over the pools."""
  present = np.unique(ids)
  k_bar = np.stack([_unit(k)[ids == s].mean(0) for s in present])
  q_bar = np.stack([_unit(q)[ids == s].mean(0) for s in present])
  return np_contrastive(k_bar, q_bar)


def numeric_grad(f, k, eps=1e-6):
  """Central differences of a float64 numpy function w.r.t. k."""
  grad = np.zeros_like(k)
  for idx in np.ndindex(*k.shape):
    hi, lo = k.copy(), k.copy()
    hi[idx] += eps
    lo[idx] -= eps
    grad[idx] = (f(hi) - f(lo)) / (2 * eps)
  return grad


def _data(n=7, d=5, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(n, d))


SUPERPIXELS = np.array([3, 0, 3, 5, 0, 1, 5])  # id 2 and 4 empty

CASES = {
  "superpixel": (
    lambda k, q, m: losses.superpixel_contrastive_loss(k, q, SUPERPIXELS, m, 6)["loss"],
    None,  # pooled ids depend on the mask: see np_superpixel in the test
  ),
  "contrastive": (lambda k, q, m: losses.contrastive_loss(k, q, m)["loss"], np_contrastive),
  "cosine": (
    lambda k, q, m: losses.similarity_loss(k, q, m, "cosine")["loss"],
    lambda k, q: np_similarity(k, q, "cosine"),
  ),
  "l2": (
    lambda k, q, m: losses.similarity_loss(k, q, m, "l2")["loss"],
    lambda k, q: np_similarity(k, q, "l2"),
  ),
  "relational": (
    lambda k, q, m: losses.relational_loss(k, q, m, 0.7, 1.3)["loss"],
    lambda k, q: np_relational(k, q, 0.7, 1.3)["loss"],
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_gradient_match_numpy(name, masked):
  jax_fn, np_fn = CASES[name]
  k, q = _data()
  mask = np.array([1, 1, 0, 1, 1, 0, 1], bool) if masked else np.ones(7, bool)
  if name == "superpixel":
    np_fn = lambda kk, qq: np_superpixel(kk, qq, SUPERPIXELS[mask])
  value, grad = jax.value_and_grad(jax_fn)(
    jnp.asarray(k, jnp.float32), jnp.asarray(q, jnp.float32), jnp.asarray(mask)
  )
  kv, qv = k[mask], q[mask]
  np.testing.assert_allclose(value, np_fn(kv, qv), rtol=1e-5)
  expected_grad = np.zeros_like(k)
  expected_grad[mask] = numeric_grad(lambda kk: np_fn(kk, qv), kv)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=2e-6)
  assert not np.any(np.asarray(grad)[~mask])  # masked rows get no gradient


def test_relational_parts_match_numpy():
  k, q = _data(9, 6, seed=3)
  out = losses.relational_loss(jnp.asarray(k), jnp.asarray(q))
  ref = np_relational(k, q)
  for part in ("loss", "cross", "intra"):
    np.testing.assert_allclose(out[part], ref[part], rtol=1e-5)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("distance", ["l1", "squared"])
def test_relational_options_match_numpy(diagonal, distance):
  """Both ablations, with masked rows: values of every part and the gradient."""
  k, q = _data(9, 6, seed=3)
  mask = np.array([1, 1, 0, 1, 1, 0, 1, 1, 0], bool)
  options = (0.7, 1.3, diagonal, distance)
  loss = lambda kk: losses.relational_loss(kk, jnp.asarray(q), jnp.asarray(mask), *options)
  out = loss(jnp.asarray(k, jnp.float32))
  ref = np_relational(k[mask], q[mask], *options)
  for part in ("loss", "cross", "intra"):
    np.testing.assert_allclose(out[part], ref[part], rtol=1e-5, err_msg=part)
  grad = jax.grad(lambda kk: loss(kk)["loss"])(jnp.asarray(k, jnp.float32))
  expected = np.zeros_like(k)
  expected[mask] = numeric_grad(lambda kk: np_relational(kk, q[mask], *options)["loss"], k[mask])
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=2e-6)
  assert not np.any(np.asarray(grad)[~mask])


def test_relational_options_change_the_numbers():
  """Each ablation changes the loss and its gradient, and only the parts it should."""
  k, q = (jnp.asarray(x, jnp.float32) for x in _data(9, 6, seed=3))
  loss = lambda kk, **kw: losses.relational_loss(kk, q, None, 0.7, 1.3, **kw)
  run = lambda **kw: loss(k, **kw)
  grad = lambda **kw: jax.grad(lambda kk: loss(kk, **kw)["loss"])(k)
  base, no_diag, squared = run(), run(diagonal=False), run(distance="squared")
  kn, qn = _unit(np.asarray(k)), _unit(np.asarray(q))
  diag_mean = np.mean(np.abs(np.sum(kn * qn, 1) - 1.0))  # q_i.q_i = 1
  assert diag_mean > 0.1
  np.testing.assert_allclose(no_diag["cross"], base["cross"] - diag_mean, rtol=1e-5)
  np.testing.assert_allclose(no_diag["intra"], base["intra"], rtol=1e-6)
  for part in ("loss", "cross", "intra"):
    assert not np.isclose(squared[part], base[part], rtol=0.05), part
  # Off the diagonal most |d| are well below 1: squaring lowers their mean.
  assert squared["intra"] < 0.9 * base["intra"]
  g_base = grad()
  for kw in ({"diagonal": False}, {"distance": "squared"}):
    assert np.abs(grad(**kw) - g_base).max() > 1e-2 * np.abs(g_base).max(), kw


def test_hand_checkable_cases():
  e1, e2 = np.eye(2)
  # k = (e1, e2), q = (e1, e1): QQ^T = 1, KQ^T = [[1, 1], [0, 0]], KK^T = I.
  out = losses.relational_loss(jnp.array([e1, e2]), jnp.array([e1, e1]))
  np.testing.assert_allclose([out["cross"], out["intra"], out["loss"]], [1.0, 1.0, 2.0], rtol=1e-6)
  # Matching orthonormal pairs: InfoNCE = log(1 + (N - 1) exp(-1 / t)).
  eye = jnp.eye(3)
  for t in (1.0, 0.25):
    np.testing.assert_allclose(
      losses.contrastive_loss(eye, eye, temperature=t)["loss"],
      np.log1p(2 * np.exp(-1 / t)),
      rtol=1e-5,
    )
  # Identical features: every similarity and relational term vanishes.
  x = jnp.asarray(_data()[0], jnp.float32)
  assert losses.similarity_loss(x, x)["loss"] == pytest.approx(0.0, abs=1e-6)
  assert losses.similarity_loss(x, x, variant="l2")["loss"] == pytest.approx(0.0, abs=1e-5)
  assert losses.relational_loss(x, x)["loss"] == pytest.approx(0.0, abs=1e-6)
  # Scale does not matter: inputs are normalised.
  k, q = _data()
  np.testing.assert_allclose(
    losses.relational_loss(jnp.asarray(3 * k), jnp.asarray(q))["loss"],
    np_relational(k, q)["loss"],
    rtol=1e-5,
  )


def test_masked_rows_are_ignored_entirely():
  """Garbage (even NaN) in masked rows changes nothing, forward or backward."""
  k, q = _data()
  mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
  k_bad, q_bad = k.copy(), q.copy()
  k_bad[~mask] = 1e6
  q_bad[~mask] = -3.0
  for name, (fn, _) in CASES.items():
    a = jax.value_and_grad(fn)(jnp.asarray(k), jnp.asarray(q), jnp.asarray(mask))
    b = jax.value_and_grad(fn)(jnp.asarray(k_bad), jnp.asarray(q_bad), jnp.asarray(mask))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(a[1][mask], b[1][mask], rtol=1e-5, atol=1e-7, err_msg=name)


def test_teacher_gets_no_gradient():
  k, q = _data()
  grad_q = jax.grad(lambda q: losses.relational_loss(jnp.asarray(k), q)["loss"])(jnp.asarray(q))
  assert not np.any(np.asarray(grad_q))


def test_empty_mask_and_single_pair_are_finite():
  k, q = _data()
  for mask in (np.zeros(7, bool), np.eye(7, dtype=bool)[2]):
    for name, (fn, _) in CASES.items():
      value, grad = jax.value_and_grad(fn)(jnp.asarray(k), jnp.asarray(q), jnp.asarray(mask))
      assert np.isfinite(value) and np.all(np.isfinite(grad)), name


def test_terms_merge_exactly_across_row_blocks():
  """Row-block (sum, count) pairs added up give the full-matrix means."""
  k, q = (losses.normalize(jnp.asarray(x)) for x in _data(10, 4, seed=5))
  mask = jnp.asarray(np.random.default_rng(1).random(10) > 0.3)
  full = losses.relational_terms(k, q, k, q, mask, mask, 0)
  blocks = [
    losses.relational_terms(k[i : i + 4], q[i : i + 4], k, q, mask[i : i + 4], mask, i)
    for i in (0, 4, 8)
  ]
  merged = jax.tree.map(lambda *xs: sum(xs), *blocks)
  for name in full:
    np.testing.assert_allclose(merged[name], full[name], rtol=1e-5)


def test_bad_shapes_and_variant():
  with pytest.raises(ValueError, match="k and q must both be"):
    losses.relational_loss(jnp.ones((4, 3)), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match="unknown similarity variant 'dot'"):
    losses.similarity_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), variant="dot")
  with pytest.raises(ValueError) as refused:
    losses.relational_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), distance="l2")
  assert str(refused.value) == "unknown relational distance 'l2'; choose from l1, squared"
