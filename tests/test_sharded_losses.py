"""Sharded and blocked losses equal the single-device ones (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_pairs as _data

from reldistill_jax import losses
from reldistill_jax import sharded_losses as sl


def _superpixels(n):
  """Superpixel ids shared by pairs on different devices, some ids empty."""
  return jnp.asarray(np.random.default_rng(n).integers(0, 37, n))


PAIRS = {
  "contrastive": (
    lambda k, q, m: losses.contrastive_loss(k, q, m, 0.1),
    lambda k, q, m, mesh: sl.contrastive_loss(k, q, m, 0.1, mesh=mesh),
  ),
  "similarity_cosine": (
    lambda k, q, m: losses.similarity_loss(k, q, m, "cosine"),
    lambda k, q, m, mesh: sl.similarity_loss(k, q, m, "cosine", mesh=mesh),
  ),
  "similarity_l2": (
    lambda k, q, m: losses.similarity_loss(k, q, m, "l2"),
    lambda k, q, m, mesh: sl.similarity_loss(k, q, m, "l2", mesh=mesh),
  ),
  "superpixel": (
    lambda k, q, m: losses.superpixel_contrastive_loss(k, q, _superpixels(len(k)), m, 40, 0.1),
    lambda k, q, m, mesh: sl.superpixel_contrastive_loss(
      k, q, _superpixels(len(k)), m, 40, 0.1, mesh=mesh
    ),
  ),
  "relational": (
    lambda k, q, m: losses.relational_loss(k, q, m, 0.6, 1.7),
    lambda k, q, m, mesh: sl.relational_loss(k, q, m, 0.6, 1.7, mesh=mesh, tile=8),
  ),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("n", [64, 101])  # 101: not divisible by the 8 devices
def test_sharded_equals_single_device(mesh, name, n):
  single, sharded = PAIRS[name]
  k, q, m = _data(n, 12, seed=n)
  ref = single(k, q, m)
  out = jax.jit(lambda k: sharded(k, q, m, mesh))(k)
  assert set(out) == set(ref)
  for part in ref:
    np.testing.assert_allclose(out[part], ref[part], rtol=1e-5, err_msg=part)
  g_ref = jax.grad(lambda k: single(k, q, m)["loss"])(k)
  g_out = jax.jit(jax.grad(lambda k: sharded(k, q, m, mesh)["loss"]))(k)
  assert g_out.shape == k.shape and g_out.dtype == k.dtype
  np.testing.assert_allclose(g_out, g_ref, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("tile", [8, 32, 512])
def test_blocked_relational_on_one_device(tile):
  k, q, m = _data(200, 20, seed=2)
  ref = losses.relational_loss(k, q, m)
  out = sl.relational_loss(k, q, m, mesh=None, tile=tile)
  for part in ref:
    np.testing.assert_allclose(out[part], ref[part], rtol=1e-5)
  g_ref = jax.grad(lambda k: losses.relational_loss(k, q, m)["loss"])(k)
  g_out = jax.grad(lambda k: sl.relational_loss(k, q, m, mesh=None, tile=tile)["loss"])(k)
  np.testing.assert_allclose(g_out, g_ref, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("distance", ["l1", "squared"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh"])
def test_relational_options_equal_single_device(mesh, diagonal, distance, sharded):
  """Both ablations through the blocked XLA kernel, N = 101 (rows padded and masked)."""
  k, q, m = _data(101, 12, seed=6)
  options = (0.6, 1.7, diagonal, distance)
  single = lambda k: losses.relational_loss(k, q, m, *options)
  blocked = lambda k: sl.relational_loss(
    k, q, m, *options, mesh=mesh if sharded else None, tile=8, implementation="xla"
  )
  ref, out = single(k), jax.jit(blocked)(k)
  for part in ref:
    np.testing.assert_allclose(out[part], ref[part], rtol=1e-5, err_msg=part)
  g_ref = jax.grad(lambda k: single(k)["loss"])(k)
  g_out = jax.jit(jax.grad(lambda k: blocked(k)["loss"]))(k)
  np.testing.assert_allclose(g_out, g_ref, rtol=1e-4, atol=1e-8)
  if (diagonal, distance) != (True, "l1"):  # the options reach the kernel
    default = losses.relational_loss(k, q, m, 0.6, 1.7)
    assert not np.isclose(out["loss"], default["loss"], rtol=1e-2)
    g_default = jax.grad(lambda k: losses.relational_loss(k, q, m, 0.6, 1.7)["loss"])(k)
    assert np.abs(g_out - g_default).max() > 1e-2 * np.abs(g_default).max()


def test_bad_distance_is_refused():
  k, q, m = _data(16, 4)
  with pytest.raises(ValueError, match="unknown relational distance 'l3'; choose from l1, squared"):
    sl.relational_loss(k, q, m, distance="l3", mesh=None)


def test_blocked_relational_bf16_is_close(mesh):
  k, q, m = _data(256, 64, seed=4)
  ref = losses.relational_loss(k, q, m)["loss"]
  out = sl.relational_loss(k.astype(jnp.bfloat16), q.astype(jnp.bfloat16), m, mesh=mesh)["loss"]
  np.testing.assert_allclose(out, ref, rtol=2e-2)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_no_gradient_reaches_the_teacher(mesh, name):
  sharded = PAIRS[name][1]
  k, q, m = _data(40, 8)
  grad_q = jax.grad(lambda q: sharded(k, q, m, mesh)["loss"])(q)
  assert not np.any(np.asarray(grad_q))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_fully_masked_and_single_pair_are_finite(mesh, name):
  sharded = PAIRS[name][1]
  k, q, _ = _data(24, 8)
  masks = jnp.stack([jnp.zeros(24, bool), jnp.arange(24) == 5])
  fn = jax.vmap(jax.value_and_grad(lambda k, mask: sharded(k, q, mask, mesh)["loss"]), (None, 0))
  values, grads = jax.jit(fn)(k, masks)
  assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))


@pytest.mark.slow
def test_blocked_relational_large_n_bounded_memory():
  """N = 16384, D = 512 on the CPU: equal to the naive loss, O(N * D) memory."""
  n, d = 16384, 512
  k, q, _ = _data(n, d, seed=7, valid=1.0)
  blocked = jax.jit(jax.value_and_grad(lambda k: sl.relational_loss(k, q, mesh=None)["loss"]))
  naive = jax.jit(jax.value_and_grad(lambda k: losses.relational_loss(k, q)["loss"]))
  compiled_blocked, compiled_naive = blocked.lower(k).compile(), naive.lower(k).compile()
  # Scratch memory: the naive loss holds several N x N float32 matrices (1 GiB
  # each); the blocked kernel a few tiles and O(N * D) gradients.
  blocked_bytes = compiled_blocked.memory_analysis().temp_size_in_bytes
  assert blocked_bytes < 8 * n * d * 4, blocked_bytes
  assert compiled_naive.memory_analysis().temp_size_in_bytes > 4 * n * n * 4
  value, grad = compiled_blocked(k)
  ref_value, ref_grad = compiled_naive(k)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-10)
