"""The nuScenes builder on the real keyframe, the label map, and bad inputs."""

import contextlib
import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import build, nuscenes
from data_prep.builders import data_source, nuscenes_lidarseg
from reldistill_jax import classes, errors

DEMO = "mmdetection3d-nuscenes-demo"
VERSION = "v1.0-mini-subset"
SAMPLE = "ca9a282c9e77460f8360f564131a8af5"

# PROTOCOLS.md section 1, restated: lidarseg category name -> training id.
PROTOCOL_NUSCENES_MAP = {
    "noise": 0, "animal": 0, "human.pedestrian.adult": 7, "human.pedestrian.child": 7,
    "human.pedestrian.construction_worker": 7, "human.pedestrian.personal_mobility": 0,
    "human.pedestrian.police_officer": 7, "human.pedestrian.stroller": 0,
    "human.pedestrian.wheelchair": 0, "movable_object.barrier": 1, "movable_object.debris": 0,
    "movable_object.pushable_pullable": 0, "movable_object.trafficcone": 8,
    "static_object.bicycle_rack": 0, "vehicle.bicycle": 2, "vehicle.bus.bendy": 3,
    "vehicle.bus.rigid": 3, "vehicle.car": 4, "vehicle.construction": 5,
    "vehicle.emergency.ambulance": 0, "vehicle.emergency.police": 0, "vehicle.motorcycle": 6,
    "vehicle.trailer": 9, "vehicle.truck": 10, "flat.driveable_surface": 11, "flat.other": 12,
    "flat.sidewalk": 13, "flat.terrain": 14, "static.manmade": 15, "static.other": 0,
    "static.vegetation": 16, "vehicle.ego": 0,
}  # fmt: skip


@pytest.fixture()
def dataroot(realdata, tmp_path) -> pathlib.Path:
  """A writable copy of the real one-keyframe dataroot."""
  root = tmp_path / "nuscenes"
  shutil.copytree(realdata / DEMO, root)
  for path in root.rglob("*"):
    path.chmod(0o755 if path.is_dir() else 0o644)
  return root


@pytest.fixture(scope="module")
def built(realdata, tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """The real keyframe built once through the CLI function."""
  tmp = tmp_path_factory.mktemp("built")
  root = tmp / "nuscenes"
  shutil.copytree(realdata / DEMO, root)
  build.build("nuscenes_lidarseg", str(root), str(tmp / "tfds"))
  record = data_source(tmp / "tfds", f"nuscenes_lidarseg/{VERSION}", "train")[0]
  return tmp / "tfds", record


def test_record_fields_shapes_and_dtypes(built):
  _, r = built
  n, m = len(r["points"]), len(r["pairs_point"])
  assert r["token"] == SAMPLE.encode()
  assert r["points"].shape == (34688, 5) and r["points"].dtype == np.float32
  assert r["labels"].shape == (n,) and r["labels"].dtype == np.uint8
  assert r["has_labels"] is False or r["has_labels"] == np.False_  # no lidarseg file shipped
  assert r["pairs_point"].dtype == np.int32 and r["pairs_camera"].shape == (m,)
  assert r["pairs_camera"].dtype == np.uint8 and r["pairs_uv"].shape == (m, 2)
  assert r["pairs_uv"].dtype == np.float32
  assert r["intrinsics"].shape == (6, 3, 3) and r["image_sizes"].tolist() == [[900, 1600]] * 6
  assert r["images"].shape == (6,) and r["camera_tokens"].shape == (6,)


def test_pair_counts_match_the_devkit(built, realdata):
  _, r = built
  calib = json.loads((realdata / DEMO / "calib.json").read_text())
  expected = [
    calib["reference_projection_counts"][cam]["devkit_criterion_depth_gt_1m_and_1<u<W-1_1<v<H-1"]
    for cam in classes.NUSCENES_CAMERAS
  ]
  assert np.bincount(r["pairs_camera"], minlength=6).tolist() == expected


def test_pairs_match_an_independent_projection(built, realdata):
  """uv from calib.json's lidar2cam (the mmdetection3d matrices), not our chain."""
  _, r = built
  calib = json.loads((realdata / DEMO / "calib.json").read_text())
  xyz = r["points"][:, :3].astype(np.float64)
  for cam_index, cam in enumerate(classes.NUSCENES_CAMERAS):
    sensor = calib["sensors"][cam]
    lidar2cam = np.array(sensor["lidar2cam_4x4"])
    k = np.array(sensor["intrinsic_K"])
    p = xyz @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]
    uv = (p @ k.T)[:, :2] / (p @ k.T)[:, 2:]
    keep = (p[:, 2] > 1) & (uv[:, 0] > 1) & (uv[:, 0] < 1599) & (uv[:, 1] > 1) & (uv[:, 1] < 899)
    sel = r["pairs_camera"] == cam_index
    np.testing.assert_array_equal(r["pairs_point"][sel], np.flatnonzero(keep))
    np.testing.assert_allclose(r["pairs_uv"][sel], uv[keep], atol=1e-3, rtol=0)
    # The camera order and the image bytes follow PROTOCOLS.md.
    jpeg = (realdata / DEMO / "samples" / cam / sensor["filename"]).read_bytes()
    assert r["images"][cam_index] == jpeg
    assert r["camera_tokens"][cam_index] == sensor["sample_data_token"].encode()


