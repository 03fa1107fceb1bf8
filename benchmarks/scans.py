"""Procedural lidar sweeps at nuScenes scale, for the benchmarks (no dataset, no download).

Each scan casts the 32 x 1,084 beams of a simulated HDL-32E (the nuScenes
LIDAR_TOP, 1.84 m above the ground; 34,688 rays, the size of a real nuScenes
keyframe) analytically against a street: the ground plane, two rows of
building facades with gaps (5-25 m tall, 7-14 m from the sensor), 15-35 parked
or driving car boxes, 10-30 poles and trunks (cylinders) and a far, irregular
skyline (40-90 m) that catches the upward beams; 2% dropout and 2 cm range
noise. That gives about 33k points and, at 0.1 m, about 19-21k stage-0 voxels
(stages 0-4 about 20k / 13k / 8k / 4k / 2k; the real scene-0061 keyframe has
17,885 / 12,614 / 7,927 / 4,495 / 2,310). Points are projected into the six
cameras with the calibration of a real nuScenes car
(`data_prep/resources/nuscenes_rig.json`, the devkit's visibility test), which
gives about 23k point-to-pixel pairs per scan.
"""

import numpy as np

from data_prep import geometry, resources
from reldistill_jax import classes, serialization

ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)  # HDL-32E
NUM_AZIMUTH = 1084
SENSOR_HEIGHT = 1.84  # LIDAR_TOP above the ground (m)
MAX_RANGE = 100.0
IMAGE_SIZE = (900, 1600)  # (height, width) of the nuScenes cameras


def _beams(rng: np.random.Generator) -> np.ndarray:
  el = np.deg2rad(ELEVATIONS_DEG)[:, None]
  az = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(NUM_AZIMUTH)[None, :] / NUM_AZIMUTH
  shape = (len(ELEVATIONS_DEG), NUM_AZIMUTH)
  return np.stack(
    [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.broadcast_to(np.sin(el), shape)], -1
  ).reshape(-1, 3)


def synthetic_scan(rng: np.random.Generator) -> np.ndarray:
  """One procedural street sweep (module docstring): (N, 4) float32 x, y, z, intensity."""
  d = _beams(rng)
  h = SENSOR_HEIGHT
  t = np.where(d[:, 2] < 0, -h / np.minimum(d[:, 2], -1e-9), np.inf)  # ground

  def closer(hit, t_hit):
    return np.where(hit & (t_hit < t), t_hit, t)

  # Facades on both sides of the street (x = -w and x = +w), with gaps along y.
  for side in (-1, 1):
    w = rng.uniform(7, 14)
    dx = d[:, 0] * side
    t_wall = np.where(dx > 1e-6, w / np.maximum(dx, 1e-6), np.inf)
    y, z = d[:, 1] * t_wall, d[:, 2] * t_wall
    edges = np.cumsum(rng.uniform(5, 40, 30)) - 200
    heights = rng.uniform(5, 25, 30)
    seg = np.searchsorted(edges, y)
    standing = (seg % 2 == 1) & (seg < 30) & (z > -h) & (z < heights[np.minimum(seg, 29)] - h)
    t = closer(standing, t_wall)
  # Cars: axis-aligned boxes (slab test), none on top of the sensor.
  n = rng.integers(15, 36)
  centres = np.stack([rng.uniform(-6, 6, n), rng.uniform(-60, 60, n)], 1)
  half = np.array([0.95, 2.3, 0.8])
  with np.errstate(divide="ignore", invalid="ignore"):
    for cx, cy in centres[np.hypot(*centres.T) > 4]:
      centre = np.array([cx, cy, 0.8 - h])
      t1, t2 = (centre - half) / d, (centre + half) / d
      near, far = np.nanmax(np.minimum(t1, t2), 1), np.nanmin(np.maximum(t1, t2), 1)
      t = closer((near <= far) & (near > 0), near)
  # Poles and trunks: vertical cylinders beside the road.
  n = rng.integers(10, 31)
  a = d[:, 0] ** 2 + d[:, 1] ** 2
  for x0, y0, r, top in zip(
    rng.choice([-1.0, 1.0], n) * rng.uniform(6, 9, n),
    rng.uniform(-50, 50, n),
    rng.uniform(0.1, 0.6, n),
    rng.uniform(3, 9, n),
    strict=True,
  ):
    b = -2 * (d[:, 0] * x0 + d[:, 1] * y0)
    disc = b * b - 4 * a * (x0 * x0 + y0 * y0 - r * r)
    t_cyl = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, 1e-9)), 0)
    z = d[:, 2] * t_cyl
    t = closer((t_cyl > 0) & (z > -h) & (z < top - h), t_cyl)
  # A far, irregular skyline catching the upward beams.
  radius = rng.uniform(40, 90)
  t_sky = radius / np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)
  azimuth = np.arctan2(d[:, 1], d[:, 0])
  skyline = (
    14 + 6 * np.sin(3 * azimuth + rng.uniform(0, 6)) + 4 * np.sin(7 * azimuth + rng.uniform(0, 6))
  )
  t = closer(d[:, 2] * t_sky < skyline - h, t_sky)

  keep = np.isfinite(t) & (t < MAX_RANGE) & (rng.random(len(t)) > 0.02)
  ranges = t[keep] + rng.normal(0.0, 0.02, int(keep.sum()))
  intensity = np.clip(rng.lognormal(2.5, 0.8, len(ranges)), 0, 255)
  return np.concatenate([d[keep] * ranges[:, None], intensity[:, None]], 1).astype(np.float32)


def camera_pairs(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(pairs_point, pairs_camera, pairs_uv) of the six cameras of a real nuScenes rig."""
  rig = resources.load_json("nuscenes_rig")["calibrated_sensor"]
  lidar = geometry.pose_matrix(rig["LIDAR_TOP"])
  points, cameras, uvs = [], [], []
  for index, name in enumerate(classes.NUSCENES_CAMERAS):
    calib = rig[name]
    lidar2cam = np.linalg.inv(geometry.pose_matrix(calib)) @ lidar  # one ego pose
    idx, uv = geometry.project_points(
      xyz, lidar2cam, np.asarray(calib["camera_intrinsic"]), calib["width"], calib["height"]
    )
    points.append(idx)
    cameras.append(np.full(len(idx), index, np.uint8))
    uvs.append(uv)
  return np.concatenate(points), np.concatenate(cameras), np.concatenate(uvs)


def synthetic_bucket(
  rng: np.random.Generator, index: int, voxel_size: float, num_stages: int, num_curves: int
) -> dict:
  """A bucket record of one procedural sweep, as `data_prep.voxelise.bucket_of_scan` writes it.

  Its `distinct_voxels` is the number of distinct cells of the sweep's points at
  `voxel_size`, counted independently of `build_bucket` (what a bucket must keep).
  """
  points = synthetic_scan(rng)
  pairs_point, pairs_camera, pairs_uv = camera_pairs(points[:, :3])
  bucket = serialization.build_bucket(
    points,
    token=f"synthetic-{index:04d}",
    voxel_size=voxel_size,
    curves=serialization.CURVES[:num_curves],
    num_stages=num_stages,
    pairs_point=pairs_point,
    pairs_camera=pairs_camera,
    pairs_uv=pairs_uv,
  )
  bucket["has_labels"] = False
  bucket["image_sizes"] = np.tile(np.asarray(IMAGE_SIZE, np.int32), (6, 1))
  cells = np.floor(points[:, :3].astype(np.float64) / voxel_size).astype(np.int64)
  bucket["distinct_voxels"] = len(np.unique(cells, axis=0))
  return bucket
