"""The losses of `losses.py` over a device mesh, with O(N * D) memory.

Pair features are sharded on the mesh's data axis. Inside `jax.shard_map`
each device gathers the (N, D) features (small) and builds only its own row
block of the N x N matrices, then the (sum, count) terms are reduced with
`psum`: values equal the single-device ones, for any N (rows are padded to a
multiple of the device count and masked).

The relational loss never materialises its N x N matrices, on any backend:
`blocked_relational` loops over (row tile, column tile) blocks and, since
training always needs both, produces the gradient in the same pass as the
value (a `jax.custom_vjp` whose backward only scales the stored gradient). The
math gives that for free: with f the derivative of the distance (sign(d) for
"l1" |d|, 2 d for "squared" d^2), s_ij = f(k_i.q_j - q_i.q_j) and
t_ij = f(k_i.k_j - q_i.q_j) (t symmetric, as K K^T and Q Q^T are),

  dL/dk_i = w_cross/N s_ii q_i + w_cross/(N^2 - N) sum_{j != i} s_ij q_j
            + 2 w_intra/(N^2 - N) sum_{j != i} t_ij k_j,

so a device computes the complete gradient of its own rows from its row block
alone, and Q Q^T is computed once per block for both terms (with
`diagonal=False` the first term, and the diagonal in `cross`, are left out).
Only `loss` is differentiable; `cross` and `intra` are reported for
monitoring.

Which kernel computes a device's row block is chosen by `implementation`:

  "xla"            `_relational_block_scan`, a `lax.scan` over blocks that XLA
                   compiles for any backend;
  "pallas_gpu"     the fused Pallas Triton kernel of `pallas_relational.py`;
  "pallas_tpu"     the fused Pallas Mosaic TPU kernel of `pallas_relational.py`;
  "interpret_gpu", "interpret_tpu"
                   those two kernels in Pallas interpret mode (any backend,
                   slow: for tests);
  "auto"           (default) from the platform of the mesh's devices, or of
                   `jax.default_backend()` without a mesh: "pallas_gpu" on GPU,
                   "pallas_tpu" on TPU, "xla" anywhere else (the CPU).

All of them return the same sums and gradient up to rounding (float32
accumulation everywhere). Rows are padded with masked pairs to the chosen
kernel's tile multiples.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from reldistill_jax import losses, pallas_relational

DEFAULT_TILE = 512
IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu", "pallas_tpu", "interpret_gpu", "interpret_tpu")
_AUTO = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  pad = (-x.shape[0]) % multiple
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def _prepare(k, q, mask, multiple):
  """Normalise, make q a constant target, and pad rows to `multiple`."""
  k, q = losses.prepare_pairs(k, q)
  mask = jnp.ones(k.shape[:1], bool) if mask is None else mask.astype(bool)
  return _pad_rows(k, multiple), _pad_rows(q, multiple), _pad_rows(mask, multiple)


def _shard_rows(fn, mesh: Mesh | None, axis_name: str, n_out_replicated: int, n_out_rows: int):
  """Runs fn(k_rows, q_rows, mask_rows, k_all, q_all, mask_all, row_offset).

  Without a mesh the rows are all rows. With one, rows are this device's
  block of the data axis, and the replicated outputs are psum-reduced.
  """
  if mesh is None:
    return lambda k, q, m: fn(k, q, m, k, q, m, 0)

  def local(k, q, m):
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * k.shape[0]
    outs = fn(k, q, m, gather(k), gather(q), gather(m), offset)
    reduced = jax.tree.map(lambda x: jax.lax.psum(x, axis_name), outs[:n_out_replicated])
    return (*reduced, *outs[n_out_replicated:])

  spec = P(axis_name)
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(spec, spec, spec),
    out_specs=(P(),) * n_out_replicated + (spec,) * n_out_rows,
    check_vma=False,
  )


def _num_rows_multiple(mesh: Mesh | None, axis_name: str) -> int:
  return mesh.shape[axis_name] if mesh is not None else 1


def contrastive_loss(
  k, q, mask=None, temperature: float = 0.07, *, mesh: Mesh | None, axis_name: str = "data"
) -> dict[str, jax.Array]:
  """`losses.contrastive_loss`, one (rows, N) logit block per device."""
  k, q, mask = _prepare(k, q, mask, _num_rows_multiple(mesh, axis_name))

  def rows(k_r, q_r, m_r, k_all, q_all, m_all, offset):
    del q_r, k_all
    return (losses.contrastive_terms(k_r, q_all, m_r, m_all, offset, temperature),)

  (terms,) = _shard_rows(rows, mesh, axis_name, 1, 0)(k, q, mask)
  return losses.means(terms)


def superpixel_contrastive_loss(
  k,
  q,
  superpixel,
  mask=None,
  num_superpixels: int | None = None,
  temperature: float = 0.07,
  *,
  mesh: Mesh | None,
  axis_name: str = "data",
) -> dict[str, jax.Array]:
  """`losses.superpixel_contrastive_loss`: pools reduced with psum, anchors row-sharded."""
  devices = _num_rows_multiple(mesh, axis_name)
  num = num_superpixels or k.shape[0]
  num += (-num) % devices  # whole row blocks of pooled anchors per device
  superpixel = _pad_rows(superpixel.astype(jnp.int32), devices)
  k, q, mask = _prepare(k, q, mask, devices)
  if mesh is None:
    return losses.superpixel_contrastive_loss(k, q, superpixel, mask, num, temperature)

  def local(k, q, ids, m):
    pools = jax.lax.psum(losses.superpixel_pool(k, q, ids, m, num), axis_name)
    k_sum, q_sum, count = pools
    rows = num // devices
    start = jax.lax.axis_index(axis_name) * rows
    present = count > 0
    k_bar = losses.normalize(k_sum / jnp.maximum(count, 1.0)[:, None])
    q_bar = jax.lax.stop_gradient(losses.normalize(q_sum / jnp.maximum(count, 1.0)[:, None]))
    k_rows = jax.lax.dynamic_slice_in_dim(k_bar, start, rows)
    present_rows = jax.lax.dynamic_slice_in_dim(present, start, rows)
    terms = losses.contrastive_terms(k_rows, q_bar, present_rows, present, start, temperature)
    return jax.lax.psum(terms, axis_name)

  spec = P(axis_name)
  terms = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=P(), check_vma=False)(
    k, q, superpixel, mask
  )
  return losses.means(terms)


def similarity_loss(
  k, q, mask=None, variant: str = "cosine", *, mesh: Mesh | None, axis_name: str = "data"
) -> dict[str, jax.Array]:
  """`losses.similarity_loss` with per-device partial sums."""
  k, q, mask = _prepare(k, q, mask, _num_rows_multiple(mesh, axis_name))

  def rows(k_r, q_r, m_r, *_):
    return (losses.similarity_terms(k_r, q_r, m_r, variant),)

  (terms,) = _shard_rows(rows, mesh, axis_name, 1, 0)(k, q, mask)
  return losses.means(terms)


# The blocked relational kernel.


def _relational_block_scan(
  k_rows, q_rows, m_rows, k_all, q_all, m_all, offset, coef, tile_rows, tile_cols, *, squared=False
):
  """Sums and row gradients of a row block, one (tile_rows, tile_cols) block at a time.

  The contract every row-block kernel shares (`pallas_relational.py` too).

  Args:
    k_rows, q_rows: (R, D) normalised features of the rows (R % tile_rows == 0).
    m_rows: (R,) valid rows.
    k_all, q_all: (N, D) normalised features of every pair (N % tile_cols == 0).
    m_all: (N,) valid pairs.
    offset: index of the first row in the full pair axis.
    coef: (a, b, c) weights of the gradient: a for the diagonal, b for the
      cross-modal off-diagonal, c for the intra-modal off-diagonal.
    tile_rows, tile_cols: block sizes.
    squared: (static) penalise an entry d by d^2 (gradient factor 2 d) rather
      than |d| (factor sign(d)).

  Returns:
    (diag_sum, cross_off_sum, intra_off_sum, grad_rows (R, D) float32).
  """
  r, d = k_rows.shape
  n = k_all.shape[0]
  a, b, c = coef
  dot = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  dist, factor = (jnp.square, lambda x: 2.0 * x) if squared else (jnp.abs, jnp.sign)
  # Weighted signs are cast to the input dtype for the gradient products; 2 d
  # is not exact in bf16, so with "squared" those products run in float32.
  grad_dtype = jnp.float32 if squared else k_all.dtype
  k_cols = k_all.reshape(n // tile_cols, tile_cols, d)
  q_cols = q_all.reshape(n // tile_cols, tile_cols, d)
  m_cols = m_all.reshape(n // tile_cols, tile_cols)
  col_ids = jnp.arange(n).reshape(n // tile_cols, tile_cols)

  def row_tile(_, xs):
    k_r, q_r, m_r, row_ids = xs  # (Tr, D), (Tr, D), (Tr,), (Tr,)

    def col_tile(carry, ys):
      sums, grad = carry
      k_c, q_c, m_c, ids = ys
      qq = dot(q_r, q_c.T)  # (Tr, Tc), shared by both terms
      dc = dot(k_r, q_c.T) - qq
      di = dot(k_r, k_c.T) - qq
      valid = m_r[:, None] & m_c[None, :]
      on_diag = row_ids[:, None] == ids[None, :]
      off = valid & ~on_diag
      on = valid & on_diag
      sums = sums + jnp.stack(
        [
          jnp.where(on, dist(dc), 0.0).sum(),
          jnp.where(off, dist(dc), 0.0).sum(),
          jnp.where(off, dist(di), 0.0).sum(),
        ]
      )
      w_c = jnp.where(on, a, jnp.where(off, b, 0.0)) * factor(dc)
      w_i = jnp.where(off, c * factor(di), 0.0)
      cast = lambda x: x.astype(grad_dtype)
      grad = grad + dot(cast(w_c), cast(q_c)) + dot(cast(w_i), cast(k_c))
      return (sums, grad), None

    init = (jnp.zeros(3, jnp.float32), jnp.zeros((tile_rows, d), jnp.float32))
    (sums, grad), _ = jax.lax.scan(col_tile, init, (k_cols, q_cols, m_cols, col_ids))
    return None, (sums, grad)

  row_ids = (offset + jnp.arange(r)).reshape(r // tile_rows, tile_rows)
  xs = (
    k_rows.reshape(r // tile_rows, tile_rows, d),
    q_rows.reshape(r // tile_rows, tile_rows, d),
    m_rows.reshape(r // tile_rows, tile_rows),
    row_ids,
  )
  _, (sums, grads) = jax.lax.scan(row_tile, None, xs)
  sums = sums.sum(0)
  return sums[0], sums[1], sums[2], grads.reshape(r, d)


def resolve_implementation(implementation: str, mesh: Mesh | None = None) -> str:
  """The relational kernel `implementation` names, with "auto" made concrete.

  Args:
    implementation: one of `IMPLEMENTATIONS`.
    mesh: the mesh the loss runs on; its devices' platform decides "auto".
      Without one, `jax.default_backend()` does.

  Returns:
    "xla", "pallas_gpu", "pallas_tpu", "interpret_gpu" or "interpret_tpu".
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return _AUTO.get(platform, "xla")


