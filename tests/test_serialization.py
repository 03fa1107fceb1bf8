"""Voxel buckets against plain restatements of their definitions."""

import glob
import itertools
import time

import numpy as np
import pytest

from reldistill_jax import serialization as ser

STAGES = 4
CURVES = ("z", "z-trans", "hilbert", "hilbert-trans")


# ----------------------------------------------------------------------------
# Restatements.
# ----------------------------------------------------------------------------


def morton_reference(x: int, y: int, z: int, bits: int = 21) -> int:
  """Bit-by-bit interleave: bit i of x, y, z at bits 3i+2, 3i+1, 3i."""
  code = 0
  for i in range(bits):
    code |= ((x >> i) & 1) << (3 * i + 2)
    code |= ((y >> i) & 1) << (3 * i + 1)
    code |= ((z >> i) & 1) << (3 * i)
  return code


def stage_counts(coords0: np.ndarray, num_stages: int) -> list[int]:
  return [len(np.unique(coords0 >> s, axis=0)) for s in range(num_stages)]


def synthetic_scan(rng: np.random.Generator, n: int = 6000) -> tuple[np.ndarray, np.ndarray]:
  """A street-like cloud: ground, two walls, a car-sized box, sparse far points."""
  parts = [
    np.c_[rng.uniform(-20, 20, (n // 2, 2)), rng.normal(-1.7, 0.02, n // 2)],
    np.c_[rng.uniform(-20, 20, n // 8), np.full(n // 8, 8.0), rng.uniform(-1.7, 4, n // 8)],
    np.c_[rng.uniform(-20, 20, n // 8), np.full(n // 8, -8.0), rng.uniform(-1.7, 4, n // 8)],
    rng.uniform([3, -2, -1.7], [7.5, 0, -0.2], (n // 8, 3)),
  ]
  far = rng.normal(size=(n - sum(len(p) for p in parts), 3))
  far = far / np.linalg.norm(far, axis=1, keepdims=True) * rng.uniform(20, 40, (len(far), 1))
  xyz = np.concatenate(parts + [far])
  intensity = rng.uniform(0, 255, (len(xyz), 1))
  ring = rng.integers(0, 32, (len(xyz), 1))
  points = np.concatenate([xyz, intensity, ring], axis=1).astype(np.float32)
  labels = rng.integers(0, 17, len(points)).astype(np.uint8)
  return points, labels


@pytest.fixture(scope="module")
def scan():
  return synthetic_scan(np.random.default_rng(0))


def bucket_of(points, labels, **kwargs):
  args = dict(token="scan-0", voxel_size=0.5, num_stages=STAGES, curves=CURVES)
  return ser.build_bucket(points, labels, **{**args, **kwargs})


@pytest.fixture(scope="module")
def bucket(scan):
  points, labels = scan
  rng = np.random.default_rng(1)
  pairs_point = rng.integers(0, len(points), 500).astype(np.int32)
  return bucket_of(
    points,
    labels,
    pairs_point=pairs_point,
    pairs_camera=rng.integers(0, 6, 500).astype(np.uint8),
    pairs_uv=rng.uniform(0, 900, (500, 2)).astype(np.float32),
  ), pairs_point


# ----------------------------------------------------------------------------
# Curves and orders.
# ----------------------------------------------------------------------------


def test_morton_matches_bit_interleave():
  rng = np.random.default_rng(0)
  coords = rng.integers(0, 1 << 21, (300, 3))
  coords[0] = (1 << 21) - 1
  coords[1] = 0
  got = ser.morton_encode(coords)
  assert got.dtype == np.uint64
  expected = [morton_reference(*map(int, c)) for c in coords]
  assert [int(g) for g in got] == expected
  np.testing.assert_array_equal(ser.morton_encode(coords >> 1), got >> np.uint64(3))


# (bits, side): the full 2**bits cube, and at 21 bits the 8**3 cube where the curve starts.
@pytest.mark.parametrize(("bits", "side"), [(1, 2), (2, 4), (3, 8), (21, 8)])
def test_hilbert_walks_the_cube_through_face_neighbours(bits, side):
  cells = np.array(list(itertools.product(range(side), repeat=3)))
  codes = ser.hilbert_encode(cells, bits)
  assert codes.dtype == np.uint64
  # The first side**3 indices cover the cube exactly once, from the origin.
  np.testing.assert_array_equal(np.sort(codes), np.arange(side**3, dtype=np.uint64))
  path = cells[np.argsort(codes)]
  np.testing.assert_array_equal(path[0], [0, 0, 0])
  steps = np.abs(np.diff(path, axis=0)).sum(axis=1)
  np.testing.assert_array_equal(steps, 1)


def test_hilbert_parent_index_is_child_index_shifted():
  rng = np.random.default_rng(0)
  for bits in (2, 5, 12, 21):
    coords = rng.integers(0, 1 << bits, (500, 3))
    np.testing.assert_array_equal(
      ser.hilbert_encode(coords, bits) >> np.uint64(3), ser.hilbert_encode(coords >> 1, bits - 1)
    )


def test_trans_curves_swap_x_and_y():
  coords = np.random.default_rng(0).integers(0, 1000, (100, 3))
  codes = ser.curve_codes(coords, CURVES)
  swapped = coords[:, [1, 0, 2]]
  assert codes.shape == (4, 100) and codes.dtype == np.uint64
  np.testing.assert_array_equal(codes[1], ser.morton_encode(swapped))
  np.testing.assert_array_equal(codes[3], ser.hilbert_encode(swapped))
  assert not np.array_equal(codes[0], codes[1])


def test_orders_round_trip():
  codes = np.random.default_rng(0).integers(0, 50, (3, 40)).astype(np.uint64)  # with ties
  order, inverse = ser.orders_and_inverses(codes)
  assert order.shape == inverse.shape == (3, 40) and order.dtype == inverse.dtype == np.int32
  for r in range(3):
    np.testing.assert_array_equal(order[r][inverse[r]], np.arange(40))
    np.testing.assert_array_equal(inverse[r][order[r]], np.arange(40))
    keys = list(zip(codes[r, order[r]].tolist(), order[r].tolist(), strict=True))
    assert keys == sorted(keys)  # ascending, ties in voxel order (stable)


# ----------------------------------------------------------------------------
# Voxelisation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("grid", ["cartesian", "cylindrical"])
def test_voxelise_keeps_the_point_nearest_the_centre(scan, grid):
  xyz = scan[0][:, :3]
  size = 0.5 if grid == "cartesian" else (0.5, 0.02, 0.5)
  coords, kept, point_to_voxel, code = ser.voxelise(xyz, grid, size)
  if grid == "cartesian":
    pos = xyz.astype(np.float64) / 0.5
  else:
    x, y, z = xyz.astype(np.float64).T
    pos = np.c_[np.hypot(x, y), np.arctan2(y, x), z] / np.array(size)
  cell = np.floor(pos).astype(np.int64)
  shifted = cell - cell.min(axis=0)
  # Every point maps to the voxel that contains it.
  np.testing.assert_array_equal(coords[point_to_voxel], shifted)
  assert len(np.unique(coords, axis=0)) == len(coords)
  assert np.all(np.diff(code.astype(np.float64)) > 0)  # slots in Morton order
  np.testing.assert_array_equal(code, ser.morton_encode(coords))
  # Brute force: per voxel, the point nearest its centre (lowest index on ties).
  dist = np.square(pos - cell - 0.5).sum(axis=1)
  best = {}
  for i, key in enumerate(map(tuple, shifted.tolist())):
    if key not in best or dist[i] < dist[best[key]]:
      best[key] = i
  assert {tuple(c): int(k) for c, k in zip(coords.tolist(), kept, strict=True)} == best


def test_ties_go_to_the_lowest_index():
  # Exactly representable: both first points lie 0.125 from the centre 0.25.
  xyz = np.array([[0.375, 0.25, 0.25], [0.125, 0.25, 0.25], [0.0, 0.0, 0.0]])
  _, kept, point_to_voxel, _ = ser.voxelise(xyz, "cartesian", 0.5)
  assert kept.tolist() == [0] and point_to_voxel.tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------
# Buckets.
# ----------------------------------------------------------------------------


def expected_schema(n, m, f, counts, r) -> dict:
  schema = {
    "counts": ((len(counts),), np.int32),
    "point_to_voxel": ((n,), np.int32),
    "point_labels": ((n,), np.uint8),
    "features": ((counts[0], f), np.float32),
    "labels": ((counts[0],), np.uint8),
    "pairs_voxel": ((m,), np.int32),
    "pairs_camera": ((m,), np.uint8),
    "pairs_uv": ((m, 2), np.float32),
  }
  for s, v in enumerate(counts):
    schema |= {
      f"s{s}/coords": ((v, 3), np.int32),
      f"s{s}/order": ((r, v), np.int32),
      f"s{s}/inverse": ((r, v), np.int32),
      f"s{s}/neighbors": ((v, 27), np.int32),
    }
    if s < len(counts) - 1:
      schema[f"s{s}/parent"] = ((v,), np.int32)
  return schema


def test_bucket_keys_dtypes_and_shapes(scan, bucket):
  record, _ = bucket
  points, labels = scan
  coords0, *_ = ser.voxelise(points[:, :3], "cartesian", 0.5)
  counts = stage_counts(coords0, STAGES)
  m = len(record["pairs_voxel"])
  schema = expected_schema(len(points), m, 5, counts, len(CURVES))
  scalars = {"token", "num_points", "num_voxels"}
  assert set(record) == set(schema) | scalars
  for key, (shape, dtype) in schema.items():
    assert record[key].shape == shape and record[key].dtype == dtype, key
  assert record["token"] == "scan-0" and record["counts"].tolist() == counts
  assert record["num_points"] == len(points) and record["num_voxels"] == counts[0]
  assert all(type(record[k]) is int for k in scalars - {"token"})


def test_stage_layout_pooling_and_orders(bucket):
  record, _ = bucket
  for s in range(STAGES):
    coords = record[f"s{s}/coords"].astype(np.int64)
    v = len(coords)
    # Orders sort each curve's codes (stage s codes are the stage-0 codes >> 3s).
    codes = {
      "z": ser.morton_encode(coords),
      "z-trans": ser.morton_encode(coords[:, [1, 0, 2]]),
      "hilbert": ser.hilbert_encode(coords, 21 - s),
      "hilbert-trans": ser.hilbert_encode(coords[:, [1, 0, 2]], 21 - s),
    }
    assert np.all(np.diff(codes["z"].astype(np.float64)) > 0)  # voxels in Morton order
    order, inverse = record[f"s{s}/order"], record[f"s{s}/inverse"]
    for r, curve in enumerate(CURVES):
      assert np.all(np.diff(codes[curve][order[r]].astype(np.float64)) > 0)
      np.testing.assert_array_equal(order[r][inverse[r]], np.arange(v))
      np.testing.assert_array_equal(inverse[r][order[r]], np.arange(v))
    if s == STAGES - 1:
      continue
    parent = record[f"s{s}/parent"]
    next_coords = record[f"s{s + 1}/coords"].astype(np.int64)
    assert 0 <= parent.min() and parent.max() < len(next_coords)
    # The parent of a child is the next-stage voxel whose code is the child's >> 3.
    np.testing.assert_array_equal(
      ser.morton_encode(next_coords[parent]), ser.morton_encode(coords) >> np.uint64(3)
    )
    assert set(map(tuple, (coords >> 1).tolist())) == set(map(tuple, next_coords.tolist()))


def test_neighbors_match_brute_force(bucket):
  record, _ = bucket
  offsets = list(itertools.product((-1, 0, 1), repeat=3))
  for s in range(STAGES):
    coords = record[f"s{s}/coords"]
    v = len(coords)
    slot = {tuple(c): i for i, c in enumerate(coords.tolist())}
    expected = np.full((v, 27), v)  # the sentinel: V_s
    for i, (x, y, z) in enumerate(coords.tolist()):
      for j, (dx, dy, dz) in enumerate(offsets):
        expected[i, j] = slot.get((x + dx, y + dy, z + dz), v)
    np.testing.assert_array_equal(record[f"s{s}/neighbors"], expected)
    np.testing.assert_array_equal(record[f"s{s}/neighbors"][:, 13], np.arange(v))


def test_points_features_labels_and_pairs(scan, bucket):
  record, pairs_point = bucket
  points, labels = scan
  v = record["num_voxels"]
  p2v = record["point_to_voxel"]
  assert p2v.min() == 0 and p2v.max() == v - 1
  cell = np.floor(points[:, :3].astype(np.float64) / 0.5).astype(np.int64)
  np.testing.assert_array_equal(record["s0/coords"][p2v], cell - cell.min(axis=0))
  # Each voxel's features and label are those of one of its own points.
  _, kept, _, _ = ser.voxelise(points[:, :3], "cartesian", 0.5)
  np.testing.assert_array_equal(record["features"], points[kept])
  np.testing.assert_array_equal(p2v[kept], np.arange(v))
  np.testing.assert_array_equal(record["labels"], labels[kept])
  np.testing.assert_array_equal(record["point_labels"], labels)
  np.testing.assert_array_equal(record["pairs_voxel"], p2v[pairs_point])


def test_bucket_is_deterministic_and_order_free(scan):
  points, labels = scan
  first = bucket_of(points, labels)
  again = bucket_of(points, labels)
  perm = np.random.default_rng(3).permutation(len(points))
  shuffled = bucket_of(points[perm], labels[perm])
  for key, value in first.items():
    if key in ("point_to_voxel", "point_labels"):
      np.testing.assert_array_equal(shuffled[key][np.argsort(perm)], value)
    else:
      np.testing.assert_array_equal(shuffled[key], value)
    np.testing.assert_array_equal(again[key], value)


def test_scan_without_pairs_or_labels(scan):
  points, _ = scan
  record = bucket_of(points[:, :4], None)
  assert record["pairs_voxel"].shape == (0,) and record["pairs_uv"].shape == (0, 2)
  assert record["features"].shape[1] == 4 and not record["point_labels"].any()


def test_bad_inputs_are_refused(scan):
  points, labels = scan
  bad = points.copy()
  bad[10, 1] = np.nan
  with pytest.raises(ValueError, match="scan 'scan-0' has 1 points with NaN or infinite"):
    bucket_of(bad, labels)
  bad[10, 1] = np.inf
  with pytest.raises(ValueError, match="'scan-0'.*NaN or infinite"):
    bucket_of(bad, labels)
  with pytest.raises(ValueError, match="scan 'scan-0' is empty"):
    bucket_of(points[:0], labels[:0])
  with pytest.raises(ValueError, match="num_stages must be >= 1"):
    bucket_of(points, labels, num_stages=0)
  with pytest.raises(ValueError, match="curves"):
    bucket_of(points, labels, curves=("z", "peano"))
  with pytest.raises(ValueError, match="spans"):
    bucket_of(points * np.float32(1e6), labels)


def test_real_nuscenes_scan_is_fast_and_consistent(realdata):
  (path,) = glob.glob(str(realdata / "mmdetection3d-nuscenes-demo/samples/LIDAR_TOP/*.pcd.bin"))
  points = np.fromfile(path, np.float32).reshape(-1, 5)
  start = time.perf_counter()
  record = ser.build_bucket(points, None, token="nuscenes")
  elapsed = time.perf_counter() - start
  assert elapsed < 1.0, f"one nuScenes scan took {elapsed:.2f} s"
  v = record["num_voxels"]
  assert 10_000 < v < len(points)
  # The counts of BENCHMARKS.md for this keyframe at 0.1 m.
  assert record["counts"].tolist() == [17885, 12614, 7927, 4495, 2310]
  cell = np.floor(points[:, :3].astype(np.float64) / 0.1).astype(np.int64)
  np.testing.assert_array_equal(
    record["s0/coords"][record["point_to_voxel"]], cell - cell.min(axis=0)
  )
  for s in range(5):
    order, inverse = record[f"s{s}/order"], record[f"s{s}/inverse"]
    arange = np.broadcast_to(np.arange(order.shape[1]), order.shape)
    np.testing.assert_array_equal(np.take_along_axis(inverse, order, axis=1), arange)
