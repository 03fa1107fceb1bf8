"""Serialised voxel buckets: the geometry of the 3D student, computed once offline.

A lidar scan is quantised to a voxel grid (one point kept per voxel), its voxels
are pooled into `num_stages` encoder stages (stage s+1 voxels are the unique
`coords >> 1` of stage s), and every stage gets its space-filling-curve orders,
their inverses and a 3x3x3 neighbour map. Everything is padded to a fixed
**bucket capacity**, so the model is gathers, attention and segment sums of
static shape. numpy only: this module imports without JAX.

Conventions
  * Grid coordinates are integers shifted per scan to be non-negative
    (`coords - coords.min(0)`); curve codes are uint64 over `CODE_BITS` bits
    per axis.
  * The slots of every stage are sorted by the Morton (z) code of that stage's
    coordinates. Valid voxels fill slots 0..V_s-1; padding slots V_s..C_s-1
    have mask False, zero coordinates and zero features.
  * SENTINEL: a padded slot's `parent` and an absent neighbour hold the
    capacity of the stage they index (one past its last slot). Then
    `jax.ops.segment_max(x, parent, num_segments=C_{s+1})` drops padded
    children, and a gather from `concatenate([x, zeros((1, ...))])` reads
    zeros for absent neighbours.
  * `order[r]` lists the slots of a stage by ascending code of curve r with
    every padding slot after every valid one (padding in slot order), and
    `inverse[r]` is its inverse permutation: `x[order[r]][inverse[r]] == x`.
  * Neighbour column j is the offset `NEIGHBOR_OFFSETS[j]` (dx, dy, dz in
    {-1, 0, 1}, x slowest); column 13 is the voxel itself.

Record keys (the output of `build_bucket`; R = len(curves), C0 = `capacity`,
Cs = `stage_capacities(C0, ...)[s]`)
  token                 str: the scan's sample token.
  num_points            int: N, points in the original scan.
  num_voxels            int: V, valid stage-0 voxels (after any overflow drop).
  capacity              int: C0, the stage-0 bucket capacity.
  num_dropped_voxels    int: stage-0 voxels dropped by the overflow policy.
  point_to_voxel        (N,) int32: stage-0 slot of every original point, -1
                        where its voxel was dropped.
  point_labels          (N,) uint8: the original per-point labels (0 = ignore),
                        for evaluation on every point.
  features              (C0, F) float32: all channels of the point kept in each
                        voxel (x, y, z, intensity, ...); zero for padding.
  labels                (C0,) uint8: label of the kept point; 0 for padding.
  s{s}/coords           (Cs, 3) int32: grid coordinates at stage s (stage s is
                        the stage-0 grid coarsened 2**s times).
  s{s}/mask             (Cs,) bool: slot holds a voxel.
  s{s}/order            (R, Cs) int32: slots by ascending code of each curve.
  s{s}/inverse          (R, Cs) int32: inverse permutations of `order`.
  s{s}/neighbors        (Cs, 27) int32: slot of each 3x3x3 neighbour, Cs if absent.
  s{s}/parent           (Cs,) int32, for s < num_stages - 1: slot in stage s+1
                        of each voxel's parent, C_{s+1} for padding.
  pairs_voxel           (M,) int32: stage-0 slot of each point-to-pixel pair
                        (`point_to_voxel[pairs_point]`; pairs whose point was
                        dropped are removed).
  pairs_camera          (M,) uint8: camera index of each pair.
  pairs_uv              (M, 2) float32: pixel (u = column, v = row) of each pair.

Overflow policy: the stage-0 capacity is the smallest configured capacity in
which every stage fits. When even the largest cannot hold every stage, the
voxels farthest from the sensor (range of their kept point) are dropped first,
keeping the largest set of nearest voxels with which every stage fits. The drop
is logged as a warning, counted in `num_dropped_voxels`, and the points of
dropped voxels get `point_to_voxel == -1`.
"""

