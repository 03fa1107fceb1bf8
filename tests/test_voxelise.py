"""The voxelise CLI on built TFDS splits: buckets, resume, refusals, pairs."""

import functools
import os
import pathlib
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

from data_prep import build, voxelise
from data_prep.builders import data_source
from reldistill_jax import errors, frustum, input_pipeline, records, serialization

REPO = pathlib.Path(__file__).resolve().parents[1]
PARAMS = dict(num_stages=3, records_per_shard=2)
# SemanticKITTI raw ids the synthetic scans use (car, road, building, vegetation).
RAW_IDS = np.array([10, 40, 50, 70], np.uint32)


def kitti_scan(rng: np.random.Generator, n: int = 4000) -> np.ndarray:
  """A small street: ground and two walls, x, y, z, remission."""
  ground = np.c_[rng.uniform(-15, 15, (n // 2, 2)), rng.normal(-1.7, 0.02, n // 2)]
  walls = np.c_[
    rng.uniform(-15, 15, n // 2), rng.choice([-6.0, 6.0], n // 2), rng.uniform(-1.7, 3, n // 2)
  ]
  return np.c_[np.r_[ground, walls], rng.uniform(0, 1, n)].astype(np.float32)


@pytest.fixture(scope="module")
def kitti(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
  """A built SemanticKITTI folder of synthetic scans: val = 08 (3 scans)."""
  tmp = tmp_path_factory.mktemp("kitti")
  rng = np.random.default_rng(0)
  scans = {}
  for seq, frames in (("08", range(3)), ("00", range(2))):
    for frame in frames:
      folder = tmp / "raw" / "sequences" / seq
      (folder / "velodyne").mkdir(parents=True, exist_ok=True)
      (folder / "labels").mkdir(parents=True, exist_ok=True)
      points = kitti_scan(rng)
      points.tofile(folder / "velodyne" / f"{frame:06d}.bin")
      rng.choice(RAW_IDS, len(points)).tofile(folder / "labels" / f"{frame:06d}.label")
      scans[f"{seq}/{frame:06d}"] = points
  build.build("semantic_kitti", str(tmp / "raw"), str(tmp / "tfds"))
  return tmp / "tfds", scans


def config_of(split="val", num_scans=3, **overrides):
  return voxelise.bucket_config("semantic_kitti", split, num_scans, **{**PARAMS, **overrides})


def test_cli_writes_buckets_that_grain_reads(kitti, tmp_path):
  data_dir, scans = kitti
  out = tmp_path / "buckets"
  args = ["--data_dir", data_dir, "--builder", "semantic_kitti", "--split", "val", "--out", out]
  args += ["--num_stages=3", "--records_per_shard=2", "--workers=2"]
  result = subprocess.run(
    [sys.executable, "-m", "data_prep.voxelise", *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "3 buckets in 2 shards" in result.stdout
  reader = records.ShardedReader(out, expected_config=config_of())
  assert reader.tokens == ["08/000000", "08/000001", "08/000002"]
  # Each bucket is `build_bucket` of the scan the builder stored.
  source = data_source(data_dir, "semantic_kitti", "val")
  for i, token in enumerate(reader.tokens):
    expected = serialization.build_bucket(
      scans[token],
      source[i]["labels"],
      token=token,
      voxel_size=0.1,
      num_stages=3,
    )
    got = reader.get(token)
    assert set(got) == set(expected) | {"has_labels", "image_sizes"}
    assert got["has_labels"] and got["image_sizes"].shape == (0, 2)  # no cameras
    for key, value in expected.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
      assert np.asarray(got[key]).dtype == np.asarray(value).dtype, key
    assert got["point_labels"].any() and got["pairs_voxel"].shape == (0,)
  # The manifest lists every scan's voxels per stage, its pairs and its largest one-camera
  # crop, what packing reads: without cameras, the whole scan.
  counts = list(grain.MapDataset.source(reader).map(lambda r: [*r["counts"], 0, *r["counts"]]))
  np.testing.assert_array_equal(reader.sizes, counts)


def test_rerun_resumes_and_refuses_another_config(kitti, tmp_path):
  data_dir, _ = kitti
  out = tmp_path / "buckets"
  open_source = functools.partial(
    voxelise.open_builder_split, str(data_dir), "semantic_kitti", "val"
  )
  voxelise.voxelise_split(open_source, str(out), config_of())
  shard0, shard1 = (out / f"buckets-0000{i}-of-00002.array_record" for i in range(2))
  mtime0 = os.path.getmtime(shard0)
  os.remove(shard1)
  manifest = voxelise.voxelise_split(open_source, str(out), config_of())
  assert os.path.getmtime(shard0) == mtime0 and shard1.exists()
  assert manifest["complete"] and manifest["num_records"] == 3
  assert len(records.ShardedReader(out)) == 3
  with pytest.raises(records.ConfigMismatchError, match=f"{out}.*\\['voxel_size'\\]"):
    voxelise.voxelise_split(open_source, str(out), config_of(voxel_size=0.2))


@pytest.mark.parametrize(
  ("points", "message"),
  [
    (np.array([[0.0, 1.0, np.nan, 0.0], [1.0, 1.0, 1.0, 0.0]], np.float32), "'08/bad'.*NaN"),
    (np.array([[0.0, np.inf, 0.0, 0.0]], np.float32), "'08/bad'.*infinite"),
    (np.zeros((0, 4), np.float32), "'08/bad' is empty"),
  ],
)
def test_bad_scans_stop_the_run(tmp_path, points, message):
  good = {"token": b"08/good", "points": kitti_scan(np.random.default_rng(1))}
  source = [good, {"token": b"08/bad", "points": points, "has_labels": False}]
  with pytest.raises(ValueError, match=message):
    voxelise.voxelise_split(lambda: source, str(tmp_path), config_of(num_scans=2))
  with pytest.raises(records.RecordError, match="incomplete"):
    records.ShardedReader(tmp_path)


def test_real_nuscenes_keyframe_keeps_its_pairs(realdata, tmp_path, caplog):
  root = tmp_path / "nuscenes"
  shutil.copytree(realdata / "mmdetection3d-nuscenes-demo", root)
  caplog.set_level("WARNING")
  build.build("nuscenes_lidarseg", str(root), str(tmp_path / "tfds"))
  # The demo dataroot has no lidarseg/ folder: the build says so, naming what is missing.
  assert "split train: 1 of 1 scans have no labels" in caplog.text
  assert "lidarseg/v1.0-mini-subset/<token>_lidarseg.bin" in caplog.text
  builder = "nuscenes_lidarseg/v1.0-mini-subset"
  open_source = functools.partial(
    voxelise.open_builder_split, str(tmp_path / "tfds"), builder, "train"
  )
  config = voxelise.bucket_config(builder, "train", 1)
  caplog.clear()
  voxelise.voxelise_split(open_source, str(tmp_path / "buckets"), config)
  assert "1 of 1 scans of nuscenes_lidarseg/v1.0-mini-subset split train have no labels" in (
    caplog.text
  )
  store = records.ShardedReader(tmp_path / "buckets")
  assert store.stats == {"labelled_scans": 0}
  # Fine-tuning and evaluation refuse it; pretraining does not ask.
  for use, every in (("fine-tuning", False), ("evaluation", True)):
    with pytest.raises(errors.DataError, match=f"0 of 1 scans have labels, and {use} needs"):
      input_pipeline.require_labels(store, use, every)
  scan = open_source()[0]
  bucket = records.ShardedReader(tmp_path / "buckets", expected_config=config)[0]
  assert bucket["token"] == scan["token"].decode()
  p2v = bucket["point_to_voxel"]
  assert len(scan["pairs_point"]) > 10_000
  np.testing.assert_array_equal(bucket["pairs_voxel"], p2v[scan["pairs_point"]])
  np.testing.assert_array_equal(bucket["pairs_camera"], scan["pairs_camera"])
  np.testing.assert_array_equal(bucket["pairs_uv"], scan["pairs_uv"])
  np.testing.assert_array_equal(bucket["point_labels"], scan["labels"])
  assert bucket["features"].shape == (bucket["num_voxels"], 5)
  # Its largest one-camera crop, from the crops themselves: a fraction of the scan.
  cameras = np.unique(bucket["pairs_camera"]).tolist()
  crops = np.array([frustum.crop(bucket, [c])["counts"] for c in cameras])
  assert len(cameras) == 6 and np.all(crops.max(0) < bucket["counts"])
  expected = [*bucket["counts"], len(scan["pairs_point"]), *crops.max(0)]
  assert store.sizes.tolist() == [expected]
