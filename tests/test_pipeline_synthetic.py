"""The synthetic world through the builder and the voxeliser, read back by TFDS and grain."""

import io
import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import SYNTHETIC_BUILDER as BUILDER
from PIL import Image

from configs import default
from data_prep.builders import data_source
from reldistill_jax import classes, errors, pipeline, records


def test_splits_follow_the_scene_names(pipeline):
  info = tfds.builder_from_directory(
    str(pipeline["tfds"] / "nuscenes_lidarseg" / "v1.0-synthetic" / "1.0.0")
  ).info
  splits = {name: split.num_examples for name, split in info.splits.items()}
  assert splits["train"] == 4 and splits["val"] == 2 and splits["train_1pct"] == 2
  assert splits["train_parametrize"] + splits.get("train_verify", 0) == splits["train"]


def test_builder_records_of_the_world(pipeline):
  source = tfds.data_source(BUILDER, split="train", data_dir=str(pipeline["tfds"]))
  record = source[0]
  n = len(record["points"])
  assert 25_000 < n < 36_000 and record["points"].shape == (n, 5)
  assert record["has_labels"] and record["labels"].shape == (n,)
  assert set(np.unique(record["labels"])) <= set(range(17))
  # road, manmade and vegetation are among the commonest classes.
  counts = np.bincount(record["labels"], minlength=17)
  assert counts[11] + counts[15] + counts[16] > 0.4 * n
  per_camera = np.bincount(record["pairs_camera"], minlength=6)
  assert np.all(per_camera > 500), per_camera
  image = Image.open(io.BytesIO(record["images"][0]))
  assert image.size == (1600, 900) and image.format == "JPEG"


def test_pairs_land_on_pixels_of_their_class(pipeline):
  """Builder pairs (full projection chain) agree with the rendered class maps."""
  world = pipeline["world"]
  meta = json.loads((world / "synthetic" / "meta.json").read_text())
  scale = meta["classmap"]["scale"]
  for record in data_source(pipeline["tfds"], BUILDER, "val"):
    raw = np.fromfile(
      world / "lidarseg" / "v1.0-synthetic" / f"{record['lidar_token'].decode()}_lidarseg.bin",
      np.uint8,
    )
    agree, total = 0, 0
    for cam in range(len(classes.NUSCENES_CAMERAS)):
      token = record["camera_tokens"][cam].decode()
      classmap = np.asarray(Image.open(world / "synthetic" / "classmaps" / f"{token}.png"))
      sel = record["pairs_camera"] == cam
      uv = record["pairs_uv"][sel]
      rows = np.minimum((uv[:, 1] * scale).astype(int), classmap.shape[0] - 1)
      cols = np.minimum((uv[:, 0] * scale).astype(int), classmap.shape[1] - 1)
      agree += np.sum(classmap[rows, cols] == raw[record["pairs_point"][sel]])
      total += sel.sum()
    assert agree / total > 0.9, agree / total


def test_buckets_read_back_through_grain(pipeline):
  reader = records.ShardedReader(str(pipeline["buckets"]), expected_config={"builder": BUILDER})
  assert len(reader) == 4
  tfds_train = data_source(pipeline["tfds"], BUILDER, "train")
  assert reader.tokens == [r["token"].decode() for r in tfds_train]

  def summary(bucket):
    v = bucket["num_voxels"]
    return {"pairs_valid": np.all((bucket["pairs_voxel"] >= 0) & (bucket["pairs_voxel"] < v))}

  dataset = grain.MapDataset.source(reader).map(summary)
  rows = list(dataset)
  assert len(rows) == 4 and all(r["pairs_valid"] for r in rows)
  for bucket, scan in zip(reader, tfds_train, strict=True):
    assert bucket["features"].shape == (bucket["num_voxels"], 5)
    assert np.all(bucket["point_to_voxel"] >= 0) and bucket["has_labels"]
    np.testing.assert_array_equal(bucket["image_sizes"], scan["image_sizes"])
    # Every pair of the builder record is carried over to its point's voxel.
    np.testing.assert_array_equal(
      bucket["pairs_voxel"], bucket["point_to_voxel"][scan["pairs_point"]]
    )
    np.testing.assert_array_equal(bucket["pairs_uv"], scan["pairs_uv"])
    np.testing.assert_array_equal(bucket["point_labels"], scan["labels"])
    # A voxel takes the label of its kept point: a pair's voxel label is its
    # point's label except where one 0.1 m voxel straddles two objects.
    pair_agree = bucket["labels"][bucket["pairs_voxel"]] == scan["labels"][scan["pairs_point"]]
    assert pair_agree.mean() > 0.95, pair_agree.mean()


