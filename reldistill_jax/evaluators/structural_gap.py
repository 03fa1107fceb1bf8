"""The structural gap between the 2D and 3D representations, and its study.

PROTOCOLS.md section 4: on held-out pairs with L2-normalised features k_i (3D)
and q_i (2D), G = 1/(N^2 - N) sum_{i != j} |k_i.k_j - q_i.q_j|, which is the
intra-modal part of the relational loss; `structural_gap` reuses that kernel
(`sharded_losses.relational_loss`, blocked, O(N * D) memory), so N can be
every held-out pair. Linear CKA (Kornblith et al. 2019) between K and Q is the
second view. `gap_study` checks the paper's claim across trained models: G
should correlate negatively with zero-shot and few-shot mIoU.
"""

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from scipy import stats

from reldistill_jax import losses, sharded_losses

MIN_RUNS = 3


@functools.partial(jax.jit, static_argnames=("mesh",))
def _gap(k, q, mask, mesh):
  parts = sharded_losses.relational_loss(k, q, mask, w_cross=0.0, w_intra=1.0, mesh=mesh)
  return parts["intra"]


def structural_gap(k, q, mask=None, *, mesh: Mesh | None = None) -> float:
  """G, the mean |k_i.k_j - q_i.q_j| over ordered pairs i != j of valid rows.

  Args:
    k: (N, D) 3D features of the held-out pairs (any scale: rows are
      normalised).
    q: (N, D) 2D teacher features of the same pairs.
    mask: (N,) valid pairs, or None for all.
    mesh: a mesh with a `data` axis to shard the rows over, or None for one
      device.

  Returns:
    G in [0, 2]; 0 when fewer than two pairs are valid.
  """
  mask = None if mask is None else jnp.asarray(mask, bool)
  return float(_gap(jnp.asarray(k), jnp.asarray(q), mask, mesh))


@jax.jit
def _cka(k, q, mask):
  weight = mask.astype(jnp.float32)[:, None]  # (N, 1)
  n = jnp.maximum(weight.sum(), 1.0)

  def centre(x):  # masked rows become 0; the 1/sqrt(n) scale keeps sums O(1)
    x = x.astype(jnp.float32)
    return (x - (x * weight).sum(0) / n) * weight / jnp.sqrt(n)

  k, q = centre(k), centre(q)
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  cross = jnp.sum(dot(k.T, q) ** 2)  # ||K^T Q||_F^2, (Dk, Dq) products only
  return cross / (jnp.linalg.norm(dot(k.T, k)) * jnp.linalg.norm(dot(q.T, q)))


def linear_cka(k, q, mask=None, normalize_rows: bool = True) -> float:
  """Centred linear CKA between K and Q, from D x D products only.

  CKA = ||K^T Q||_F^2 / (||K^T K||_F ||Q^T Q||_F) with K and Q centred over
  the valid rows; this equals HSIC(K K^T, Q Q^T) / sqrt(HSIC(K K^T, K K^T)
  HSIC(Q Q^T, Q Q^T)) without forming the N x N Gram matrices. It is
  invariant to orthogonal transforms and isotropic scaling of either input.

  Args:
    k: (N, Dk) 3D features.
    q: (N, Dq) 2D features.
    mask: (N,) valid rows, or None for all.
    normalize_rows: L2-normalise rows first, as G does, so both compare the
      cosine-similarity structure; False gives plain CKA of the raw features.

  Returns:
    CKA in [0, 1] (1 for identical inputs); NaN when an input is constant.
  """
  k, q = jnp.asarray(k), jnp.asarray(q)
  if k.ndim != 2 or q.ndim != 2 or k.shape[0] != q.shape[0]:
    raise ValueError(f"k (N, Dk) and q (N, Dq) expected; got {k.shape} and {q.shape}")
  if normalize_rows:
    k, q = losses.normalize(k), losses.normalize(q)
  mask = jnp.ones(k.shape[:1], bool) if mask is None else jnp.asarray(mask, bool)
  return float(_cka(k, q, mask))


def _finite(value) -> bool:
  return value is not None and math.isfinite(float(value))


def _correlate(x: np.ndarray, y: np.ndarray, x_key: str, y_key: str) -> dict:
  nan = float("nan")
  out = {"pearson_r": nan, "pearson_p": nan, "spearman_rho": nan, "spearman_p": nan}
  if len(x) < MIN_RUNS:
    note = f"{len(x)} run(s) with both {x_key} and {y_key}: a correlation needs at least {MIN_RUNS}"
    return out | {"note": note}
  for key, values in ((x_key, x), (y_key, y)):
    if np.ptp(values) == 0:
      return out | {"note": f"{key} is the same in every run: no correlation is defined"}
  pearson = stats.pearsonr(x, y)
  spearman = stats.spearmanr(x, y)
  return {
    "pearson_r": float(pearson.statistic),
    "pearson_p": float(pearson.pvalue),
    "spearman_rho": float(spearman.statistic),
    "spearman_p": float(spearman.pvalue),
    "note": None,
  }


def gap_study(rows: Sequence[Mapping], x: str = "G") -> dict[str, dict]:
  """Correlations of the gap with every mIoU measured across runs.

  Args:
    rows: one dict per trained model, e.g. {"name": "relational-seed0",
      "G": 0.21, "zeroshot_miou": 0.35, "fewshot_miou": 0.41}. Every key
      ending in "miou" is a target; missing, None and NaN values leave the
      run out of that target's study.
    x: the key correlated with the targets ("G", or e.g. "cka").

  Returns:
    {target: {"x": x, "n": runs used, "names": their names, "pearson_r",
     "pearson_p", "spearman_rho", "spearman_p", "note"}} in the order the
    targets first appear. The coefficients are NaN, and `note` says why, when
    fewer than 3 runs remain or a variable is constant; otherwise `note` is
    None.
  """
  targets = list(dict.fromkeys(key for row in rows for key in row if key.endswith("miou")))
  study = {}
  for target in targets:
    used = [(i, r) for i, r in enumerate(rows) if _finite(r.get(x)) and _finite(r.get(target))]
    xs = np.array([r[x] for _, r in used], np.float64)
    ys = np.array([r[target] for _, r in used], np.float64)
    study[target] = {
      "x": x,
      "n": len(used),
      "names": [str(r.get("name", f"run {i}")) for i, r in used],
    } | _correlate(xs, ys, x, target)
  return study
