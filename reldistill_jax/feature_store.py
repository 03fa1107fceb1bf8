"""The cached 2D feature store: one teacher's patch-grid maps of every camera.

Written once by `python -m data_prep.teacher_features` into a record store
(`records.py`), one record per sample:

  token      str: the sample token (the key).
  features   (6, h, w, D) float16: the teacher's patch-grid feature map of
             each camera, in `classes.NUSCENES_CAMERAS` order, for the images
             resized directly (anisotropically) from their native size to
             `image_size`.

The manifest's config names the teacher and its dense rule (`dense`: e.g.
maskclip or naclip for CLIP; a run refuses a store of another rule), the
sha256 of its weights, the image
size, the grid, the feature dimension, the pixel normalisation, the dtype, and
the builder split it covers. The training step samples a map bilinearly at the
pair pixels.
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from reldistill_jax import classes, errors, records

STORE_NAME = "features"
STORE_VERSION = 1
DTYPE = "float16"


def check_finite(record: Mapping[str, Any], where: str) -> None:
  """Refuses a feature record holding NaN or inf, naming its sample and camera.

  Raises:
    records.RecordError: naming `where`, the sample and every camera at fault.
  """
  features = record["features"]
  finite = np.isfinite(features).reshape(len(features), -1).all(axis=1)  # (cameras,)
  if not finite.all():
    cameras = [classes.NUSCENES_CAMERAS[c] for c in np.flatnonzero(~finite)]
    raise records.RecordError(
      f"{where}: sample {record['token']} holds non-finite features (NaN, inf, or beyond "
      f"float16's range) for {', '.join(cameras)}; rewrite the store (check the teacher's "
      "weights and images)"
    )


def store_config(
  teacher,
  image_size: tuple[int, int],
  builder: str,
  split: str,
  num_scans: int,
  records_per_shard: int,
) -> dict[str, Any]:
  """The manifest config of a store written by `teacher` (see module docstring)."""
  height, width = image_size
  patch = teacher.patch_size
  if height % patch or width % patch:
    near = "x".join(str(max(patch, round(n / patch) * patch)) for n in image_size)
    default = "x".join(map(str, teacher.default_image_size))
    raise errors.ConfigError(
      f"image size {height}x{width} is not a multiple of {teacher.name}'s patch size {patch}; "
      f"use {near} (the teacher's default, used without --image_size, is {default})"
    )
  return {
    "store_version": STORE_VERSION,
    "teacher": teacher.name,
    "dense": teacher.dense,
    "weights_sha256": teacher.weights_sha256,
    "image_size": [height, width],
    "grid": [height // teacher.patch_size, width // teacher.patch_size],
    "feature_dim": int(teacher.feature_dim),
    "normalisation": teacher.normalisation,
    "dtype": DTYPE,
    "cameras": list(classes.NUSCENES_CAMERAS),
    "builder": builder,
    "split": split,
    "num_scans": int(num_scans),
    "records_per_shard": int(records_per_shard),
  }


class FeatureStore:
  """Reads a feature store, refusing one that does not match what the run expects.

  Args:
    path: the store's folder.
    expected: config keys the run depends on (e.g. `teacher`,
      `weights_sha256`, `image_size`, `feature_dim`); a store whose manifest
      differs in any of them is refused with a message naming the keys.
  """

  def __init__(self, path: str | pathlib.Path, expected: Mapping[str, Any] | None = None):
    self._reader = records.ShardedReader(str(path), expected_config=expected)
    self.path = self._reader.path
    self.config = self._reader.config
    h, w = self.config["grid"]
    self.shape = (len(self.config["cameras"]), h, w, self.config["feature_dim"])

  def __len__(self) -> int:
    return len(self._reader)

  @property
  def tokens(self) -> list[str]:
    return self._reader.tokens

  def _checked(self, record: Mapping[str, Any]) -> dict[str, Any]:
    features = record["features"]
    if features.shape != self.shape or features.dtype != np.dtype(DTYPE):
      raise records.RecordError(
        f"{self.path}: record {record['token']} holds features {features.shape} "
        f"{features.dtype}, the manifest says {self.shape} {DTYPE}"
      )
    check_finite(record, self.path)
    return dict(record)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._checked(self._reader[index])

  def get(self, token: str) -> dict[str, Any]:
    """The record of a sample token; a missing token is an error naming the store."""
    try:
      record = self._reader.get(token)
    except KeyError:
      raise KeyError(f"{self.path}: no features for sample {token}") from None
    return self._checked(record)
