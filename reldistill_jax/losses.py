"""Distillation losses between 3D pair features K and 2D pair features Q.

Formulas: PROTOCOLS.md section 3. `k` and `q` are (N, D) features of the N
point-pixel pairs (rows are L2-normalised here), `mask` (N,) marks the valid
pairs: a masked-out row contributes to no sum and no count, on or off the
diagonal.

Every loss is computed from mergeable `(sum, count)` pairs (`*_terms`), so a
mean over patches, batches or devices is exact: add the pairs, then divide
(`means`). `sharded_losses.py` reuses the terms row block by row block.

Q comes from the frozen 2D teacher: it is a constant target in every loss
(no gradient flows into `q`), which also lets the relational kernels treat
Q Q^T as data.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Terms = dict[str, tuple[jax.Array, jax.Array]]
_EPS = 1e-12


def normalize(x: jax.Array) -> jax.Array:
  """L2-normalises rows in float32 (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS))


def prepare_pairs(k: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Normalised student features and the normalised, constant teacher target."""
  if k.shape != q.shape or k.ndim != 2:
    raise ValueError(f"k and q must both be (N, D); got {k.shape} and {q.shape}")
  return normalize(k), jax.lax.stop_gradient(normalize(q))


def _valid(mask: jax.Array | None, n: int) -> jax.Array:
  return jnp.ones((n,), bool) if mask is None else mask.astype(bool)


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, and 0 where count is 0 (no valid element)."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def means(terms: Mapping[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
  """Scalar means of (sum, count) terms."""
  return {name: safe_mean(total, count) for name, (total, count) in terms.items()}


# Contrastive (PPKT point InfoNCE, 3D anchors).


def contrastive_terms(
  k: jax.Array,
  q: jax.Array,
  row_mask: jax.Array,
  col_mask: jax.Array,
  row_offset: jax.Array | int = 0,
  temperature: float = 0.07,
) -> Terms:
  """InfoNCE (sum, count) of a block of anchor rows against all columns.

  Args:
    k: (R, D) normalised 3D features of the anchor rows.
    q: (N, D) normalised 2D features of every pair.
    row_mask: (R,) valid anchors.
    col_mask: (N,) valid candidates.
    row_offset: index of the first row in the full (N,) pair axis, so the
      positive of row r is column `row_offset + r`.
    temperature: softmax temperature.

  Returns:
    {"loss": (sum of -log p(positive) over valid rows, number of valid rows)}.
  """
  logits = (k @ q.T) / temperature  # (R, N)
  logits = jnp.where(col_mask[None, :], logits, -jnp.inf)
  positive = row_offset + jnp.arange(k.shape[0])
  log_norm = jax.nn.logsumexp(logits, axis=-1)
  pos_logit = jnp.take_along_axis(logits, positive[:, None], axis=-1)[:, 0]
  nll = jnp.where(row_mask, log_norm - pos_logit, 0.0)
  return {"loss": (nll.sum(), row_mask.sum().astype(jnp.float32))}


def contrastive_loss(
  k: jax.Array, q: jax.Array, mask: jax.Array | None = None, temperature: float = 0.07
) -> dict[str, jax.Array]:
  """PPKT point InfoNCE: -1/N sum_i log softmax_j(k_i.q_j / t)[i]."""
  k, q = prepare_pairs(k, q)
  valid = _valid(mask, k.shape[0])
  return means(contrastive_terms(k, q, valid, valid, 0, temperature))


# Superpixel contrastive (SLidR).


def superpixel_pool(
  k: jax.Array, q: jax.Array, superpixel: jax.Array, mask: jax.Array, num_superpixels: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums of k and q and pair counts per superpixel.

  Args:
    k: (N, D) normalised 3D pair features.
    q: (N, D) normalised 2D pair features.
    superpixel: (N,) int superpixel id of each pair's pixel, in
      [0, num_superpixels) (ids are unique across the cameras of a batch).
    mask: (N,) valid pairs.
    num_superpixels: S, the number of ids.

  Returns:
    (k_sum (S, D), q_sum (S, D), count (S,)); sums, so that partial pools of
    several devices add up exactly.
  """
  ids = jnp.where(mask, superpixel, num_superpixels)  # masked pairs -> a dropped segment
  pool = lambda x: jax.ops.segment_sum(x, ids, num_segments=num_superpixels)
  return pool(k), pool(q), pool(mask.astype(jnp.float32))


def superpixel_contrastive_from_pools(
  k_sum: jax.Array, q_sum: jax.Array, count: jax.Array, temperature: float = 0.07
) -> dict[str, jax.Array]:
  """InfoNCE over the mean-pooled superpixel features; empty superpixels dropped."""
  present = count > 0
  k_bar = normalize(k_sum / jnp.maximum(count, 1.0)[:, None])
  q_bar = jax.lax.stop_gradient(normalize(q_sum / jnp.maximum(count, 1.0)[:, None]))
  return means(contrastive_terms(k_bar, q_bar, present, present, 0, temperature))


def superpixel_contrastive_loss(
  k: jax.Array,
  q: jax.Array,
  superpixel: jax.Array,
  mask: jax.Array | None = None,
  num_superpixels: int | None = None,
  temperature: float = 0.07,
) -> dict[str, jax.Array]:
  """SLidR's superpixel InfoNCE.

  k and q are average-pooled over the pairs of each superpixel (SLidR pools q
  over every pixel of the superpixel; here the pixels are the paired ones, the
  ones whose features the batch carries), empty superpixels are dropped, and
  point InfoNCE runs over the pooled vectors with 3D anchors.

  Args:
    k: (N, D) 3D pair features.
    q: (N, D) 2D pair features (a constant target).
    superpixel: (N,) superpixel id of each pair, unique across the batch.
    mask: (N,) valid pairs, or None for all.
    num_superpixels: S, an upper bound of the ids (static); default N.
    temperature: softmax temperature.
  """
  k, q = prepare_pairs(k, q)
  valid = _valid(mask, k.shape[0])
  pools = superpixel_pool(k, q, superpixel, valid, num_superpixels or k.shape[0])
  return superpixel_contrastive_from_pools(*pools, temperature)


# Similarity (cosine, or ScaLR's L2 between unit vectors).


def similarity_terms(k: jax.Array, q: jax.Array, mask: jax.Array, variant: str = "cosine") -> Terms:
  """(sum, count) of the per-pair similarity loss over valid rows."""
  if variant == "cosine":
    per_pair = 1.0 - jnp.sum(k * q, axis=-1)
  elif variant == "l2":
    # sqrt of a clamped square: finite gradient where k == q.
    per_pair = jnp.sqrt(jnp.maximum(jnp.sum((k - q) ** 2, axis=-1), _EPS))
  else:
    raise ValueError(f"unknown similarity variant {variant!r} (choose 'cosine' or 'l2')")
  per_pair = jnp.where(mask, per_pair, 0.0)
  return {"loss": (per_pair.sum(), mask.sum().astype(jnp.float32))}


def similarity_loss(
  k: jax.Array, q: jax.Array, mask: jax.Array | None = None, variant: str = "cosine"
) -> dict[str, jax.Array]:
  """1/N sum_i (1 - k_i.q_i) (`cosine`) or 1/N sum_i ||k_i - q_i|| (`l2`)."""
  k, q = prepare_pairs(k, q)
  return means(similarity_terms(k, q, _valid(mask, k.shape[0]), variant))


# Relational (cross-modal + intra-modal).

# How an entry d of K Q^T - Q Q^T or K K^T - Q Q^T is penalised: |d| (the
# paper's) or d^2 (an ablation).
RELATIONAL_DISTANCES = ("l1", "squared")


def check_distance(distance: str) -> None:
  """Raises ValueError unless `distance` is one of `RELATIONAL_DISTANCES`."""
  if distance not in RELATIONAL_DISTANCES:
    raise ValueError(
      f"unknown relational distance {distance!r}; choose from {', '.join(RELATIONAL_DISTANCES)}"
    )


def relational_distance(d: jax.Array, distance: str) -> jax.Array:
  """|d| ("l1") or d^2 ("squared"), elementwise."""
  check_distance(distance)
  return jnp.abs(d) if distance == "l1" else jnp.square(d)


def relational_terms(
  k_rows: jax.Array,
  q_rows: jax.Array,
  k: jax.Array,
  q: jax.Array,
  row_mask: jax.Array,
  col_mask: jax.Array,
  row_offset: jax.Array | int = 0,
  distance: str = "l1",
) -> Terms:
  """Relational (sum, count) terms of a block of rows against all columns.

  Materialises an (R, N) block: use it for R small or N moderate; the blocked
  kernel in `sharded_losses.py` keeps memory O(N * D).

  Args:
    k_rows: (R, D) normalised 3D features of the block's rows.
    q_rows: (R, D) normalised 2D features of the block's rows.
    k: (N, D) normalised 3D features of every pair.
    q: (N, D) normalised 2D features of every pair.
    row_mask: (R,) valid rows.
    col_mask: (N,) valid columns.
    row_offset: index of the block's first row in the full pair axis.
    distance: "l1" penalises an entry d by |d|, "squared" by d^2
      (`RELATIONAL_DISTANCES`).

  Returns:
    With dist the chosen distance: `diag`: sum of C_ii = dist(k_i.q_i -
    q_i.q_i) over valid i, and their count; `cross_off`: sum of C_ij over
    valid i != j, count; `intra_off`: sum of dist(k_i.k_j - q_i.q_j) over
    valid i != j, count. The diagonal is always summed: `relational_means`
    decides whether it enters the loss.
  """
  qq = q_rows @ q.T  # (R, N), shared by both terms
  cross = relational_distance(k_rows @ q.T - qq, distance)
  intra = relational_distance(k_rows @ k.T - qq, distance)
  rows = row_offset + jnp.arange(k_rows.shape[0])
  on_diag = rows[:, None] == jnp.arange(k.shape[0])[None, :]
  pair = row_mask[:, None] & col_mask[None, :]
  off = pair & ~on_diag
  diag = jnp.where(pair & on_diag, cross, 0.0).sum()
  n_rows = row_mask.sum().astype(jnp.float32)
  n_off = off.sum().astype(jnp.float32)
  return {
    "diag": (diag, n_rows),
    "cross_off": (jnp.where(off, cross, 0.0).sum(), n_off),
    "intra_off": (jnp.where(off, intra, 0.0).sum(), n_off),
  }


def relational_means(
  terms: Mapping[str, tuple[jax.Array, jax.Array]],
  w_cross: float,
  w_intra: float,
  diagonal: bool = True,
) -> dict[str, jax.Array]:
  """The relational loss and its parts from merged (sum, count) terms.

  With `diagonal` False the cross-modal diagonal mean is left out of `cross`
  (hence of `loss` and its gradient); the off-diagonal means stay as they are.
  """
  parts = means(terms)
  cross = parts["cross_off"] + (parts["diag"] if diagonal else 0.0)
  intra = parts["intra_off"]
  return {"loss": w_cross * cross + w_intra * intra, "cross": cross, "intra": intra}


def relational_loss(
  k: jax.Array,
  q: jax.Array,
  mask: jax.Array | None = None,
  w_cross: float = 1.0,
  w_intra: float = 1.0,
  diagonal: bool = True,
  distance: str = "l1",
) -> dict[str, jax.Array]:
  """Relational loss: w_cross * L_cross + w_intra * L_intra.

  L_cross = 1/N sum_i C_ii + 1/(N^2 - N) sum_{i != j} C_ij with
  C = |K Q^T - Q Q^T|; L_intra = 1/(N^2 - N) sum_{i != j} |k_i.k_j - q_i.q_j|.
  Q Q^T is a constant target (the teacher is frozen). Materialises N x N.

  Two ablations: `diagonal=False` leaves the 1/N sum_i C_ii term out;
  `distance="squared"` replaces every |d| by d^2 (`relational_terms`).
  """
  check_distance(distance)
  k, q = prepare_pairs(k, q)
  valid = _valid(mask, k.shape[0])
  terms = relational_terms(k, q, k, q, valid, valid, 0, distance)
  return relational_means(terms, w_cross, w_intra, diagonal)
