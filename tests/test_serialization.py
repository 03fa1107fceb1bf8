"""Voxel buckets against plain restatements of their definitions."""

import glob
import itertools
import logging
import time

import numpy as np
import pytest

from reldistill_jax import serialization as ser

PATCH = 64
CAPACITIES = (4096, 5120, 6144, 8192, 10240)
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


def stage_caps_reference(c0: int, num_stages: int, patch: int, ratio: float) -> list[int]:
  caps = []
  for s in range(num_stages):
    want = c0 * ratio**s
    cap = patch
    while cap < want - 1e-6:
      cap += patch
    caps.append(cap)
  return caps


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
  args = dict(
    token="scan-0",
    voxel_size=0.5,
    num_stages=STAGES,
    patch_size=PATCH,
    capacities=CAPACITIES,
    curves=CURVES,
    stage_ratio=0.5,
  )
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


def test_orders_round_trip_with_padding_last():
  codes = np.random.default_rng(0).integers(0, 50, (3, 40)).astype(np.uint64)  # with ties
  order, inverse = ser.orders_and_inverses(codes, 64)
  assert order.shape == inverse.shape == (3, 64) and order.dtype == inverse.dtype == np.int32
  for r in range(3):
    np.testing.assert_array_equal(order[r][inverse[r]], np.arange(64))
    np.testing.assert_array_equal(inverse[r][order[r]], np.arange(64))
    np.testing.assert_array_equal(order[r, 40:], np.arange(40, 64))
    valid = order[r, :40]
    keys = list(zip(codes[r, valid].tolist(), valid.tolist(), strict=True))
    assert keys == sorted(keys)  # ascending, ties in slot order (stable)


def test_stage_capacities():
  assert ser.stage_capacities(36864, 5, 1024, 0.5) == [36864, 18432, 9216, 5120, 3072]
  assert ser.stage_capacities(2048, 4, 1024, 0.5) == [2048, 1024, 1024, 1024]
  for c0, ratio in itertools.product((1024, 3072, 40960), (0.3, 0.5, 0.7, 1.0)):
    assert ser.stage_capacities(c0, 6, 1024, ratio) == stage_caps_reference(c0, 6, 1024, ratio)


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


def expected_schema(n, m, f, caps, r) -> dict:
  schema = {
    "point_to_voxel": ((n,), np.int32),
    "point_labels": ((n,), np.uint8),
    "features": ((caps[0], f), np.float32),
    "labels": ((caps[0],), np.uint8),
    "pairs_voxel": ((m,), np.int32),
    "pairs_camera": ((m,), np.uint8),
    "pairs_uv": ((m, 2), np.float32),
  }
  for s, cap in enumerate(caps):
    schema |= {
      f"s{s}/coords": ((cap, 3), np.int32),
      f"s{s}/mask": ((cap,), np.bool_),
      f"s{s}/order": ((r, cap), np.int32),
      f"s{s}/inverse": ((r, cap), np.int32),
      f"s{s}/neighbors": ((cap, 27), np.int32),
    }
    if s < len(caps) - 1:
      schema[f"s{s}/parent"] = ((cap,), np.int32)
  return schema


def test_bucket_keys_dtypes_and_shapes(scan, bucket):
  record, _ = bucket
  points, labels = scan
  caps = stage_caps_reference(record["capacity"], STAGES, PATCH, 0.5)
  m = len(record["pairs_voxel"])
  schema = expected_schema(len(points), m, 5, caps, len(CURVES))
  scalars = {"token", "num_points", "num_voxels", "capacity", "num_dropped_voxels"}
  assert set(record) == set(schema) | scalars
  for key, (shape, dtype) in schema.items():
    assert record[key].shape == shape and record[key].dtype == dtype, key
  assert record["token"] == "scan-0"
  assert record["num_points"] == len(points) and record["num_dropped_voxels"] == 0
  assert all(type(record[k]) is int for k in scalars - {"token"})


