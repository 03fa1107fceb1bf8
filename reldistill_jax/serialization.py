"""Serialised voxel buckets: the geometry of the 3D student, computed once offline.

A lidar scan is quantised to a voxel grid (one point kept per voxel), its voxels
are pooled into `num_stages` encoder stages (stage s+1 voxels are the unique
`coords >> 1` of stage s), and every stage gets its space-filling-curve orders,
their inverses and a 3x3x3 neighbour map, so the model is gathers, attention
and segment sums. A bucket holds exactly its scan's voxels, V_s per stage:
the shape of a batch comes from packing (`packing.py`), not from the bucket.
numpy only: this module imports without JAX.

Conventions
  * Grid coordinates are integers shifted per scan to be non-negative
    (`coords - coords.min(0)`); curve codes are uint64 over `CODE_BITS` bits
    per axis.
  * The voxels of every stage are sorted by the Morton (z) code of that
    stage's coordinates.
  * SENTINEL: an absent neighbour holds V_s, the voxel count of the stage it
    indexes (one past its last voxel); a gather from
    `concatenate([x, zeros((1, ...))])` reads zeros for it.
  * `order[r]` lists the voxels of a stage by ascending code of curve r, and
    `inverse[r]` is its inverse permutation: `x[order[r]][inverse[r]] == x`.
  * Neighbour column j is the offset `NEIGHBOR_OFFSETS[j]` (dx, dy, dz in
    {-1, 0, 1}, x slowest); column 13 is the voxel itself.

Record keys (the output of `build_bucket`; R = len(curves), V_s voxels at stage s)
  token                 str: the scan's sample token.
  num_points            int: N, points in the original scan.
  num_voxels            int: V_0.
  counts                (num_stages,) int32: V_s of every stage.
  point_to_voxel        (N,) int32: stage-0 voxel of every original point.
  point_labels          (N,) uint8: the original per-point labels (0 = ignore),
                        for evaluation on every point.
  features              (V_0, F) float32: all channels of the point kept in
                        each voxel (x, y, z, intensity, ...).
  labels                (V_0,) uint8: label of the kept point.
  s{s}/coords           (V_s, 3) int32: grid coordinates at stage s (stage s is
                        the stage-0 grid coarsened 2**s times).
  s{s}/order            (R, V_s) int32: voxels by ascending code of each curve.
  s{s}/inverse          (R, V_s) int32: inverse permutations of `order`.
  s{s}/neighbors        (V_s, 27) int32: voxel of each 3x3x3 neighbour, V_s if absent.
  s{s}/parent           (V_s,) int32, for s < num_stages - 1: voxel in stage
                        s+1 of each voxel's parent.
  pairs_voxel           (M,) int32: stage-0 voxel of each point-to-pixel pair
                        (`point_to_voxel[pairs_point]`).
  pairs_camera          (M,) uint8: camera index of each pair.
  pairs_uv              (M, 2) float32: pixel (u = column, v = row) of each pair.
"""

import itertools
import math
from collections.abc import Sequence

import numpy as np

from reldistill_jax import errors

# Bits per axis of the curve codes: 3 * 21 = 63 bits fit a uint64. At 0.1 m a
# scan may span 2**21 * 0.1 m = 210 km, far beyond any lidar.
CODE_BITS = 21

# Bumped whenever the bucket schema or its computation changes, so that a
# store written by older code is refused rather than silently mixed.
# 3: buckets hold their voxels only (no padding to a capacity); batches are packed.
BUCKET_VERSION = 3

CURVES = ("z", "z-trans", "hilbert", "hilbert-trans")
GRIDS = ("cartesian", "cylindrical")

# Cylindrical grid default: 0.1 m radially and vertically, 0.25 degrees of
# azimuth (4.4 cm at 10 m, 22 cm at 50 m, following the lidar's density).
DEFAULT_CYLINDRICAL_VOXEL_SIZE = (0.1, 2 * math.pi / 1440, 0.1)

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