def _row_block_kernel(implementation: str):
  """The `_relational_block_scan`-contract function of a resolved implementation."""
  if implementation == "xla":
    return _relational_block_scan
  kernel = (
    pallas_relational.relational_block_gpu
    if implementation.endswith("gpu")
    else pallas_relational.relational_block_tpu
  )
  return functools.partial(kernel, interpret=implementation.startswith("interpret"))


def _requested_tiles(implementation: str, tile, dim: int) -> tuple[int, int]:
  """`tile` (an int, a (rows, columns) pair or None) as (rows, columns)."""
  if isinstance(tile, int):
    return tile, tile
  if tile is not None:
    return tuple(tile)
  if implementation == "xla":
    return DEFAULT_TILE, DEFAULT_TILE
  if implementation.endswith("gpu"):
    return pallas_relational.default_gpu_tiles(dim)
  return pallas_relational.TPU_TILES


def _fitted_tiles(implementation: str, tile, rows: int, pairs: int, dim: int) -> tuple[int, int]:
  """The requested tiles shrunk to a device's R rows and the N pairs."""
  tile_rows, tile_cols = _requested_tiles(implementation, tile, dim)
  if implementation == "xla":
    # Square tiles, a power of two >= 8 covering R (or the requested size).
    size = min(tile_rows, max(8, 1 << (rows - 1).bit_length()))
    return size, size
  if implementation.endswith("gpu"):
    return pallas_relational.gpu_tiles(rows, pairs, (tile_rows, tile_cols))
  return pallas_relational.tpu_tiles(rows, pairs, (tile_rows, tile_cols))


