"""Reading raw point-cloud files (headerless little-endian float32 rows)."""

import pathlib
from collections.abc import Sequence

import numpy as np


def read_points(
  path: pathlib.Path, columns: Sequence[str], error: type[ValueError] = ValueError
) -> np.ndarray:
  """Reads a `.bin` point file as float32 (N, len(columns)), validating it.

  Every value must be finite, the intensity as much as the coordinates: a
  sensor never returns NaN or inf, so one means a damaged file, and dropping
  its points would part them from their per-point label file. The file is
  refused rather than repaired.

  Args:
    path: the file (a nuScenes `.pcd.bin` sweep has 5 values per point, a
      KITTI velodyne scan 4).
    columns: the names of the float32 values of a point, in order.
    error: the exception type raised, so each dataset reports in its own terms.

  Raises:
    error: if the file is missing, empty, not a whole number of points, or
      holds a NaN or infinite value; the message names the file and columns.
  """
  dims = len(columns)
  if not path.is_file():
    raise error(f"{path}: point file not found")
  raw = path.read_bytes()
  row = 4 * dims
  if len(raw) == 0 or len(raw) % row:
    raise error(
      f"{path}: {len(raw)} bytes is not a positive multiple of {row} "
      f"(float32 x {dims} per point): truncated or not a point file of this dataset"
    )
  points = np.frombuffer(raw, dtype="<f4").reshape(-1, dims).astype(np.float32)
  finite = np.isfinite(points)
  bad = ~finite.all(axis=1)
  if bad.any():
    named = ", ".join(c for c, ok in zip(columns, finite.all(axis=0), strict=True) if not ok)
    raise error(
      f"{path}: {int(bad.sum())} points have NaN or infinite values in {named} "
      f"(first at index {int(np.flatnonzero(bad)[0])}); the file is damaged: restore it from "
      "the dataset's archive"
    )
  return points