def test_capacity_is_the_smallest_that_fits(scan, bucket):
  record, _ = bucket
  points, _ = scan
  coords0, *_ = ser.voxelise(points[:, :3], "cartesian", 0.5)
  counts = stage_counts(coords0, STAGES)
  fits = [
    c0
    for c0 in CAPACITIES
    if all(
      n <= c for n, c in zip(counts, stage_caps_reference(c0, STAGES, PATCH, 0.5), strict=True)
    )
  ]
  assert fits and fits[0] != CAPACITIES[0]  # the scan exercises the choice
  assert record["capacity"] == fits[0]
  assert record["num_voxels"] == counts[0]
  assert [int(record[f"s{s}/mask"].sum()) for s in range(STAGES)] == counts


def test_stage_layout_pooling_and_orders(bucket):
  record, _ = bucket
  for s in range(STAGES):
    coords, mask = record[f"s{s}/coords"], record[f"s{s}/mask"]
    v, cap = int(mask.sum()), len(mask)
    assert mask[:v].all() and not mask[v:].any()
    assert not coords[v:].any()
    valid = coords[:v].astype(np.int64)
    # Orders sort each curve's codes (stage s codes are the stage-0 codes >> 3s).
    codes = {
      "z": ser.morton_encode(valid),
      "z-trans": ser.morton_encode(valid[:, [1, 0, 2]]),
      "hilbert": ser.hilbert_encode(valid, 21 - s),
      "hilbert-trans": ser.hilbert_encode(valid[:, [1, 0, 2]], 21 - s),
    }
    order, inverse = record[f"s{s}/order"], record[f"s{s}/inverse"]
    for r, curve in enumerate(CURVES):
      np.testing.assert_array_equal(order[r, v:], np.arange(v, cap))  # padding last
      assert np.all(np.diff(codes[curve][order[r, :v]].astype(np.float64)) > 0)
      np.testing.assert_array_equal(order[r][inverse[r]], np.arange(cap))
      np.testing.assert_array_equal(inverse[r][order[r]], np.arange(cap))
    if s == STAGES - 1:
      continue
    parent = record[f"s{s}/parent"]
    next_coords = record[f"s{s + 1}/coords"].astype(np.int64)
    next_v = int(record[f"s{s + 1}/mask"].sum())
    np.testing.assert_array_equal(parent[v:], len(next_coords))  # sentinel
    # The parent of a child is the next-stage voxel whose code is the child's >> 3.
    np.testing.assert_array_equal(
      ser.morton_encode(next_coords[parent[:v]]), ser.morton_encode(valid) >> np.uint64(3)
    )
    assert set(map(tuple, (valid >> 1).tolist())) == set(map(tuple, next_coords[:next_v].tolist()))


def test_neighbors_match_brute_force(bucket):
  record, _ = bucket
  offsets = list(itertools.product((-1, 0, 1), repeat=3))
  for s in range(STAGES):
    coords = record[f"s{s}/coords"]
    v, cap = int(record[f"s{s}/mask"].sum()), len(coords)
    slot = {tuple(c): i for i, c in enumerate(coords[:v].tolist())}
    expected = np.full((cap, 27), cap)
    for i, (x, y, z) in enumerate(coords[:v].tolist()):
      for j, (dx, dy, dz) in enumerate(offsets):
        expected[i, j] = slot.get((x + dx, y + dy, z + dz), cap)
    np.testing.assert_array_equal(record[f"s{s}/neighbors"], expected)
    np.testing.assert_array_equal(record[f"s{s}/neighbors"][:v, 13], np.arange(v))


def test_points_features_labels_and_pairs(scan, bucket):
  record, pairs_point = bucket
  points, labels = scan
  v, cap = record["num_voxels"], record["capacity"]
  p2v = record["point_to_voxel"]
  assert p2v.min() == 0 and p2v.max() == v - 1
  cell = np.floor(points[:, :3].astype(np.float64) / 0.5).astype(np.int64)
  np.testing.assert_array_equal(record["s0/coords"][p2v], cell - cell.min(axis=0))
  # Each voxel's features and label are those of one of its own points.
  _, kept, _, _ = ser.voxelise(points[:, :3], "cartesian", 0.5)
  np.testing.assert_array_equal(record["features"][:v], points[kept])
  np.testing.assert_array_equal(p2v[kept], np.arange(v))
  np.testing.assert_array_equal(record["labels"][:v], labels[kept])
  assert not record["features"][v:].any() and not record["labels"][v:].any()
  np.testing.assert_array_equal(record["point_labels"], labels)
  np.testing.assert_array_equal(record["pairs_voxel"], p2v[pairs_point])
  assert cap % PATCH == 0


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