def blocked_relational(
  k: jax.Array,
  q: jax.Array,
  mask: jax.Array,
  w_cross: float,
  w_intra: float,
  diagonal: bool = True,
  distance: str = "l1",
  *,
  mesh: Mesh | None,
  axis_name: str = "data",
  tile: int | tuple[int, int] | None = None,
  compute_dtype=None,
  implementation: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Relational (loss, cross, intra) on normalised, padded inputs; O(N * D) memory.

  Args:
    k: (N, D) normalised student features, N a multiple of the device
      count, and for "xla" of devices * tile (the Pallas kernels pad their
      blocks themselves).
    q: (N, D) normalised teacher features (constant).
    mask: (N,) valid pairs.
    w_cross: weight of the cross-modal term.
    w_intra: weight of the intra-modal term.
    diagonal: include the cross-modal diagonal mean in `cross` and `loss`
      (False: its gradient weight a is 0 too).
    distance: "l1" or "squared" (`losses.RELATIONAL_DISTANCES`).
    mesh: device mesh to shard rows over, or None for one device.
    axis_name: the mesh axis holding the pairs.
    tile: row and column block size (an int for both, or (rows, columns));
      None for the implementation's default (`DEFAULT_TILE` for "xla",
      `pallas_relational.default_gpu_tiles(D)` / `TPU_TILES` for the kernels).
    compute_dtype: dtype of the matrix products (float32 accumulation);
      defaults to k's dtype.
    implementation: which row-block kernel runs (module docstring).

  Returns:
    (loss, cross, intra) scalars; only `loss` carries a gradient (w.r.t. k).
  """
  losses.check_distance(distance)
  compute_dtype = compute_dtype or k.dtype
  implementation = resolve_implementation(implementation, mesh)
  block_kernel = functools.partial(_row_block_kernel(implementation), squared=distance == "squared")
  tile_rows, tile_cols = _requested_tiles(implementation, tile, k.shape[1])

  def sums_and_grad(k, q, mask):
    n = mask.sum().astype(jnp.float32)
    pairs = n * n - n
    inv = lambda x: jnp.where(x > 0, 1.0 / jnp.maximum(x, 1.0), 0.0)
    a = w_cross * inv(n) if diagonal else 0.0  # no diagonal: no gradient from it either
    coef = (a, w_cross * inv(pairs), 2.0 * w_intra * inv(pairs))

    def rows(k_r, q_r, m_r, k_all, q_all, m_all, offset):
      k_r, q_r, k_all, q_all = (x.astype(compute_dtype) for x in (k_r, q_r, k_all, q_all))
      return block_kernel(k_r, q_r, m_r, k_all, q_all, m_all, offset, coef, tile_rows, tile_cols)

    diag, cross_off, intra_off, grad = _shard_rows(rows, mesh, axis_name, 3, 1)(k, q, mask)
    cross = cross_off * inv(pairs) + (diag * inv(n) if diagonal else 0.0)
    intra = intra_off * inv(pairs)
    return (w_cross * cross + w_intra * intra, cross, intra), grad

  @jax.custom_vjp
  def kernel(k, q, mask):
    return sums_and_grad(k, q, mask)[0]

  def fwd(k, q, mask):
    out, grad = sums_and_grad(k, q, mask)
    return out, (grad.astype(k.dtype), q, mask)

  def bwd(res, cotangents):
    grad, q, mask = res
    g_loss = cotangents[0]
    return (g_loss * grad, jnp.zeros_like(q), None)

  kernel.defvjp(fwd, bwd)
  return kernel(k, q, mask)


def relational_loss(
  k: jax.Array,
  q: jax.Array,
  mask: jax.Array | None = None,
  w_cross: float = 1.0,
  w_intra: float = 1.0,
  diagonal: bool = True,
  distance: str = "l1",
  *,
  mesh: Mesh | None,
  axis_name: str = "data",
  tile: int | tuple[int, int] | None = None,
  implementation: str = "auto",
) -> dict[str, jax.Array]:
  """`losses.relational_loss` over a mesh with the blocked O(N * D) kernel.

  Args:
    k: (N, D) student pair features (any scale: rows are normalised).
    q: (N, D) teacher pair features (a constant target).
    mask: (N,) valid pairs, or None for all.
    w_cross: weight of the cross-modal term.
    w_intra: weight of the intra-modal term.
    diagonal: include the cross-modal diagonal term (`losses.relational_loss`).
    distance: "l1" (|d|) or "squared" (d^2), `losses.RELATIONAL_DISTANCES`.
    mesh: mesh whose `axis_name` axis shards the pairs; None for one device.
    axis_name: that axis.
    tile: block size (an int, or (rows, columns) for the Pallas kernels), or
      None for the implementation's default; shrunk for small N so padding
      stays small.
    implementation: which row-block kernel runs (module docstring).

  Returns:
    {"loss", "cross", "intra"} scalar means.
  """
  losses.check_distance(distance)
  implementation = resolve_implementation(implementation, mesh)
  devices = mesh.shape[axis_name] if mesh is not None else 1
  per_device = -(-k.shape[0] // devices)
  tile_rows, tile_cols = _fitted_tiles(implementation, tile, per_device, *k.shape)
  # Rows: a whole number of row tiles per device; columns: of column tiles.
  k, q, mask = _prepare(k, q, mask, math.lcm(devices * tile_rows, tile_cols))
  loss, cross, intra = blocked_relational(
    k,
    q,
    mask,
    w_cross,
    w_intra,
    diagonal,
    distance,
    mesh=mesh,
    axis_name=axis_name,
    tile=(tile_rows, tile_cols),
    implementation=implementation,
  )
  return {"loss": loss, "cross": cross, "intra": intra}