def test_grain_batches_the_builder_source(pipeline):
  source = data_source(pipeline["tfds"], BUILDER, "train")
  dataset = (
    grain.MapDataset.source(source)
    .shuffle(seed=0)
    .map(lambda r: {"n": np.int32(len(r["points"])), "token": r["token"]})
    .batch(2)
  )
  batches = list(dataset)
  assert len(batches) == 2 and batches[0]["n"].shape == (2,)


@pytest.fixture(scope="module")
def lidar_only(tmp_path_factory) -> dict:
  """The default's data stages on a 3-scene, 1-keyframe world of KITTI's sensor, no cameras."""
  config = default.get_config("runlocal")
  world = config.data.world
  world.scenes, world.samples_per_scene, world.seed = 3, 1, 5
  world.sensor, world.cameras = "hdl64", False
  config.data.workers = 1
  return pipeline.prepare_synthetic_data(config, tmp_path_factory.mktemp("lidar_only"))


def test_a_lidar_only_world_gets_buckets_only(lidar_only):
  for split, scans in (("train", 2), ("val", 1), ("train_1pct", 1)):
    assert len(records.ShardedReader(str(lidar_only[f"buckets/{split}"]))) == scans, split
  for split in pipeline.FEATURE_SPLITS:
    assert not lidar_only[f"features/{split}"].exists()
  assert not lidar_only["text"].exists()
  meta = json.loads((lidar_only["world"] / "synthetic" / "meta.json").read_text())
  assert meta["cameras"] == [] and meta["lidar"]["model"] == "Velodyne HDL-64E"


def test_lidar_only_records_have_labels_and_no_pairs(lidar_only):
  builder = lidar_only["builder"]
  for split in ("train", "val", "train_1pct"):
    reader = records.ShardedReader(str(lidar_only[f"buckets/{split}"]))
    for scan, bucket in zip(data_source(lidar_only["tfds"], builder, split), reader, strict=True):
      n = len(scan["points"])
      rings = np.unique(scan["points"][:, 4])
      assert scan["points"].shape == (n, 5) and np.array_equal(rings, np.arange(64))
      assert scan["has_labels"] and scan["labels"].shape == (n,) and scan["labels"].max() > 0
      for key, shape in (("pairs_point", (0,)), ("pairs_uv", (0, 2)), ("images", (0,))):
        assert scan[key].shape == shape, key
      assert scan["intrinsics"].shape == (0, 3, 3) and scan["image_sizes"].shape == (0, 2)
      assert bucket["has_labels"] and bucket["image_sizes"].shape == (0, 2)
      assert len(bucket["pairs_voxel"]) == 0 and bucket["pairs_uv"].shape == (0, 2)
      np.testing.assert_array_equal(bucket["point_labels"], scan["labels"])
      assert bucket["features"].shape == (bucket["num_voxels"], 5)


def test_the_embedded_default_needs_cameras(tmp_path):
  config = default.get_config("runlocal")
  config.data.world.cameras = False
  with pytest.raises(errors.ConfigError, match="cameras"):
    pipeline.run_default(config, tmp_path)
  assert not any(tmp_path.iterdir())