import itertools
import math
from collections.abc import Sequence

import numpy as np
from absl import logging

from reldistill_jax import errors

# Bits per axis of the curve codes: 3 * 21 = 63 bits fit a uint64. At 0.1 m a
# scan may span 2**21 * 0.1 m = 210 km, far beyond any lidar.
CODE_BITS = 21

# Bumped whenever the bucket schema or its computation changes, so that a
# store written by older code is refused rather than silently mixed.
BUCKET_VERSION = 2

CURVES = ("z", "z-trans", "hilbert", "hilbert-trans")
GRIDS = ("cartesian", "cylindrical")

# Cylindrical grid default: 0.1 m radially and vertically, 0.25 degrees of
# azimuth (4.4 cm at 10 m, 22 cm at 50 m, following the lidar's density).
DEFAULT_CYLINDRICAL_VOXEL_SIZE = (0.1, 2 * math.pi / 1440, 0.1)

# Stage-0 capacities: multiples of 8 * 1024 from 16k to 128k voxels, few so
# that the model compiles few shapes. At 0.1 m the real nuScenes keyframe has
# 17,885 voxels (stages 0-4: 17,885 / 12,614 / 7,927 / 4,495 / 2,310) and the
# real SemanticKITTI scan 68,642. Pooling keeps 60-70% of the voxels per
# level, hence DEFAULT_STAGE_RATIO 0.75: with 0.5, stage 1 would decide the
# bucket (40,960 for that nuScenes scan instead of 24,576, 98,304 instead of
# 81,920 for the SemanticKITTI one).
DEFAULT_CAPACITIES = (16384, 24576, 32768, 40960, 49152, 65536, 81920, 98304, 131072)
DEFAULT_STAGE_RATIO = 0.75

# (27, 3) offsets of the neighbour map, x slowest; row 13 is (0, 0, 0).
NEIGHBOR_OFFSETS = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.int64)

_MORTON_MASKS = (
  (32, 0x1F00000000FFFF),
  (16, 0x1F0000FF0000FF),
  (8, 0x100F00F00F00F00F),
  (4, 0x10C30C30C30C30C3),
  (2, 0x1249249249249249),
)


# ----------------------------------------------------------------------------
# Space-filling curves.
# ----------------------------------------------------------------------------


def _spread_bits(v: np.ndarray) -> np.ndarray:
  """Moves bit i of each value to bit 3i (21 bits in, 63 bits out)."""
  v = v.astype(np.uint64) & np.uint64((1 << CODE_BITS) - 1)
  for shift, mask in _MORTON_MASKS:
    v = (v | (v << np.uint64(shift))) & np.uint64(mask)
  return v