def test_overflow_drops_the_farthest_voxels(scan, caplog):
  points, labels = scan
  pairs_point = np.arange(0, len(points), 7, dtype=np.int32)
  with caplog.at_level(logging.WARNING):
    record = bucket_of(
      points,
      labels,
      capacities=(4096, 5120),
      pairs_point=pairs_point,
      pairs_camera=np.zeros(len(pairs_point), np.uint8),
      pairs_uv=np.zeros((len(pairs_point), 2), np.float32),
    )
  assert "overflow" in caplog.text and "scan-0" in caplog.text
  assert record["capacity"] == 5120
  caps = stage_caps_reference(5120, STAGES, PATCH, 0.5)
  counts = [int(record[f"s{s}/mask"].sum()) for s in range(STAGES)]
  assert all(n <= c for n, c in zip(counts, caps, strict=True))

  coords_all, kept_all, p2v_all, _ = ser.voxelise(points[:, :3], "cartesian", 0.5)
  dist = np.linalg.norm(points[kept_all, :3].astype(np.float64), axis=1)
  by_dist = np.argsort(dist, kind="stable")
  v = record["num_voxels"]
  assert record["num_dropped_voxels"] == len(coords_all) - v > 0
  # The kept voxels are exactly the v nearest ...
  kept_set = set(map(tuple, record["s0/coords"][:v].tolist()))
  assert kept_set == set(map(tuple, coords_all[by_dist[:v]].tolist()))
  # ... and one more would overflow some stage.
  one_more = stage_counts(coords_all[by_dist[: v + 1]], STAGES)
  assert any(n > c for n, c in zip(one_more, caps, strict=True))
  # Points of dropped voxels map to -1, the others to their voxel.
  p2v = record["point_to_voxel"]
  dropped = np.isin(p2v_all, by_dist[v:])
  assert np.all(p2v[dropped] == -1) and np.all(p2v[~dropped] >= 0)
  np.testing.assert_array_equal(record["pairs_voxel"], p2v[pairs_point][p2v[pairs_point] >= 0])
  assert len(record["pairs_uv"]) == len(record["pairs_camera"]) == len(record["pairs_voxel"])


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
  with pytest.raises(ValueError, match="multiples of patch_size=64"):
    bucket_of(points, labels, capacities=(1000,))
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
  assert record["num_dropped_voxels"] == 0 and 10_000 < v < len(points)
  cell = np.floor(points[:, :3].astype(np.float64) / 0.1).astype(np.int64)
  np.testing.assert_array_equal(
    record["s0/coords"][record["point_to_voxel"]], cell - cell.min(axis=0)
  )
  for s in range(5):
    order, inverse = record[f"s{s}/order"], record[f"s{s}/inverse"]
    arange = np.broadcast_to(np.arange(order.shape[1]), order.shape)
    np.testing.assert_array_equal(np.take_along_axis(inverse, order, axis=1), arange)


@pytest.mark.parametrize("target", [CAPACITIES[-1], 2 * CAPACITIES[-1]])
def test_pad_bucket_equals_building_in_the_larger_capacity(scan, target):
  points, labels = scan
  small = bucket_of(points, labels)
  assert small["capacity"] < target
  padded = ser.pad_bucket(small, target, PATCH, stage_ratio=0.5)
  direct = bucket_of(points, labels, capacities=(target,))
  assert set(padded) == set(direct)
  for key, value in direct.items():
    np.testing.assert_array_equal(padded[key], value, err_msg=key)
    assert np.asarray(padded[key]).dtype == np.asarray(value).dtype, key


def test_pad_bucket_refuses_a_smaller_capacity(scan):
  small = bucket_of(*scan)
  with pytest.raises(ValueError, match="larger than the batch capacity"):
    ser.pad_bucket(small, small["capacity"] - PATCH, PATCH, stage_ratio=0.5)