def test_lidar_time_pose_would_shift_pairs(built, realdata):
  """The camera-time ego pose matters: the lidar-time one moves pixels."""
  _, r = built
  calib = json.loads((realdata / DEMO / "calib.json").read_text())
  lidar = calib["sensors"]["LIDAR_TOP"]
  cam = calib["sensors"]["CAM_FRONT"]
  wrong = nuscenes.geometry.lidar_to_camera(
    lidar["calibrated_sensor"], lidar["ego_pose"], lidar["ego_pose"], cam["calibrated_sensor"]
  )
  xyz = r["points"][:, :3]
  sel = r["pairs_camera"] == 0
  p = xyz[r["pairs_point"][sel]] @ wrong[:3, :3].T + wrong[:3, 3]
  uv = (p @ np.array(cam["intrinsic_K"]).T)[:, :2] / (p @ np.array(cam["intrinsic_K"]).T)[:, 2:]
  assert np.median(np.linalg.norm(uv - r["pairs_uv"][sel], axis=1)) > 2.0


def test_splits_of_the_real_keyframe(built):
  data_dir, _ = built
  from tensorflow_datasets import builder_from_directory

  info = builder_from_directory(str(data_dir / "nuscenes_lidarseg" / VERSION / "1.0.0")).info
  # scene-0061 is a v1.0-mini training scene and not one of SLidR's held-out 100.
  assert {k: v.num_examples for k, v in info.splits.items()} == {
      "train": 1, "train_parametrize": 1, "mini_train": 1
  }  # fmt: skip