def _interleave(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
  """Interleaves three bit fields, x most significant in each triple."""
  return (_spread_bits(x) << np.uint64(2)) | (_spread_bits(y) << np.uint64(1)) | _spread_bits(z)


def _check_coords(coords: np.ndarray, bits: int) -> np.ndarray:
  coords = np.asarray(coords)
  if coords.ndim != 2 or coords.shape[1] != 3:
    raise ValueError(f"coords must have shape (N, 3), got {coords.shape}")
  if coords.size and (coords.min() < 0 or coords.max() >= 1 << bits):
    raise ValueError(
      f"curve coordinates must lie in [0, 2**{bits}), got [{coords.min()}, {coords.max()}]"
    )
  return coords.astype(np.uint64)


def morton_encode(coords: np.ndarray, bits: int = CODE_BITS) -> np.ndarray:
  """Morton (z-order) codes of non-negative integer grid coordinates.

  Bit i of x, y and z go to bits 3i+2, 3i+1 and 3i of the code, so
  `morton_encode(c >> 1) == morton_encode(c) >> 3`.

  Args:
    coords: (N, 3) integer coordinates in [0, 2**bits).
    bits: bits per axis, at most `CODE_BITS`.

  Returns:
    (N,) uint64 codes.
  """
  c = _check_coords(coords, bits)
  return _interleave(c[:, 0], c[:, 1], c[:, 2])


def hilbert_encode(coords: np.ndarray, bits: int = CODE_BITS) -> np.ndarray:
  """3D Hilbert-curve indices of non-negative integer grid coordinates.

  Skilling's algorithm ("Programming the Hilbert curve", AIP Conf. Proc. 707,
  2004): the axes are turned into the curve's "transposed" index by undoing
  the excess work level by level and Gray-coding, then the transpose is
  interleaved like a Morton code (x most significant). Vectorised over points;
  the loops run over the `bits` levels only. The curve starts at the origin,
  consecutive indices are face-adjacent cells, and
  `hilbert_encode(c, bits) >> 3 == hilbert_encode(c >> 1, bits - 1)`: a
  parent cell's index is its children's index >> 3, as for Morton codes.

  Args:
    coords: (N, 3) integer coordinates in [0, 2**bits).
    bits: bits per axis (the curve fills the 2**bits cube), at most
      `CODE_BITS`. The curve's orientation depends on it, so codes are only
      comparable for the same `bits`.

  Returns:
    (N,) uint64 indices in [0, 8**bits).
  """
  c = _check_coords(coords, bits)
  x = [c[:, 0].copy(), c[:, 1].copy(), c[:, 2].copy()]
  # Undo excess work, from the coarsest level down. At each level q, below
  # bit q: where axis i has bit q set, invert x0's low bits; else exchange
  # the low bits of x0 and axis i.
  q = 1 << (bits - 1)
  while q > 1:
    low = np.uint64(q - 1)
    for i in range(3):
      is_set = (x[i] & np.uint64(q)) != 0
      if i == 0:
        x[0] = np.where(is_set, x[0] ^ low, x[0])
      else:
        swap = np.where(is_set, np.uint64(0), (x[0] ^ x[i]) & low)
        x[0] = np.where(is_set, x[0] ^ low, x[0] ^ swap)
        x[i] ^= swap
    q >>= 1
  # Gray encode.
  x[1] ^= x[0]
  x[2] ^= x[1]
  t = np.zeros_like(x[2])
  q = 1 << (bits - 1)
  while q > 1:
    t = np.where((x[2] & np.uint64(q)) != 0, t ^ np.uint64(q - 1), t)
    q >>= 1
  return _interleave(x[0] ^ t, x[1] ^ t, x[2] ^ t)


def curve_codes(coords: np.ndarray, curves: Sequence[str] = CURVES) -> np.ndarray:
  """Codes of every curve; the `-trans` curves swap x and y first (as PTv3).

  Args:
    coords: (V, 3) non-negative integer coordinates.
    curves: names from `CURVES`.

  Returns:
    (R, V) uint64 codes, one row per curve, over `CODE_BITS` bits per axis.
  """
  rows = []
  for curve in curves:
    c = coords[:, [1, 0, 2]] if curve.endswith("-trans") else coords
    if curve in ("z", "z-trans"):
      rows.append(morton_encode(c))
    elif curve in ("hilbert", "hilbert-trans"):
      rows.append(hilbert_encode(c))
    else:
      raise ValueError(f"unknown curve {curve!r}; expected one of {CURVES}")
  return np.stack(rows) if rows else np.zeros((0, len(coords)), np.uint64)


def orders_and_inverses(codes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
  """Sort orders of the valid slots by each curve, padding slots last.

  Args:
    codes: (R, V) codes of the V valid slots.
    capacity: C >= V, slots including padding.

  Returns:
    (order, inverse), each (R, C) int32: `order[r]` is the slots by ascending
    code (stable), then padding slots V..C-1 in slot order; `inverse[r]` is
    its inverse (`order[r][inverse[r]] == inverse[r][order[r]] == arange(C)`).
  """
  num_curves, num_valid = codes.shape
  if num_valid > capacity:
    raise ValueError(f"{num_valid} voxels exceed the capacity {capacity}")
  order = np.empty((num_curves, capacity), np.int32)
  order[:, :num_valid] = np.argsort(codes, axis=1, kind="stable")
  order[:, num_valid:] = np.arange(num_valid, capacity, dtype=np.int32)
  inverse = np.empty_like(order)
  slots = np.arange(capacity, dtype=np.int32)
  for r in range(num_curves):
    inverse[r, order[r]] = slots
  return order, inverse


# ----------------------------------------------------------------------------
# Voxelisation, pooling, neighbours.
# ----------------------------------------------------------------------------


def grid_position(
  xyz: np.ndarray,
  grid: str = "cartesian",
  voxel_size: float | Sequence[float] = 0.1,
) -> np.ndarray:
  """Point positions in voxel units (floor gives the voxel, .5 is its centre).

  Args:
    xyz: (N, 3) points in the sensor frame.
    grid: "cartesian" (x, y, z) or "cylindrical" (rho, phi, z), phi in
      [-pi, pi] (the seam at phi = +-pi is not wrapped).
    voxel_size: one size or three; for the cylindrical grid (rho metres, phi
      radians, z metres).

  Returns:
    (N, 3) float64 positions divided by the voxel size.
  """
  xyz = np.asarray(xyz, dtype=np.float64)
  size = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))
  if np.any(size <= 0):
    raise ValueError(f"voxel sizes must be positive, got {tuple(size)}")
  if grid == "cartesian":
    pos = xyz
  elif grid == "cylindrical":
    pos = np.stack(
      [np.hypot(xyz[:, 0], xyz[:, 1]), np.arctan2(xyz[:, 1], xyz[:, 0]), xyz[:, 2]], axis=1
    )
  else:
    raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
  return pos / size


