"""Rigid transforms in the nuScenes conventions (quaternions are w, x, y, z).

The projection chain of PROTOCOLS.md section 1 is `lidar_to_camera`; the
builders and the synthetic world both use it, so a synthetic scan and a real
one are projected by the same code.
"""

from collections.abc import Sequence

import numpy as np


def quaternion_to_matrix(q_wxyz: Sequence[float]) -> np.ndarray:
  """Rotation matrix (3, 3) of a unit quaternion given as w, x, y, z."""
  w, x, y, z = np.asarray(q_wxyz, dtype=np.float64) / np.linalg.norm(q_wxyz)
  return np.array(
    [
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
  )


def matrix_to_quaternion(rot: np.ndarray) -> list[float]:
  """Unit quaternion [w, x, y, z] (w >= 0) of a rotation matrix (3, 3)."""
  m = np.asarray(rot, dtype=np.float64)
  trace = np.trace(m)
  if trace > 0:
    s = 2.0 * np.sqrt(trace + 1.0)
    q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
  elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
    s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
    q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
  elif m[1, 1] > m[2, 2]:
    s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
    q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
  else:
    s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
    q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
  q = np.asarray(q) / np.linalg.norm(q)
  if q[0] < 0:
    q = -q
  return [float(v) for v in q]


def pose_matrix(record: dict) -> np.ndarray:
  """4x4 transform of a `calibrated_sensor` or `ego_pose` record.

  Both tables store the transform *from* the child frame (sensor, ego) *to*
  the parent frame (ego, global) as `rotation` (w, x, y, z) + `translation`.
  """
  mat = np.eye(4)
  mat[:3, :3] = quaternion_to_matrix(record["rotation"])
  mat[:3, 3] = np.asarray(record["translation"], dtype=np.float64)
  return mat


def lidar_to_camera(
  lidar_calib: dict, lidar_pose: dict, cam_pose: dict, cam_calib: dict
) -> np.ndarray:
  """4x4 transform from the lidar frame to a camera frame.

  The chain is lidar -> ego (lidar time) -> global -> ego (camera time) ->
  camera; each argument is a table record with `rotation` and `translation`.
  """
  return (
    np.linalg.inv(pose_matrix(cam_calib))
    @ np.linalg.inv(pose_matrix(cam_pose))
    @ pose_matrix(lidar_pose)
    @ pose_matrix(lidar_calib)
  )


# Pixel margin of the visibility test: nuscenes-devkit's
# `map_pointcloud_to_image` keeps 1 < u < W - 1 and 1 < v < H - 1.
PIXEL_MARGIN = 1.0
MIN_DEPTH = 1.0


def project_points(
  xyz: np.ndarray,
  lidar2cam: np.ndarray,
  intrinsic: np.ndarray,
  width: int,
  height: int,
  min_depth: float = MIN_DEPTH,
  margin: float = PIXEL_MARGIN,
) -> tuple[np.ndarray, np.ndarray]:
  """Projects lidar points into one camera.

  A point is kept when its depth exceeds `min_depth` and its pixel lies
  strictly inside the image by `margin` pixels (nuscenes-devkit's criterion).

  Args:
    xyz: (N, 3) points in the lidar frame.
    lidar2cam: (4, 4) transform from `lidar_to_camera`.
    intrinsic: (3, 3) camera matrix.
    width: image width in pixels.
    height: image height in pixels.
    min_depth: smallest depth (metres) kept.
    margin: pixel margin of the inside test.

  Returns:
    (indices, uv): int32 (M,) indices into `xyz` of the visible points, in
    increasing order, and float32 (M, 2) pixel coordinates (u = column,
    v = row) in the native image.
  """
  xyz = np.asarray(xyz, dtype=np.float64)
  cam = xyz @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]  # (N, 3)
  depth = cam[:, 2]
  in_front = depth > min_depth
  pix = cam[in_front] @ np.asarray(intrinsic, dtype=np.float64).T  # (N', 3)
  uv = pix[:, :2] / pix[:, 2:3]
  inside = (
    (uv[:, 0] > margin)
    & (uv[:, 0] < width - margin)
    & (uv[:, 1] > margin)
    & (uv[:, 1] < height - margin)
  )
  indices = np.flatnonzero(in_front)[inside].astype(np.int32)
  return indices, uv[inside].astype(np.float32)
