"""The SemanticKITTI builder and label map on the real scan."""

import pathlib
import shutil

import numpy as np
import pytest

from data_prep import build
from data_prep.builders import data_source, semantic_kitti
from reldistill_jax import classes

# PROTOCOLS.md section 2, restated: raw semantic id -> training id.
PROTOCOL_KITTI_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9,
    44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19,
    99: 0, 252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}  # fmt: skip
SCAN = "spvnas-semantickitti"


@pytest.fixture()
def kitti_root(realdata, tmp_path) -> pathlib.Path:
  """A SemanticKITTI folder holding the real scan as 08/000000 and copies in train."""
  root = tmp_path / "kitti"
  for seq, frames in (("08", [0]), ("00", range(0, 3)), ("05", [0])):
    for frame in frames:
      for sub, ext in (("velodyne", ".bin"), ("labels", ".label")):
        dest = root / "sequences" / seq / sub / f"{frame:06d}{ext}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(realdata / SCAN / f"000000{ext}", dest)
        dest.chmod(0o644)
  return root


def test_map_reproduces_protocols():
  raw = np.array(sorted(PROTOCOL_KITTI_MAP))
  expected = np.array([PROTOCOL_KITTI_MAP[r] for r in raw])
  np.testing.assert_array_equal(classes.semantic_kitti_raw_to_train(raw), expected)
  assert len(classes.SEMANTIC_KITTI_CLASSES) == 19
  with pytest.raises(ValueError, match="unknown SemanticKITTI raw ids: \\[12\\]"):
    classes.semantic_kitti_raw_to_train(np.array([10, 12]))


def test_real_scan_labels(realdata):
  path = realdata / SCAN / "000000.bin"
  raw = np.fromfile(realdata / SCAN / "000000.label", "<u4")
  points = semantic_kitti.read_scan(path)
  labels = semantic_kitti.read_labels(realdata / SCAN / "000000.label", len(points))
  assert points.shape == (123389, 4) and labels.dtype == np.uint8
  semantic = raw & 0xFFFF
  assert {252, 254} <= set(np.unique(semantic).tolist())
  for raw_id in np.unique(semantic):
    assert np.all(labels[semantic == raw_id] == PROTOCOL_KITTI_MAP[int(raw_id)])
  # The instance bits are stripped: moving cars are cars, moving people persons.
  assert np.all(labels[semantic == 252] == 1) and np.all(labels[semantic == 254] == 6)
  assert labels.max() == 19 and (labels == 0).mean() < 0.2


def test_build_splits_and_read_back(kitti_root, tmp_path):
  build.build("semantic_kitti", str(kitti_root), str(tmp_path / "tfds"))
  sizes = {s: len(data_source(tmp_path / "tfds", "semantic_kitti", s)) for s in ("train", "val")}
  assert sizes == {"train": 4, "val": 1}
  one_pct = data_source(tmp_path / "tfds", "semantic_kitti", "train_1pct")
  assert [r["token"] for r in one_pct] == [b"00/000000"]  # every 100th, from the first
  record = data_source(tmp_path / "tfds", "semantic_kitti", "val")[0]
  assert record["token"] == b"08/000000" and record["has_labels"]
  assert record["points"].shape == (123389, 4) and record["points"].dtype == np.float32
  assert record["labels"].shape == (123389,) and record["labels"].dtype == np.uint8
  with pytest.raises(FileNotFoundError, match="split 'test' not built"):
    data_source(tmp_path / "tfds", "semantic_kitti", "test")


def test_one_percent_rule():
  paths = [pathlib.Path(f"/k/sequences/00/velodyne/{i:06d}.bin") for i in range(250)]
  kept = paths[:: semantic_kitti.ONE_PERCENT_STEP]
  assert [p.stem for p in kept] == ["000000", "000100", "000200"]


def test_bad_scans(kitti_root):
  scan = kitti_root / "sequences" / "08" / "velodyne" / "000000.bin"
  label = kitti_root / "sequences" / "08" / "labels" / "000000.label"
  label.write_bytes(label.read_bytes()[:-4])
  with pytest.raises(
    semantic_kitti.KittiError, match="000000.label: 123388 labels for a scan of 123389"
  ):
    semantic_kitti.scan_record(scan)
  scan.write_bytes(scan.read_bytes()[:-6])
  with pytest.raises(
    semantic_kitti.KittiError, match="000000.bin: .* not a positive multiple of 16"
  ):
    semantic_kitti.scan_record(scan)


def test_a_non_finite_reflectance_is_refused(kitti_root):
  scan = kitti_root / "sequences" / "08" / "velodyne" / "000000.bin"
  points = np.fromfile(scan, "<f4").reshape(-1, 4)
  points[3, 3] = np.nan
  points.tofile(scan)
  with pytest.raises(
    semantic_kitti.KittiError,
    match=r"000000.bin: 1 points have NaN or infinite values in reflectance \(first at index 3\)",
  ):
    semantic_kitti.scan_record(scan)


def test_scan_without_labels(kitti_root):
  (kitti_root / "sequences" / "05" / "labels" / "000000.label").unlink()
  record = semantic_kitti.scan_record(kitti_root / "sequences" / "05" / "velodyne" / "000000.bin")
  assert not record["has_labels"] and not record["labels"].any()
