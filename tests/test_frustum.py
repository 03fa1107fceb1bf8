"""The crop of a scan to some of its cameras' frustums (ScaLR's one camera a scan)."""

import numpy as np
import pytest
from conftest import pretrain_config

from reldistill_jax import frustum, input_pipeline, records, runtime, serialization, train
from reldistill_jax.models import waffleiron_inputs


@pytest.fixture(scope="module")
def bucket(small_training_data):
  """A real bucket of the synthetic world (2 stages, pairs with 6 cameras), with a kNN map."""
  record = dict(records.ShardedReader(small_training_data["buckets"])[0])
  record["knn"] = waffleiron_inputs.knn_indices(record["features"][:, :3], 16)
  return record


def _check_structure(out: dict) -> None:
  """A bucket's invariants, restated from its coordinates (serialization's docstring)."""
  stages = len(out["counts"])
  for s in range(stages):
    n = int(out["counts"][s])
    coords = out[f"s{s}/coords"]
    assert coords.shape == (n, 3) and len(np.unique(coords, axis=0)) == n
    for row, inverse in zip(out[f"s{s}/order"], out[f"s{s}/inverse"], strict=True):
      assert sorted(row.tolist()) == list(range(n))
      np.testing.assert_array_equal(row[inverse], np.arange(n))
    where = {tuple(c): i for i, c in enumerate(coords.tolist())}
    for v in range(n):
      for j, offset in enumerate(serialization.NEIGHBOR_OFFSETS):
        expected = where.get(tuple((coords[v] + offset).tolist()), n)
        assert out[f"s{s}/neighbors"][v, j] == expected
    if s + 1 < stages:
      parent = out[f"s{s}/parent"]
      np.testing.assert_array_equal(out[f"s{s + 1}/coords"][parent], coords >> 1)
      assert len(np.unique(parent)) == out["counts"][s + 1]  # every parent holds a child


def test_a_crop_keeps_the_cameras_voxels_and_rebuilds_the_bucket(bucket):
  camera = int(np.bincount(bucket["pairs_camera"]).argmax())
  out = frustum.crop(bucket, [camera])
  kept = np.unique(bucket["pairs_voxel"][bucket["pairs_camera"] == camera])
  assert out["num_voxels"] == len(kept) < bucket["num_voxels"]
  np.testing.assert_array_equal(out["features"], bucket["features"][kept])
  np.testing.assert_array_equal(out["labels"], bucket["labels"][kept])
  # Every pair of the camera, and only those, on the voxel that holds its point.
  mine = bucket["pairs_camera"] == camera
  assert np.all(out["pairs_camera"] == camera) and len(out["pairs_camera"]) == mine.sum()
  np.testing.assert_array_equal(out["features"][out["pairs_voxel"]],
                                bucket["features"][bucket["pairs_voxel"][mine]])  # fmt: skip
  np.testing.assert_array_equal(out["pairs_uv"], bucket["pairs_uv"][mine])
  np.testing.assert_array_equal(out["knn"], waffleiron_inputs.knn_indices(out["features"][:, :3]))
  _check_structure(out)
  # The coarser stage holds exactly the parents of the kept voxels.
  assert {tuple(c) for c in out["s1/coords"].tolist()} == {
    tuple(c) for c in (bucket["s0/coords"][kept] >> 1).tolist()
  }


def test_the_whole_scan_is_its_own_crop(bucket):
  out = frustum.crop(bucket, np.unique(bucket["pairs_camera"]).tolist())
  covered = np.unique(bucket["pairs_voxel"])
  assert out["num_voxels"] == len(covered)
  _check_structure(out)


def test_training_crops_to_one_camera_chosen_per_seed_and_step(bucket):
  transform = input_pipeline.Transform(64, 1.0, grid=(14, 26), cameras_per_scan=1)
  drawn = []
  for seed in range(8):  # the pipeline's generator of (seed, pack, slot)
    example = transform(bucket, np.random.default_rng((seed, 3, 0)))
    cameras = np.unique(example["pairs_camera"][example["pairs_mask"]])
    assert len(cameras) == 1
    again = transform(bucket, np.random.default_rng((seed, 3, 0)))
    np.testing.assert_array_equal(again["features"], example["features"])
    assert example["s0/order"].shape[1] == len(example["features"]) < bucket["num_voxels"]
    drawn.append(int(cameras[0]))
  assert len(set(drawn)) > 1, drawn  # the camera changes with the seed (and the step)
  whole = transform(bucket)  # evaluation: no generator, no crop
  assert len(whole["features"]) == bucket["num_voxels"]


def test_packs_are_planned_on_each_scans_largest_crop(small_training_data):
  store = records.ShardedReader(small_training_data["buckets"])
  largest = np.array([frustum.largest_crop(store[i]) for i in range(len(store))])
  np.testing.assert_array_equal(frustum.planning_sizes(store, 2, 1), largest)
  whole = frustum.planning_sizes(store, 2, 0)
  np.testing.assert_array_equal(whole, store.sizes[:, :2])
  assert np.all(largest < whole)
  np.testing.assert_array_equal(frustum.planning_sizes(store, 2, 2), whole)  # no bound for 2


def test_pretraining_on_one_camera_a_scan_runs_in_smaller_packs(small_training_data, tmp_path):
  config = pretrain_config(small_training_data, num_steps=2, **{"input.cameras_per_scan": 1})
  store = records.ShardedReader(small_training_data["buckets"])
  cropped = runtime.pack_budgets(config, store, 2, cameras_per_scan=1)
  whole = runtime.pack_budgets(config, store, 2)
  assert all(c < w for c, w in zip(cropped.tokens, whole.tokens, strict=True))
  out = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(out["measurements"]["loss"]) and out["measurements"]["pairs"] > 0


def test_scalrs_flip_mirrors_one_axis_two_times_in_three():
  xyz = np.array([[1.0, 2.0, 3.0]], np.float32)
  augment = input_pipeline.Augment(rotate=False, flip=True, scale=(1.0, 1.0), flip_one=2 / 3)
  seen = [
    tuple(input_pipeline._augment(xyz, augment, np.random.default_rng(i))[0]) for i in range(3000)
  ]
  counts = {s: seen.count(s) for s in set(seen)}
  assert set(counts) == {(1.0, 2.0, 3.0), (-1.0, 2.0, 3.0), (1.0, -2.0, 3.0)}  # never both
  for flipped in ((-1.0, 2.0, 3.0), (1.0, -2.0, 3.0)):
    assert abs(counts[flipped] / 3000 - 1 / 3) < 0.03
