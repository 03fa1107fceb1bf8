"""Reading raw point-cloud files (headerless little-endian float32 rows)."""

import pathlib

import numpy as np


def read_points(path: pathlib.Path, dims: int, error: type[ValueError] = ValueError) -> np.ndarray:
  """Reads a `.bin` point file as float32 (N, dims), validating it.

  Args:
    path: the file (a nuScenes `.pcd.bin` sweep has 5 values per point, a
      KITTI velodyne scan 4).
    dims: float32 values per point.
    error: the exception type raised, so each dataset reports in its own terms.

  Raises:
    error: if the file is missing, empty, not a whole number of points, or
      holds NaN or infinite coordinates; the message names the file.
  """
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
  bad = ~np.isfinite(points[:, :3]).all(axis=1)
  if bad.any():
    raise error(
      f"{path}: {int(bad.sum())} points have NaN or infinite coordinates "
      f"(first at index {int(np.flatnonzero(bad)[0])})"
    )
  return points
