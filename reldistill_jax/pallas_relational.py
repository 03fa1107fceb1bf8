"""Pallas kernels for the blocked relational loss (GPU Triton and TPU Mosaic).

Both kernels have the contract of `sharded_losses._relational_block_scan`:
given a block of R rows and all N pairs they return the diagonal sum, the
cross-modal and intra-modal off-diagonal sums and the float32 gradient of the
rows, (diag_sum, cross_off_sum, intra_off_sum, grad_rows (R, D)), and they
never materialise more than one (row tile, column tile) block of the N x N
matrices. The static `squared` selects the distance of an entry d: |d| with
gradient factor sign(d) (False, the paper's), or d^2 with factor 2 d (True).

Shared design:

- Masked pairs are zeroed before the kernel (and padding rows are zero): every
  product k.q, q.q, k.k involving such a row is then exactly 0, so its |.| and
  its sign are exactly 0 and it adds to no sum and no gradient. The kernels
  need no mask, only the global ids of rows and columns to leave out the
  diagonal i == j.
- The diagonal C_ii = |k_i.q_i - q_i.q_i| (or its square) and its gradient
  term a sign(.) q_i (or a 2 (.) q_i; a = 0 without the diagonal term) are
  O(R * D) and computed outside the kernels, so inside them
  every off-diagonal pair has the same weights (b cross-modal, c intra-modal).
- Per block, Q_r Q_c^T is computed once and shared by both terms; the sign
  matrices are exactly -1, 0 or 1 in bf16, so the two gradient products
  S @ Q_c and T @ K_c run in the input dtype, accumulate in float32, and the
  weights are applied in float32 afterwards. With `squared` the factor
  matrices 2 d are not exact in bf16: they stay float32 and Q_c, K_c are
  cast to float32 for those two products (full-precision float32 products,
  slower than bf16 ones; the l1 path is unchanged).
- Each kernel writes partial sums per row tile; they are added outside.

GPU (Triton lowering): one program per row tile (grid (R / Tr,)); the row
tile and its accumulators (per-row sums, the (Tr, D) gradient) are loop
carries while a `fori_loop` inside the kernel walks the column tiles of K and
Q, which are passed whole but only ever read one (Tc, D) slice at a time (a
Triton block may hold at most 2^20 elements). Triton needs power-of-two
shapes, so D is zero-padded to one. Float32 inputs use full-precision
(IEEE, not TF32) products.

TPU (Mosaic): the column loop is the minor grid axis, marked "arbitrary"
(grid (R / Tr, N / Tc)), so Pallas double-buffers the HBM -> VMEM copies of
the column tiles while the row tile's accumulators stay resident in VMEM (the
output blocks do not move along that axis): the Mosaic way of looping over
column tiles inside one row tile's program without holding an (N, D) operand
in VMEM. Blocks are multiples of (8, 128); D is zero-padded to a multiple of
128. Row ids come from an SMEM scalar.

Both run on a CPU in Pallas interpret mode (`interpret=True`), which is how
the tests check them.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

GPU_TILES = (64, 64)
TPU_TILES = (256, 256)
_GPU_MIN_TILE = 16  # Triton's dot needs every dimension >= 16.
# The (Tr, D') float32 gradient accumulator lives in registers for the whole
# column loop; capping it at 64 KiB, a quarter of an H100 SM's register file,
# leaves room for the row tiles and the (Tr, Tc) temporaries (a budget, not a
# measured optimum: tune with benchmarks/losses.py --tile_rows/--tile_cols).
_GPU_ACCUMULATOR_ELEMENTS = 16384
_TPU_SUBLANES, _TPU_LANES = 8, 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _next_power_of_2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def _check_gpu_tiles(tiles: tuple[int, int]) -> tuple[int, int]:
  if any(t < _GPU_MIN_TILE or t & (t - 1) for t in tiles):
    raise ValueError(f"GPU tiles must be powers of two >= {_GPU_MIN_TILE}; got {tiles}")
  return tiles


def _check_tpu_tiles(tiles: tuple[int, int]) -> tuple[int, int]:
  if tiles[0] % 16 or tiles[1] % _TPU_LANES:
    raise ValueError(f"TPU tiles must be multiples of (16, {_TPU_LANES}); got {tiles}")
  return tiles


def default_gpu_tiles(dim: int) -> tuple[int, int]:
  """`GPU_TILES` with fewer rows for wide features (D' = D as a power of two).

  64 rows up to D' = 256, 32 at 512, 16 at 1024 and beyond.
  """
  d_pad = max(_GPU_MIN_TILE, _next_power_of_2(dim))
  rows = min(GPU_TILES[0], max(_GPU_MIN_TILE, _GPU_ACCUMULATOR_ELEMENTS // d_pad))
  return rows, GPU_TILES[1]


def gpu_tiles(
  num_rows: int, num_pairs: int, tiles: tuple[int, int] | None = None, dim: int | None = None
):
  """(tile_rows, tile_cols) for the GPU kernel, shrunk for small inputs.

  Args:
    num_rows: rows R of one device's block.
    num_pairs: pairs N (columns).
    tiles: requested tiles (powers of two, >= 16), or None for the default:
      `default_gpu_tiles(dim)`, or `GPU_TILES` without `dim`.
    dim: feature size D.

  Returns:
    Tiles no larger than needed to cover R rows and N columns.
  """
  default = GPU_TILES if dim is None else default_gpu_tiles(dim)
  tile_rows, tile_cols = _check_gpu_tiles(tiles or default)
  fit = lambda t, n: min(t, max(_GPU_MIN_TILE, _next_power_of_2(n)))
  return fit(tile_rows, num_rows), fit(tile_cols, num_pairs)


def tpu_tiles(num_rows: int, num_pairs: int, tiles: tuple[int, int] | None = None):
  """(tile_rows, tile_cols) for the TPU kernel, shrunk for small inputs.

  Args:
    num_rows: rows R of one device's block.
    num_pairs: pairs N (columns).
    tiles: requested tiles (rows a multiple of 16, columns of 128), or None
      for `TPU_TILES`.

  Returns:
    Tiles no larger than needed: a shrunk tile is a power of two, at least 16
    rows (a bf16 vreg holds 16 rows) and 128 columns (lanes).
  """
  tile_rows, tile_cols = _check_tpu_tiles(tiles or TPU_TILES)
  return (
    min(tile_rows, max(16, _next_power_of_2(num_rows))),
    min(tile_cols, max(_TPU_LANES, _next_power_of_2(num_pairs))),
  )


# Shared pieces.


def _dot(a, b, dims):
  """a @ b or a @ b.T (`dims`), accumulated in float32; float32 inputs at full precision."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _masked_sign(x, keep):
  # Written out rather than jnp.sign: the Mosaic lowering of sign looks up the
  # TPU generation of the machine, so it fails to lower without a TPU attached
  # (as in the ahead-of-time lowering test). Exact zeros stay 0.
  return jnp.where(keep & (x > 0), 1.0, jnp.where(keep & (x < 0), -1.0, 0.0))


def _distance(x, keep, squared: bool):
  """dist(x) where `keep`, else 0: x^2 (`squared`) or |x|."""
  return jnp.where(keep, x * x if squared else jnp.abs(x), 0.0)


def _factor(x, keep, squared: bool):
  """The derivative of the distance where `keep`, else 0: 2 x (`squared`) or sign(x)."""
  return jnp.where(keep, 2.0 * x, 0.0) if squared else _masked_sign(x, keep)


def _weighted_sum(factor, x, squared: bool):
  """factor @ x, (Tr, Tc) @ (Tc, D) -> (Tr, D) float32.

  Signs are exact in x's dtype, so that product runs in it; 2 d is not exact
  in bf16, so with `squared` the factor stays float32 and x is cast to it.
  """
  if squared:
    return _dot(factor, x.astype(jnp.float32), _NN)
  return _dot(factor.astype(x.dtype), x, _NN)


def _block_terms(k_r, q_r, k_c, q_c, off, squared: bool):
  """Distances and their derivatives over one (Tr, Tc) block, off-diagonal entries only.

  Args:
    k_r, q_r: (Tr, D) row features.
    k_c, q_c: (Tc, D) column features.
    off: (Tr, Tc) True where the row and column are different pairs.
    squared: d^2 and 2 d rather than |d| and sign(d).

  Returns:
    (dist(K_r Q_c^T - Q_r Q_c^T), dist(K_r K_c^T - Q_r Q_c^T), derivative at
    the first, derivative at the second), all (Tr, Tc) float32 and 0 on the
    diagonal.
  """
  qq = _dot(q_r, q_c, _NT)  # (Tr, Tc), shared by both terms
  dc = _dot(k_r, q_c, _NT) - qq
  di = _dot(k_r, k_c, _NT) - qq
  return (
    _distance(dc, off, squared),
    _distance(di, off, squared),
    _factor(dc, off, squared),
    _factor(di, off, squared),
  )


def _pad_to(x, rows: int, cols: int | None = None):
  pad_rows = rows - x.shape[0]
  pad_cols = 0 if cols is None else cols - x.shape[1]
  if pad_rows or pad_cols:
    x = jnp.pad(x, [(0, pad_rows), (0, pad_cols)][: x.ndim])
  return x


def _operands(k_rows, q_rows, m_rows, k_all, q_all, m_all, tile_rows, tile_cols, d_pad):
  """Zeroes masked pairs and pads rows, columns and features for a kernel."""
  zero = lambda x, m: jnp.where(m[:, None], x, jnp.zeros((), x.dtype))
  r_pad = -(-k_rows.shape[0] // tile_rows) * tile_rows
  n_pad = -(-k_all.shape[0] // tile_cols) * tile_cols
  rows = [_pad_to(zero(x, m_rows), r_pad, d_pad) for x in (k_rows, q_rows)]
  cols = [_pad_to(zero(x, m_all), n_pad, d_pad) for x in (k_all, q_all)]
  return (*rows, *cols)


def _diagonal(k_rows, q_rows, m_rows, a, squared: bool):
  """Sum of C_ii over valid rows and its gradient a f(.) q_i, (R, D) float32.

  f is sign (|d|) or 2 d (`squared`, d^2); all in float32, outside the kernels.
  """
  k, q = k_rows.astype(jnp.float32), q_rows.astype(jnp.float32)
  dc = jnp.sum(k * q, axis=-1) - jnp.sum(q * q, axis=-1)  # (R,)
  diag_sum = jnp.sum(jnp.where(m_rows, jnp.square(dc) if squared else jnp.abs(dc), 0.0))
  factor = 2.0 * dc if squared else jnp.sign(dc)
  return diag_sum, jnp.where(m_rows, a * factor, 0.0)[:, None] * q


def _check_inputs(k_rows, q_rows, k_all, q_all):
  if k_rows.shape != q_rows.shape or k_all.shape != q_all.shape or k_rows.ndim != 2:
    raise ValueError(f"rows and pairs must be (R, D) and (N, D); got {k_rows.shape}, {k_all.shape}")
  if (
    k_rows.shape[1] != k_all.shape[1] or len({x.dtype for x in (k_rows, q_rows, k_all, q_all)}) != 1
  ):
    raise ValueError("rows and pairs must share the feature size and dtype")


def _row_block(
  call,
  d_pad,
  k_rows,
  q_rows,
  m_rows,
  k_all,
  q_all,
  m_all,
  offset,
  coef,
  tile_rows,
  tile_cols,
  *,
  squared: bool,
):
  """The contract of `_relational_block_scan` around a kernel `call`.

  `call(offset (1,) int32, weights (2,) float32, k_r, q_r, k_c, q_c)` gets
  zeroed, padded operands ((R', D'), (R', D'), (N', D'), (N', D')) and returns
  (cross partial sums, intra partial sums, grad (R', D') float32); `call`
  closes over `squared` itself, which here selects the diagonal's distance.
  """
  _check_inputs(k_rows, q_rows, k_all, q_all)
  r, d = k_rows.shape
  operands = _operands(k_rows, q_rows, m_rows, k_all, q_all, m_all, tile_rows, tile_cols, d_pad)
  a, b, c = coef
  diag_sum, diag_grad = _diagonal(k_rows, q_rows, m_rows, a, squared)
  offset = jnp.asarray(offset, jnp.int32).reshape(1)
  weights = jnp.stack([jnp.asarray(b, jnp.float32), jnp.asarray(c, jnp.float32)])
  cross, intra, grad = call(offset, weights, *operands)
  return diag_sum, jnp.sum(cross), jnp.sum(intra), grad[:r, :d] + diag_grad


# GPU (Triton).


def _gpu_kernel(
  offset_ref,
  weight_ref,
  k_rows_ref,
  q_rows_ref,
  k_ref,
  q_ref,
  cross_ref,
  intra_ref,
  grad_ref,
  *,
  tile_cols: int,
  squared: bool,
):
  """One row tile against every column tile.

  Refs: offset (1,) and weights (2,) scalars; k_rows, q_rows (Tr, D); k, q
  (N, D), read one (Tc, D) slice at a time; outputs per-row sums cross, intra
  (Tr,) and grad (Tr, D). `squared` (static): d^2 rather than |d|.
  """
  tile_rows, d = k_rows_ref.shape
  k_r = k_rows_ref[...]  # (Tr, D), kept for the whole loop
  q_r = q_rows_ref[...]
  b, c = weight_ref[0], weight_ref[1]
  row_ids = offset_ref[0] + pl.program_id(0) * tile_rows + jnp.arange(tile_rows)  # (Tr,)

  def col_tile(j, carry):
    cross, intra, grad = carry
    start = pl.multiple_of(j * tile_cols, tile_cols)
    k_c = k_ref[pl.ds(start, tile_cols), :]  # (Tc, D)
    q_c = q_ref[pl.ds(start, tile_cols), :]
    off = row_ids[:, None] != (start + jnp.arange(tile_cols))[None, :]  # (Tr, Tc)
    dist_c, dist_i, factor_c, factor_i = _block_terms(k_r, q_r, k_c, q_c, off, squared)
    grad = grad + b * _weighted_sum(factor_c, q_c, squared)
    grad = grad + c * _weighted_sum(factor_i, k_c, squared)
    return cross + dist_c.sum(axis=1), intra + dist_i.sum(axis=1), grad

  init = (
    jnp.zeros((tile_rows,), jnp.float32),
    jnp.zeros((tile_rows,), jnp.float32),
    jnp.zeros((tile_rows, d), jnp.float32),
  )
  cross, intra, grad = jax.lax.fori_loop(0, k_ref.shape[0] // tile_cols, col_tile, init)
  cross_ref[...] = cross
  intra_ref[...] = intra
  grad_ref[...] = grad


def relational_block_gpu(
  k_rows,
  q_rows,
  m_rows,
  k_all,
  q_all,
  m_all,
  offset,
  coef,
  tile_rows: int | None = None,
  tile_cols: int | None = None,
  *,
  interpret: bool = False,
  num_warps: int | None = None,
  num_stages: int | None = None,
  squared: bool = False,
):
  """`_relational_block_scan` as a Pallas Triton kernel (see the module docstring).

  Args:
    k_rows, q_rows: (R, D) normalised features of the rows, any R.
    m_rows: (R,) valid rows.
    k_all, q_all: (N, D) normalised features of every pair, any N.
    m_all: (N,) valid pairs.
    offset: index of the first row in the full pair axis.
    coef: (a, b, c) gradient weights of the diagonal, cross-modal and
      intra-modal off-diagonal terms.
    tile_rows, tile_cols: powers of two >= 16; tile_rows * D' and
      tile_cols * D' (D' = D rounded up to a power of two) must stay within
      Triton's 2^20 elements per block. None: `default_gpu_tiles(D)`.
    interpret: run in Pallas interpret mode (any backend, for tests).
    num_warps, num_stages: Triton settings; None picks 4 warps for D' <= 64
      (8 above) and 2 pipeline stages while a stage's column tiles take
      <= 64 KiB of shared memory (1 above).
    squared: (static) d^2 instead of |d| (module docstring).

  Returns:
    (diag_sum, cross_off_sum, intra_off_sum, grad_rows (R, D) float32).
  """
  default_rows, default_cols = default_gpu_tiles(k_rows.shape[1])
  tile_rows, tile_cols = _check_gpu_tiles((tile_rows or default_rows, tile_cols or default_cols))
  d_pad = max(_GPU_MIN_TILE, _next_power_of_2(k_rows.shape[1]))
  if max(tile_rows, tile_cols) * d_pad > 2**20:
    raise ValueError(f"a ({max(tile_rows, tile_cols)}, {d_pad}) tile exceeds 2^20 elements")
  stage_bytes = 2 * tile_cols * d_pad * jnp.dtype(k_rows.dtype).itemsize
  if num_warps is None:
    num_warps = 4 if d_pad <= 64 else 8
  if num_stages is None:
    num_stages = 2 if stage_bytes <= 64 * 1024 else 1

  def call(offset, weights, k_r, q_r, k_c, q_c):
    r_pad, n_pad = k_r.shape[0], k_c.shape[0]
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    rows = pl.BlockSpec((tile_rows, d_pad), lambda i: (i, 0))
    row_sums = pl.BlockSpec((tile_rows,), lambda i: (i,))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return pl.pallas_call(
      functools.partial(_gpu_kernel, tile_cols=tile_cols, squared=squared),
      out_shape=(f32(r_pad), f32(r_pad), f32(r_pad, d_pad)),
      grid=(r_pad // tile_rows,),
      in_specs=[
        whole((1,)),
        whole((2,)),
        rows,
        rows,
        whole((n_pad, d_pad)),
        whole((n_pad, d_pad)),
      ],
      out_specs=[row_sums, row_sums, rows],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="relational_block_gpu",
    )(offset, weights, k_r, q_r, k_c, q_c)

  args = (k_rows, q_rows, m_rows, k_all, q_all, m_all, offset, coef, tile_rows, tile_cols)
  return _row_block(call, d_pad, *args, squared=squared)


# TPU (Mosaic).


def _fold_rows(x):
  """(Tr, Tc) -> (8, Tc) by adding sublane-aligned row slices (VPU adds only)."""
  parts = [x[s : s + _TPU_SUBLANES] for s in range(0, x.shape[0], _TPU_SUBLANES)]
  return functools.reduce(jnp.add, parts)


def _tpu_kernel(
  offset_ref,
  weight_ref,
  k_rows_ref,
  q_rows_ref,
  k_cols_ref,
  q_cols_ref,
  cross_ref,
  intra_ref,
  grad_ref,
  *,
  squared: bool,
):
  """Grid step (row tile i, column tile j); outputs accumulate along j.

  Refs: offset (1,) and weights (2,) in SMEM; k_rows, q_rows (Tr, D);
  k_cols, q_cols (Tc, D); outputs cross, intra (8, Tc) partial sums and grad
  (Tr, D), resident in VMEM for the whole row tile. `squared` (static): d^2
  rather than |d|.
  """
  i, j = pl.program_id(0), pl.program_id(1)
  tile_rows, tile_cols = k_rows_ref.shape[0], k_cols_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    cross_ref[...] = jnp.zeros(cross_ref.shape, jnp.float32)
    intra_ref[...] = jnp.zeros(intra_ref.shape, jnp.float32)
    grad_ref[...] = jnp.zeros(grad_ref.shape, jnp.float32)

  k_c = k_cols_ref[...]  # (Tc, D)
  q_c = q_cols_ref[...]
  shape = (tile_rows, tile_cols)
  row_ids = offset_ref[0] + i * tile_rows + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  col_ids = j * tile_cols + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  dist_c, dist_i, factor_c, factor_i = _block_terms(
    k_rows_ref[...], q_rows_ref[...], k_c, q_c, row_ids != col_ids, squared
  )
  cross_ref[...] += _fold_rows(dist_c)
  intra_ref[...] += _fold_rows(dist_i)
  grad_c = _weighted_sum(factor_c, q_c, squared)  # (Tr, D)
  grad_i = _weighted_sum(factor_i, k_c, squared)
  grad_ref[...] += weight_ref[0] * grad_c + weight_ref[1] * grad_i


def relational_block_tpu(
  k_rows,
  q_rows,
  m_rows,
  k_all,
  q_all,
  m_all,
  offset,
  coef,
  tile_rows: int = TPU_TILES[0],
  tile_cols: int = TPU_TILES[1],
  *,
  interpret: bool = False,
  vmem_limit_bytes: int | None = None,
  squared: bool = False,
):
  """`_relational_block_scan` as a Pallas Mosaic TPU kernel (see the module docstring).

  Args:
    k_rows, q_rows: (R, D) normalised features of the rows, any R.
    m_rows: (R,) valid rows.
    k_all, q_all: (N, D) normalised features of every pair, any N.
    m_all: (N,) valid pairs.
    offset: index of the first row in the full pair axis.
    coef: (a, b, c) gradient weights of the diagonal, cross-modal and
      intra-modal off-diagonal terms.
    tile_rows, tile_cols: multiples of 16 and of 128.
    interpret: run in Pallas interpret mode (any backend, for tests).
    vmem_limit_bytes: Mosaic's scoped VMEM limit, None for its default. By
      our count the default tiles at D = 512 need about 6 MiB (bf16) or
      8 MiB (float32): double-buffered inputs and gradient block plus the
      (Tr, Tc) and (Tr, D) float32 temporaries; `squared` adds float32 copies
      of the column tiles (module docstring).
    squared: (static) d^2 instead of |d|.

  Returns:
    (diag_sum, cross_off_sum, intra_off_sum, grad_rows (R, D) float32).
  """
  _check_tpu_tiles((tile_rows, tile_cols))
  d_pad = -(-k_rows.shape[1] // _TPU_LANES) * _TPU_LANES

  def call(offset, weights, k_r, q_r, k_c, q_c):
    r_pad, n_pad = k_r.shape[0], k_c.shape[0]
    num_row_tiles = r_pad // tile_rows
    rows = pl.BlockSpec((tile_rows, d_pad), lambda i, j: (i, 0))
    cols = pl.BlockSpec((tile_cols, d_pad), lambda i, j: (j, 0))
    sums = pl.BlockSpec((_TPU_SUBLANES, tile_cols), lambda i, j: (i, 0))
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    sums_shape = f32(num_row_tiles * _TPU_SUBLANES, tile_cols)
    return pl.pallas_call(
      functools.partial(_tpu_kernel, squared=squared),
      out_shape=(sums_shape, sums_shape, f32(r_pad, d_pad)),
      grid=(num_row_tiles, n_pad // tile_cols),
      in_specs=[smem, smem, rows, rows, cols, cols],
      out_specs=[sums, sums, rows],
      compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
      ),
      interpret=interpret,
      name="relational_block_tpu",
    )(offset, weights, k_r, q_r, k_c, q_c)

  args = (k_rows, q_rows, m_rows, k_all, q_all, m_all, offset, coef, tile_rows, tile_cols)
  return _row_block(call, d_pad, *args, squared=squared)