def orders_and_inverses(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sort orders of the voxels by each curve, and their inverses.

  Args:
    codes: (R, V) codes of the V voxels.

  Returns:
    (order, inverse), each (R, V) int32: `order[r]` is the voxels by ascending
    code (stable); `inverse[r]` is its inverse
    (`order[r][inverse[r]] == inverse[r][order[r]] == arange(V)`).
  """
  num_curves, num_voxels = codes.shape
  order = np.argsort(codes, axis=1, kind="stable").astype(np.int32)
  inverse = np.empty_like(order)
  slots = np.arange(num_voxels, dtype=np.int32)
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


def neighbor_map(coords: np.ndarray) -> np.ndarray:
  """Voxels of the 27 neighbours (3x3x3, centre included) of every voxel.

  Args:
    coords: (V, 3) distinct non-negative integer coordinates.

  Returns:
    (V, 27) int32: column j is the voxel at `coords + NEIGHBOR_OFFSETS[j]`, or
    V (the sentinel) when no voxel is there.
  """
  num_valid = len(coords)
  out = np.full((27, num_valid), num_valid, np.int32)  # column-major while filling
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


# ----------------------------------------------------------------------------
# Buckets.
# ----------------------------------------------------------------------------


def octants(coords: np.ndarray) -> np.ndarray:
  """(V,) uint8 octant of every voxel within its parent, 4 (x & 1) + 2 (y & 1) + (z & 1): the
  tap of a stride-2 2x2x2 convolution kernel it meets (x slowest, as `NEIGHBOR_OFFSETS`)."""
  odd = np.asarray(coords) & 1
  return (4 * odd[:, 0] + 2 * odd[:, 1] + odd[:, 2]).astype(np.uint8)


def check_bucket_config(curves: Sequence[str], num_stages: int) -> None:
  """Raises ValueError unless the bucket arguments of `build_bucket` are valid."""
  if not curves or any(c not in CURVES for c in curves) or len(set(curves)) != len(curves):
    raise ValueError(f"curves must be distinct names from {CURVES}, got {tuple(curves)}")
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")


def _check_scan(points: np.ndarray, labels, token: str) -> tuple[np.ndarray, np.ndarray]:
  """The scan's points and labels, or a DataError naming the token."""
  points = np.asarray(points)
  if points.ndim != 2 or points.shape[1] < 3:
    raise errors.DataError(f"scan {token!r}: points must have shape (N, >=3), got {points.shape}")
  num_points = len(points)
  if num_points == 0:
    raise errors.DataError(f"scan {token!r} is empty (0 points)")
  finite = np.all(np.isfinite(points[:, :3]), axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise errors.DataError(
      f"scan {token!r} has {len(bad)} points with NaN or infinite coordinates "
      f"(first at index {bad[0]})"
    )
  labels = np.zeros(num_points, np.uint8) if labels is None else np.asarray(labels)
  if labels.shape != (num_points,):
    raise errors.DataError(f"scan {token!r}: labels shape {labels.shape} != ({num_points},)")
  return points, labels


def _pool_chain(code: np.ndarray, num_stages: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Parents and first children of every stage transition, from stage-0 codes."""
  parents, first_children = [], []
  for _ in range(num_stages - 1):
    parent, first_child = pool(code)
    parents.append(parent)
    first_children.append(first_child)
    code = code[first_child] >> np.uint64(3)
  return parents, first_children


def build_bucket(
  points: np.ndarray,
  labels: np.ndarray | None = None,
  *,
  token: str = "",
  voxel_size: float | Sequence[float] = 0.1,
  grid: str = "cartesian",
  curves: Sequence[str] = CURVES,
  num_stages: int = 5,
  pairs_point: np.ndarray | None = None,
  pairs_camera: np.ndarray | None = None,
  pairs_uv: np.ndarray | None = None,
) -> dict[str, np.ndarray | str | int]:
  """Voxelises one scan into a serialised bucket (keys: module docstring).

  Args:
    points: (N, F) point channels, x, y, z first (then intensity, ...).
    labels: (N,) per-point training ids (0 = ignore), or None for zeros.
    token: the scan's sample token (stored, and named in errors).
    voxel_size: voxel size; a scalar or 3 sizes for the Cartesian grid, 3
      sizes (rho m, phi rad, z m) for the cylindrical one.
    grid: "cartesian" or "cylindrical".
    curves: the R curves of the orders, in record row order.
    num_stages: encoder stages (stage s is the grid coarsened 2**s times).
    pairs_point: (M,) point index of each point-to-pixel pair, or None.
    pairs_camera: (M,) camera of each pair.
    pairs_uv: (M, 2) pixel of each pair.

  Returns:
    The bucket record, a dict of numpy arrays (V_s rows per stage) and scalars.

  Raises:
    errors.DataError: an empty scan or non-finite coordinates, naming the token.
  """
  check_bucket_config(curves, num_stages)
  points, labels = _check_scan(points, labels, token)
  coords, kept, point_to_voxel, code = voxelise(points[:, :3], grid, voxel_size)
  parents, first_children = _pool_chain(code, num_stages)
  record = {
    "token": token,
    "num_points": len(points),
    "num_voxels": len(coords),
    "counts": np.array([len(coords)] + [len(f) for f in first_children], np.int32),
    "point_to_voxel": point_to_voxel.astype(np.int32),
    "point_labels": labels.astype(np.uint8),
    "features": points[kept].astype(np.float32),
    "labels": labels[kept].astype(np.uint8),
  }
  codes = curve_codes(coords, curves)  # (R, V0)
  for s in range(num_stages):
    order, inverse = orders_and_inverses(codes)
    record[f"s{s}/coords"] = coords.astype(np.int32)
    record[f"s{s}/order"] = order
    record[f"s{s}/inverse"] = inverse
    record[f"s{s}/neighbors"] = neighbor_map(coords)
    if s < num_stages - 1:
      record[f"s{s}/parent"] = parents[s].astype(np.int32)
      coords = coords[first_children[s]] >> 1
      codes = codes[:, first_children[s]] >> np.uint64(3)
  record.update(_pairs(point_to_voxel, pairs_point, pairs_camera, pairs_uv, token))
  return record


def _pairs(point_to_voxel, pairs_point, pairs_camera, pairs_uv, token: str) -> dict:
  """`pairs_voxel`, `pairs_camera`, `pairs_uv` of a bucket (empty without pairs)."""
  if pairs_point is None:
    return {
      "pairs_voxel": np.zeros(0, np.int32),
      "pairs_camera": np.zeros(0, np.uint8),
      "pairs_uv": np.zeros((0, 2), np.float32),
    }
  pairs_point = np.asarray(pairs_point, np.int64)
  num_points = len(point_to_voxel)
  if pairs_point.size and (pairs_point.min() < 0 or pairs_point.max() >= num_points):
    raise errors.DataError(f"scan {token!r}: pairs_point indices outside [0, {num_points})")
  return {
    "pairs_voxel": point_to_voxel[pairs_point].astype(np.int32),
    "pairs_camera": np.asarray(pairs_camera).astype(np.uint8),
    "pairs_uv": np.asarray(pairs_uv, np.float32).reshape(-1, 2),
  }