def test_readable_without_the_builder_code(built):
  """tfds.builder_from_directory and tfds.data_source need no project import."""
  data_dir, _ = built
  code = (
    "import sys, tensorflow_datasets as tfds\n"
    f"b = tfds.builder_from_directory({str(data_dir / 'nuscenes_lidarseg' / VERSION / '1.0.0')!r})\n"
    "r = b.as_data_source('train')[0]\n"
    f"s = tfds.data_source('nuscenes_lidarseg/{VERSION}', split='mini_train', data_dir={str(data_dir)!r})\n"
    "assert r['points'].shape == (34688, 5) and len(s) == 1\n"
    "assert not any(m.startswith(('data_prep', 'reldistill_jax')) for m in sys.modules)\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd="/", capture_output=True)


def test_split_scene_lists():
  splits = nuscenes_lidarseg.split_scene_names()
  assert len(splits["train"]) == 700 and len(splits["val"]) == 150
  assert len(splits["train_parametrize"]) == 600 and len(splits["train_verify"]) == 100
  assert splits["train_1pct"] <= splits["train"]
  assert not splits["train"] & splits["val"]


def test_one_percent_list_is_slidr_rule_on_real_scene_table(realdata):
  """SLidR: walk scene.json in file order, count training scenes, keep every 100th."""
  scenes = json.loads((realdata / "nuscenes-v1.0-trainval-tables" / "scene.json").read_text())
  train = nuscenes_lidarseg.split_scene_names()["train"]
  kept, count = [], 0
  for scene in scenes:
    if scene["name"] in train:
      count += 1
      if count % 100 == 0:
        kept.append(scene["name"])
  assert len(kept) == 7
  assert frozenset(kept) == nuscenes_lidarseg.split_scene_names()["train_1pct"]


def test_label_map_reproduces_protocols(realdata):
  names = [name for name, _ in classes.NUSCENES_LIDARSEG_CATEGORIES]
  assert [PROTOCOL_NUSCENES_MAP[n] for n in names] == classes.NUSCENES_RAW_TO_TRAIN.tolist()
  category = json.loads((realdata / "nuscenes-v1.0-trainval-tables" / "category.json").read_text())
  assert {c["index"]: c["name"] for c in category} == dict(enumerate(names))
  assert len(classes.NUSCENES_CLASSES) == 16


def test_label_map_on_the_real_lidarseg_fixture(realdata):
  root = realdata / "mmdetection3d-tests-lidarseg-fixture"
  points = nuscenes.read_sweep(next(root.glob("*.pcd.bin")))
  labels = nuscenes.read_lidarseg(next(root.glob("*_lidarseg.bin")), len(points))
  raw = np.fromfile(next(root.glob("*_lidarseg.bin")), np.uint8)
  assert points.shape == (40, 5) and labels.dtype == np.uint8
  # 24 driveable x15, 28 manmade x12, 31 ego x9, 17 car x2, 27 terrain, 30 vegetation.
  assert np.bincount(labels, minlength=17).tolist() == [
      9, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 15, 0, 0, 1, 12, 1
  ]  # fmt: skip
  # The ego returns lie within 1 m of the sensor, the road well below it.
  assert np.all(np.linalg.norm(points[raw == 31, :2], axis=1) < 1.5)
  assert np.all(points[raw == 24, 2] < -1.0)


# Bad inputs: each error names the file at fault.


def _lidar_file(root: pathlib.Path) -> pathlib.Path:
  return next((root / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))


def test_truncated_sweep(dataroot):
  path = _lidar_file(dataroot)
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(
    nuscenes.DatarootError, match=re.escape(path.name) + ".*not a positive multiple of 20"
  ):
    nuscenes.NuScenes(dataroot, VERSION).keyframe(SAMPLE)


def test_nan_coordinates(dataroot):
  path = _lidar_file(dataroot)
  points = np.fromfile(path, "<f4").reshape(-1, 5)
  points[5, 1] = np.nan
  points.tofile(path)
  with pytest.raises(
    nuscenes.DatarootError, match=re.escape(path.name) + ".*NaN or infinite values in y .*index 5"
  ):
    nuscenes.NuScenes(dataroot, VERSION).keyframe(SAMPLE)


def test_a_non_finite_intensity_is_refused_at_build_time(dataroot):
  """Intensity and ring are checked as the coordinates are: the sweep is refused, not repaired
  (its points must stay aligned with their lidarseg labels)."""
  path = _lidar_file(dataroot)
  points = np.fromfile(path, "<f4").reshape(-1, 5)
  points[7, 3], points[9, 3], points[12, 4] = np.nan, np.inf, -np.inf
  points.tofile(path)
  with pytest.raises(nuscenes.DatarootError) as refused:
    nuscenes.NuScenes(dataroot, VERSION).keyframe(SAMPLE)
  message = str(refused.value)
  assert message.startswith(f"{path}: 3 points have NaN or infinite values in intensity, ring ")
  assert "(first at index 7)" in message and "\n" not in message


def test_missing_camera_image(dataroot):
  path = next((dataroot / "samples" / "CAM_BACK").glob("*.jpg"))
  path.unlink()
  with pytest.raises(
    nuscenes.DatarootError, match=re.escape(path.name) + ": camera image not found"
  ):
    nuscenes.NuScenes(dataroot, VERSION).keyframe(SAMPLE)


def test_truncated_camera_image(dataroot):
  path = next((dataroot / "samples" / "CAM_FRONT").glob("*.jpg"))
  path.write_bytes(path.read_bytes()[:50000])
  with pytest.raises(nuscenes.DatarootError, match=re.escape(path.name) + ": JPEG is truncated"):
    nuscenes.NuScenes(dataroot, VERSION).keyframe(SAMPLE)


def test_lidarseg_length_mismatch(dataroot):
  lidar_token = "9d9bf11fb0e144c8b446d54a8a00184f"
  path = dataroot / "lidarseg" / VERSION / f"{lidar_token}_lidarseg.bin"
  path.parent.mkdir(parents=True)
  np.full(34687, 24, np.uint8).tofile(path)
  with pytest.raises(
    nuscenes.DatarootError, match=re.escape(path.name) + ": 34687 labels for a sweep of 34688"
  ):
    nuscenes.NuScenes(dataroot, VERSION).keyframe(SAMPLE)


def test_lidarseg_labels_are_mapped(dataroot):
  lidar_token = "9d9bf11fb0e144c8b446d54a8a00184f"
  path = dataroot / "lidarseg" / VERSION / f"{lidar_token}_lidarseg.bin"
  path.parent.mkdir(parents=True)
  raw = np.arange(34688) % 32
  raw.astype(np.uint8).tofile(path)
  record = nuscenes.NuScenes(dataroot, VERSION).keyframe(SAMPLE)
  assert record["has_labels"]
  np.testing.assert_array_equal(record["labels"], classes.NUSCENES_RAW_TO_TRAIN[raw])


def test_missing_table(dataroot):
  (dataroot / VERSION / "ego_pose.json").unlink()
  with pytest.raises(nuscenes.DatarootError, match="ego_pose.json: table not found"):
    nuscenes.NuScenes(dataroot, VERSION)


def test_missing_version_folder(dataroot, tmp_path):
  with pytest.raises(
    nuscenes.DatarootError, match=rf"v1.0-trainval: version folder not found.*{VERSION}"
  ):
    nuscenes.NuScenes(dataroot, "v1.0-trainval")
  with pytest.raises(nuscenes.DatarootError, match="v1.0-trainval: version folder not found"):
    build.build("nuscenes_lidarseg", str(dataroot), str(tmp_path / "out"), config="v1.0-trainval")


def test_errors_surface_through_the_build_and_write_nothing(dataroot, tmp_path):
  path = _lidar_file(dataroot)
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(Exception, match=re.escape(path.name) + ".*not a positive multiple of 20"):
    build.build("nuscenes_lidarseg", str(dataroot), str(tmp_path / "out"))
  assert not list((tmp_path / "out").rglob("*.array_record*"))
  assert not list((tmp_path / "out").rglob("dataset_info.json"))


def test_a_build_stopped_between_tfds_creating_its_folder_and_its_try_leaves_none(
  dataroot, tmp_path, monkeypatch
):
  """TFDS removes its `incomplete.*` folder in a `finally`, which a SIGTERM landing just
  after the folder is made, before the `try`, misses: the build removes it itself."""
  from tensorflow_datasets.core import utils as tfds_utils

  stale = tmp_path / "out" / "nuscenes_lidarseg" / VERSION / "incomplete.KILLED_1.0.0"
  stale.mkdir(parents=True)  # a run killed outright: the next one replaces it, not this

  @contextlib.contextmanager
  def stopped_after_mkdir(dirname, **_):
    folder = pathlib.Path(dirname).parent / f"incomplete.STOPPED_{pathlib.Path(dirname).name}"
    folder.mkdir(parents=True)
    raise errors.Terminated()
    yield str(folder)

  monkeypatch.setattr(tfds_utils, "incomplete_dir", stopped_after_mkdir)
  with pytest.raises(errors.Terminated):
    build.build("nuscenes_lidarseg", str(dataroot), str(tmp_path / "out"))
  assert sorted(p.name for p in (tmp_path / "out").rglob("incomplete.*")) == [stale.name]
