"""TFDS builder for SemanticKITTI (TensorFlow-free, ArrayRecord).

A manual-download dataset: `--manual_dir` holds `sequences/NN/velodyne/*.bin`
(float32 x, y, z, remission) and `sequences/NN/labels/*.label` (uint32: raw
semantic id in the low 16 bits, instance id in the high 16). No cameras are
used for this dataset (it is a fine-tuning target only). One record per scan:

  token       str      `NN/FFFFFF` (sequence/frame, the record key)
  sequence    str      two-digit sequence
  points      (N, 4)   float32 x, y, z, remission
  labels      (N,)     uint8 19-class training ids (0 = ignore)
  has_labels  bool     False where the scan has no .label file

Splits: `train` (sequences 00-07, 09, 10), `val` (08), `train_1pct` (every
100th scan, starting with the first, of the sorted list of all training scans)
and `test` (11-21, unlabelled), each written when it has at least one scan.
"""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from data_prep import pointfiles
from data_prep.builders import offline
from reldistill_jax import classes, errors

TRAIN_SEQUENCES = ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10")
VAL_SEQUENCES = ("08",)
TEST_SEQUENCES = tuple(f"{i:02d}" for i in range(11, 22))
ONE_PERCENT_STEP = 100
POINT_COLUMNS = ("x", "y", "z", "reflectance")
POINT_DIMS = len(POINT_COLUMNS)


class KittiError(errors.DataError):
  """A SemanticKITTI folder is missing a file or holds a malformed one."""


def read_scan(path: pathlib.Path) -> np.ndarray:
  """Reads a velodyne `.bin` scan as float32 (N, 4).

  Raises:
    KittiError: if its size is not a multiple of 16 bytes or it holds a
      non-finite value.
  """
  return pointfiles.read_points(path, POINT_COLUMNS, KittiError)


def read_labels(path: pathlib.Path, num_points: int) -> np.ndarray:
  """Reads a `.label` file and maps its semantic ids to training ids (uint8).

  Raises:
    KittiError: if its length differs from the scan's point count or it holds
      an id outside the SemanticKITTI label definition.
  """
  raw = np.fromfile(path, dtype="<u4")
  if raw.size != num_points or path.stat().st_size != 4 * num_points:
    raise KittiError(f"{path}: {path.stat().st_size // 4} labels for a scan of {num_points} points")
  try:
    return classes.semantic_kitti_raw_to_train(raw & 0xFFFF)
  except ValueError as e:
    raise KittiError(f"{path}: {e}") from e


def list_scans(root: pathlib.Path, sequences: tuple[str, ...]) -> list[pathlib.Path]:
  """Sorted velodyne scan paths of the given sequences that exist under root."""
  return sorted(
    path for seq in sequences for path in (root / "sequences" / seq / "velodyne").glob("*.bin")
  )


def split_scans(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """Scan paths of every non-empty split."""
  train = list_scans(root, TRAIN_SEQUENCES)
  splits = {
    "train": train,
    "val": list_scans(root, VAL_SEQUENCES),
    "train_1pct": train[::ONE_PERCENT_STEP],
    "test": list_scans(root, TEST_SEQUENCES),
  }
  return {name: paths for name, paths in splits.items() if paths}


def scan_record(path: pathlib.Path) -> dict:
  """The builder record of one scan."""
  points = read_scan(path)
  label_path = path.parent.parent / "labels" / (path.stem + ".label")
  has_labels = label_path.is_file()
  labels = read_labels(label_path, len(points)) if has_labels else np.zeros(len(points), np.uint8)
  sequence = path.parent.parent.name
  return {
    "token": f"{sequence}/{path.stem}",
    "sequence": sequence,
    "points": points,
    "labels": labels,
    "has_labels": has_labels,
  }


class SemanticKitti(offline.OfflineBuilder):
  """SemanticKITTI scans with 19-class labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Scans and 19-class training labels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the KITTI odometry velodyne scans and the SemanticKITTI labels
  (http://www.semantic-kitti.org/dataset.html) and extract both into one folder
  holding `sequences/NN/velodyne/` and `sequences/NN/labels/`. Pass that folder
  as --manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "token": tfds.features.Text(),
          "sequence": tfds.features.Text(),
          "points": tfds.features.Tensor(shape=(None, POINT_DIMS), dtype=np.float32),
          "labels": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
          "has_labels": tfds.features.Scalar(dtype=np.bool_),
        }
      ),
      homepage="http://www.semantic-kitti.org/",
      citation=_CITATION,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = split_scans(root)
    if not splits:
      raise KittiError(f"{root}: no scans found under sequences/NN/velodyne/")
    return {name: self._generate_examples(paths, name) for name, paths in splits.items()}

  def _generate_examples(self, paths: list[pathlib.Path], split: str):
    unlabelled = 0
    for path in paths:
      record = scan_record(path)
      unlabelled += not record["has_labels"]
      yield record["token"], record
    if split != "test":  # SemanticKITTI publishes no test labels
      missing = "no sequences/NN/labels/*.label beside the scans; extract the SemanticKITTI labels"
      self.warn_unlabelled(split, unlabelled, len(paths), missing)


_CITATION = """\
@inproceedings{behley2019semantickitti,
  title={SemanticKITTI: A Dataset for Semantic Scene Understanding of LiDAR Sequences},
  author={Behley, Jens and Garbade, Martin and Milioto, Andres and Quenzel, Jan and
          Behnke, Sven and Stachniss, Cyrill and Gall, Juergen},
  booktitle={ICCV},
  year={2019}
}
"""