def voxelise(
  xyz: np.ndarray,
  grid: str = "cartesian",
  voxel_size: float | Sequence[float] = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Quantises points to a grid and keeps one point per voxel.

  The kept point is the one nearest the voxel centre in voxel units (for the
  Cartesian grid with one size, the Euclidean nearest); ties go to the lowest
  point index, so the result is deterministic.

  Args:
    xyz: (N, 3) finite points, N >= 1.
    grid: "cartesian" or "cylindrical" (see `grid_position`).
    voxel_size: one size or three.

  Returns:
    coords: (V, 3) int64 voxel coordinates shifted to start at 0, sorted by
      Morton code.
    kept: (V,) int64 index of the point kept in each voxel.
    point_to_voxel: (N,) int64 voxel of every point.
    code: (V,) uint64 Morton code of each voxel (ascending).
  """
  pos = grid_position(xyz, grid, voxel_size)  # (N, 3)
  cell = np.floor(pos)
  coords = cell.astype(np.int64)
  coords -= coords.min(axis=0)
  extent = coords.max(axis=0)
  if np.any(extent >= 1 << CODE_BITS):
    raise errors.DataError(
      f"the scan spans {tuple(int(e) + 1 for e in extent)} voxels; curve codes hold "
      f"2**{CODE_BITS} per axis (check the units of the points or use larger voxels)"
    )
  code = morton_encode(coords)  # (N,)
  dist2 = np.square(pos - cell - 0.5).sum(axis=1)  # (N,) squared distance to the centre
  by_voxel = np.lexsort((dist2, code))  # lexsort is stable: ties keep the lower index
  sorted_code = code[by_voxel]
  first = np.ones(len(code), bool)
  first[1:] = sorted_code[1:] != sorted_code[:-1]
  kept = by_voxel[first]
  point_to_voxel = np.empty(len(code), np.int64)
  point_to_voxel[by_voxel] = np.cumsum(first) - 1
  return coords[kept], kept, point_to_voxel, sorted_code[first]


def pool(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Parents of one stage's voxels in the next stage (unique `code >> 3`).

  Args:
    code: (V,) ascending Morton codes of the stage's voxels.

  Returns:
    parent: (V,) int64 index of each voxel's parent among the next stage's
      voxels, which are sorted by their own Morton code (`code >> 3`).
    first_child: (P,) int64 index of the first child of each parent, so the
      parents' coordinates are `coords[first_child] >> 1` and their codes
      (any curve) `codes[:, first_child] >> 3`.
  """
  parent_code = code >> np.uint64(3)
  first = np.ones(len(code), bool)
  first[1:] = parent_code[1:] != parent_code[:-1]
  return np.cumsum(first) - 1, np.flatnonzero(first)


def neighbor_map(coords: np.ndarray, capacity: int) -> np.ndarray:
  """Slots of the 27 neighbours (3x3x3, centre included) of every voxel.

  Args:
    coords: (V, 3) distinct non-negative integer coordinates of the valid slots.
    capacity: C >= V; also the sentinel of an absent neighbour.

  Returns:
    (C, 27) int32: column j is the slot at `coords + NEIGHBOR_OFFSETS[j]`, or
    C when no voxel is there; padding rows are all C.
  """
  num_valid = len(coords)
  out = np.full((27, capacity), capacity, np.int32)  # column-major while filling
  if num_valid == 0:
    return out.T.copy()
  # Linear keys over the bounding box grown by one cell on each side, so an
  # offset never wraps into another row of the box.
  c = coords.astype(np.int64) + 1
  dims = c.max(axis=0) + 2
  strides = np.array([dims[1] * dims[2], dims[2], 1], np.int64)
  key = c @ strides  # (V,)
  by_key = np.argsort(key).astype(np.int32)
  sorted_key = key[by_key]
  offsets = NEIGHBOR_OFFSETS @ strides  # (27,)
  out[13, :num_valid] = np.arange(num_valid, dtype=np.int32)
  # The relation is symmetric (offset j from a is 26 - j from b), so half
  # the offsets are searched and mirrored. Shifting every sorted key by one
  # offset keeps the queries sorted, which keeps the search cache-friendly.
  for j in range(13):
    query = sorted_key + offsets[j]
    pos = np.minimum(np.searchsorted(sorted_key, query), num_valid - 1)
    hit = sorted_key[pos] == query
    source, target = by_key[hit], by_key[pos[hit]]
    out[j, source] = target
    out[26 - j, target] = source
  return out.T.copy()


# ----------------------------------------------------------------------------
# Buckets.
# ----------------------------------------------------------------------------


def stage_capacities(
  capacity: int, num_stages: int, patch_size: int, stage_ratio: float = DEFAULT_STAGE_RATIO
) -> list[int]:
  """Capacity of every stage: round_up(C0 * stage_ratio**s, patch_size), >= patch_size."""
  caps = []
  for s in range(num_stages):
    # Rounding first keeps float noise (0.30000000000000004) from adding a patch.
    patches = math.ceil(round(capacity * stage_ratio**s / patch_size, 6))
    caps.append(max(1, patches) * patch_size)
  return caps


def choose_capacity(
  stage_counts: Sequence[int],
  capacities: Sequence[int],
  patch_size: int,
  stage_ratio: float = DEFAULT_STAGE_RATIO,
) -> int | None:
  """Smallest configured stage-0 capacity in which every stage fits, or None."""
  for capacity in sorted(capacities):
    caps = stage_capacities(capacity, len(stage_counts), patch_size, stage_ratio)
    if all(n <= cap for n, cap in zip(stage_counts, caps, strict=True)):
      return capacity
  return None


def check_bucket_config(
  curves: Sequence[str],
  num_stages: int,
  patch_size: int,
  capacities: Sequence[int],
  stage_ratio: float,
) -> None:
  """Raises ValueError unless the bucket arguments of `build_bucket` are valid."""
  if not curves or any(c not in CURVES for c in curves) or len(set(curves)) != len(curves):
    raise ValueError(f"curves must be distinct names from {CURVES}, got {tuple(curves)}")
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")
  if patch_size < 1:
    raise ValueError(f"patch_size must be >= 1, got {patch_size}")
  if not capacities or any(c <= 0 or c % patch_size for c in capacities):
    raise ValueError(
      f"capacities must be positive multiples of patch_size={patch_size}, got {tuple(capacities)}"
    )
  if not 0 < stage_ratio <= 1:
    raise ValueError(f"stage_ratio must lie in (0, 1], got {stage_ratio}")


def _pool_chain(code: np.ndarray, num_stages: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Parents and first children of every stage transition, from stage-0 codes."""
  parents, first_children = [], []
  for _ in range(num_stages - 1):
    parent, first_child = pool(code)
    parents.append(parent)
    first_children.append(first_child)
    code = code[first_child] >> np.uint64(3)
  return parents, first_children


def _nearest_that_fit(
  distance: np.ndarray, first_children: Sequence[np.ndarray], caps: Sequence[int]
) -> np.ndarray:
  """Mask of the largest set of nearest stage-0 voxels with which every stage fits.

  A voxel of stage s exists when any of its stage-0 descendants is kept; with
  voxels ranked by distance, it exists iff its nearest descendant's rank is
  below the number kept. So the count kept at stage s is the number of stage-s
  voxels whose min rank is below k, and the largest admissible k is the
  (C_s + 1)-th smallest min rank of the stages that overflow.

  Args:
    distance: (V,) distance of every stage-0 voxel to the sensor.
    first_children: per stage transition, from `pool`.
    caps: capacity of every stage.

  Returns:
    (V,) bool mask of the stage-0 voxels to keep.
  """
  rank = np.empty(len(distance), np.int64)
  rank[np.argsort(distance, kind="stable")] = np.arange(len(distance))
  keep_count = len(distance)
  min_rank = rank
  for s, cap in enumerate(caps):
    if s > 0:
      # Children of a parent are contiguous (slots are in Morton order).
      min_rank = np.minimum.reduceat(min_rank, first_children[s - 1])
    if len(min_rank) > cap:
      keep_count = min(keep_count, int(np.partition(min_rank, cap)[cap]))
  return rank < keep_count


def build_bucket(
  points: np.ndarray,
  labels: np.ndarray | None = None,
  *,
  token: str = "",
  voxel_size: float | Sequence[float] = 0.1,
  grid: str = "cartesian",
  curves: Sequence[str] = CURVES,
  num_stages: int = 5,
  patch_size: int = 1024,
  capacities: Sequence[int] = DEFAULT_CAPACITIES,
  stage_ratio: float = DEFAULT_STAGE_RATIO,
  pairs_point: np.ndarray | None = None,
  pairs_camera: np.ndarray | None = None,
  pairs_uv: np.ndarray | None = None,
) -> dict[str, np.ndarray | str | int]:
  """Voxelises one scan into a padded, serialised bucket (keys: module docstring).

  Overflow policy: when no configured capacity holds every stage, the largest
  is used and the voxels farthest from the sensor are dropped first (see the
  module docstring); the drop is logged as a warning and recorded.

  Args:
    points: (N, F) point channels, x, y, z first (then intensity, ...).
    labels: (N,) per-point training ids (0 = ignore), or None for zeros.
    token: the scan's sample token (stored, and named in errors).
    voxel_size: voxel size; a scalar or 3 sizes for the Cartesian grid, 3
      sizes (rho m, phi rad, z m) for the cylindrical one.
    grid: "cartesian" or "cylindrical".
    curves: the R curves of the orders, in record row order.
    num_stages: encoder stages (stage s is the grid coarsened 2**s times).
    patch_size: attention patch size; every capacity is a multiple of it.
    capacities: the allowed stage-0 capacities.
    stage_ratio: stage s capacity is round_up(C0 * stage_ratio**s, patch_size).
    pairs_point: (M,) point index of each point-to-pixel pair, or None.
    pairs_camera: (M,) camera of each pair.
    pairs_uv: (M, 2) pixel of each pair.

  Returns:
    The bucket record, a dict of fixed-shape numpy arrays and scalars.

  Raises:
    ValueError: empty scan, non-finite coordinates, or bad arguments; the
      message names the token.
  """
  check_bucket_config(curves, num_stages, patch_size, capacities, stage_ratio)
  points = np.asarray(points)
  if points.ndim != 2 or points.shape[1] < 3:
    raise errors.DataError(f"scan {token!r}: points must have shape (N, >=3), got {points.shape}")
  num_points = len(points)
  if num_points == 0:
    raise errors.DataError(f"scan {token!r} is empty (0 points)")
  xyz = points[:, :3]
  if not np.all(np.isfinite(xyz)):
    bad = np.flatnonzero(~np.all(np.isfinite(xyz), axis=1))
    raise errors.DataError(
      f"scan {token!r} has {len(bad)} points with NaN or infinite coordinates "
      f"(first at index {bad[0]})"
    )
  if labels is None:
    labels = np.zeros(num_points, np.uint8)
  labels = np.asarray(labels)
  if labels.shape != (num_points,):
    raise errors.DataError(f"scan {token!r}: labels shape {labels.shape} != ({num_points},)")

  coords, kept, point_to_voxel, code = voxelise(xyz, grid, voxel_size)
  parents, first_children = _pool_chain(code, num_stages)
  counts = [len(coords)] + [len(f) for f in first_children]
  capacity = choose_capacity(counts, capacities, patch_size, stage_ratio)
  num_dropped = 0
  if capacity is None:
    capacity = max(capacities)
    caps = stage_capacities(capacity, num_stages, patch_size, stage_ratio)
    distance = np.linalg.norm(xyz[kept].astype(np.float64), axis=1)
    keep = _nearest_that_fit(distance, first_children, caps)
    num_dropped = int(len(keep) - keep.sum())
    logging.warning(
      "scan %r: %d voxels (stages %s) overflow the largest capacity %d (stages %s); "
      "dropped the %d farthest voxels (beyond %.1f m) and their %d points",
      token,
      len(coords),
      counts,
      capacity,
      caps,
      num_dropped,
      distance[keep].max(),
      int(np.count_nonzero(~keep[point_to_voxel])),
    )
    new_slot = np.cumsum(keep) - 1
    point_to_voxel = np.where(keep[point_to_voxel], new_slot[point_to_voxel], -1)
    coords, kept, code = coords[keep], kept[keep], code[keep]
    parents, first_children = _pool_chain(code, num_stages)
  caps = stage_capacities(capacity, num_stages, patch_size, stage_ratio)
  num_voxels = len(coords)

  features = np.zeros((capacity, points.shape[1]), np.float32)
  features[:num_voxels] = points[kept]
  voxel_labels = np.zeros(capacity, np.uint8)
  voxel_labels[:num_voxels] = labels[kept]
  record = {
    "token": token,
    "num_points": num_points,
    "num_voxels": num_voxels,
    "capacity": capacity,
    "num_dropped_voxels": num_dropped,
    "point_to_voxel": point_to_voxel.astype(np.int32),
    "point_labels": labels.astype(np.uint8),
    "features": features,
    "labels": voxel_labels,
  }

  codes = curve_codes(coords, curves)  # (R, V0)
  for s in range(num_stages):
    cap, count = caps[s], len(coords)
    stage_coords = np.zeros((cap, 3), np.int32)
    stage_coords[:count] = coords
    mask = np.zeros(cap, bool)
    mask[:count] = True
    order, inverse = orders_and_inverses(codes, cap)
    record[f"s{s}/coords"] = stage_coords
    record[f"s{s}/mask"] = mask
    record[f"s{s}/order"] = order
    record[f"s{s}/inverse"] = inverse
    record[f"s{s}/neighbors"] = neighbor_map(coords, cap)
    if s < num_stages - 1:
      parent = np.full(cap, caps[s + 1], np.int32)
      parent[:count] = parents[s]
      record[f"s{s}/parent"] = parent
      coords = coords[first_children[s]] >> 1
      codes = codes[:, first_children[s]] >> np.uint64(3)

  if pairs_point is None:
    pairs_point = np.zeros(0, np.int32)
    pairs_camera = np.zeros(0, np.uint8)
    pairs_uv = np.zeros((0, 2), np.float32)
  pairs_point = np.asarray(pairs_point, np.int64)
  if pairs_point.size and (pairs_point.min() < 0 or pairs_point.max() >= num_points):
    raise errors.DataError(f"scan {token!r}: pairs_point indices outside [0, {num_points})")
  pairs_voxel = point_to_voxel[pairs_point]
  valid = pairs_voxel >= 0
  record["pairs_voxel"] = pairs_voxel[valid].astype(np.int32)
  record["pairs_camera"] = np.asarray(pairs_camera).astype(np.uint8)[valid]
  record["pairs_uv"] = np.asarray(pairs_uv, np.float32).reshape(-1, 2)[valid]
  return record


def pad_bucket(
  bucket: dict, capacity: int, patch_size: int, stage_ratio: float = DEFAULT_STAGE_RATIO
) -> dict:
  """The same bucket in a larger stage-0 capacity (so a batch has one shape).

  Appended slots are padding: masked, zero, after every valid slot in every
  order, and every SENTINEL moves to the new capacity of the stage it indexes.
  The result equals `build_bucket` of the same scan with `capacities=(capacity,)`.

  Args:
    bucket: a record of `build_bucket`.
    capacity: the new stage-0 capacity (>= the bucket's).
    patch_size: the patch size the bucket was built with.
    stage_ratio: the stage ratio it was built with.

  Raises:
    ValueError: if the bucket is larger than `capacity` (names its token).
  """
  old_c0 = int(bucket["capacity"])
  if old_c0 == capacity:
    return bucket
  if old_c0 > capacity:
    raise errors.DataError(
      f"scan {bucket['token']!r} has a {old_c0}-voxel bucket, larger than the batch capacity "
      f"{capacity}; raise the capacity to at least {old_c0}"
    )
  num_stages = sum(1 for key in bucket if key.endswith("/mask"))
  old = [bucket[f"s{s}/mask"].shape[0] for s in range(num_stages)]
  new = stage_capacities(capacity, num_stages, patch_size, stage_ratio)
  out = dict(bucket, capacity=capacity)
  rows = lambda x, n, fill=0: np.concatenate(
    [x, np.full((n - len(x), *x.shape[1:]), fill, x.dtype)]
  )
  out["features"] = rows(bucket["features"], capacity)
  out["labels"] = rows(bucket["labels"], capacity)
  for s, (c_old, c_new) in enumerate(zip(old, new, strict=True)):
    tail = np.broadcast_to(
      np.arange(c_old, c_new, dtype=np.int32), (bucket[f"s{s}/order"].shape[0], c_new - c_old)
    )
    out[f"s{s}/coords"] = rows(bucket[f"s{s}/coords"], c_new)
    out[f"s{s}/mask"] = rows(bucket[f"s{s}/mask"], c_new, False)
    out[f"s{s}/order"] = np.concatenate([bucket[f"s{s}/order"], tail], axis=1)
    out[f"s{s}/inverse"] = np.concatenate([bucket[f"s{s}/inverse"], tail], axis=1)
    neighbors = bucket[f"s{s}/neighbors"]
    out[f"s{s}/neighbors"] = rows(
      np.where(neighbors == c_old, c_new, neighbors).astype(np.int32), c_new, c_new
    )
    if s + 1 < num_stages:
      parent = bucket[f"s{s}/parent"]
      moved = np.where(parent == old[s + 1], new[s + 1], parent).astype(np.int32)
      out[f"s{s}/parent"] = rows(moved, c_new, new[s + 1])
  return out
