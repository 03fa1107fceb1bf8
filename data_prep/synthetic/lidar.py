"""Velodyne HDL-32E model of the nuScenes LIDAR_TOP.

32 beams with elevations evenly spaced from -30.67 to +10.67 degrees, 1084
azimuth steps per revolution, returns up to about 100 m with ~2 cm range noise
and a small, range-dependent dropout. Rays that hit the ego vehicle are removed
(nuScenes keeps them as `vehicle.ego`; the builders would drop them anyway),
as are rays that hit nothing. Points are written in the LIDAR_TOP frame of the
real rig (x right, y forward, z up).
"""

import numpy as np

from data_prep import geometry
from data_prep.synthetic import raycast
from data_prep.synthetic.road import DRIVEABLE, OTHER_FLAT, SIDEWALK, TERRAIN
from data_prep.synthetic.world import Scene

ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)  # ring r has elevation ELEVATIONS_DEG[r]
N_AZIMUTH = 1084
MAX_RANGE = 100.0
RANGE_NOISE = 0.02  # metres, one sigma
NOISE_FRACTION = 0.0015  # spurious returns (raw class 0: dust, reflections)
NOISE_LABEL = 0

# The ego vehicle in its own frame (x forward from the rear axle, y left, z up)
# as (min corner, max corner): the 4.6 x 1.9 m body up to the bonnet and boot,
# and the roof around the lidar mount. Heights and roof size were fitted so that
# the shadow matches the real scene-0061 keyframe ring by ring (about 3.8k of
# its 34,688 rays hit the ego, almost all on rings 0-6); a single 1.6 m tall box
# would shadow half of all rays, which real sweeps do not show.
EGO_BOXES = (
  ((-1.0, -0.95, 0.0), (3.6, 0.95, 0.8)),
  ((0.0, -0.7, 0.0), (1.6, 0.7, 1.4)),
)

GROUND_REFLECTIVITY = {DRIVEABLE: 10.0, OTHER_FLAT: 14.0, SIDEWALK: 18.0, TERRAIN: 8.0}
MARKING_REFLECTIVITY = 80.0


def beam_directions(az0: float) -> np.ndarray:
  """Unit ray directions (3, 32, N_AZIMUTH) in the lidar frame; column 0 at azimuth az0."""
  el = np.deg2rad(ELEVATIONS_DEG)[:, None]
  az = az0 + 2 * np.pi * np.arange(N_AZIMUTH)[None, :] / N_AZIMUTH
  shape = (len(el), N_AZIMUTH)
  return np.stack(
    [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.broadcast_to(np.sin(el), shape)]
  )


def ego_shadow(lidar_to_ego: np.ndarray, dirs: np.ndarray) -> np.ndarray:
  """Bool mask (32, N_AZIMUTH) of rays that hit the ego vehicle's body.

  Args:
    lidar_to_ego: (4, 4) calibrated_sensor transform of the lidar.
    dirs: (3, 32, N_AZIMUTH) ray directions in the lidar frame.
  """
  d = np.einsum("ij,jhw->ihw", lidar_to_ego[:3, :3], dirs)
  o = lidar_to_ego[:3, 3]
  hit = np.zeros(d.shape[1:], dtype=bool)
  for lo, hi in EGO_BOXES:
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    half = (np.asarray(hi) - np.asarray(lo)) / 2
    hit |= np.isfinite(raycast.box_hit(o - centre, half, d[0], d[1], d[2]))
  return hit


def sweep(scene: Scene, lidar_calib: dict, timestamp_us: int, rng: np.random.Generator):
  """Simulates one keyframe sweep.

  Args:
    scene: the scene.
    lidar_calib: LIDAR_TOP calibrated_sensor record.
    timestamp_us: capture time; the whole revolution uses the ego pose at it.
    rng: generator for azimuth phase, noise and dropout.

  Returns:
    (points, labels): float32 (N, 5) x, y, z (lidar frame), intensity 0-255,
    ring 0-31; uint8 (N,) raw lidarseg ids. Points are in firing order
    (azimuth step, then beam).
  """
  lidar_to_ego = geometry.pose_matrix(lidar_calib)
  lidar_to_world = scene.ego_matrix(timestamp_us) @ lidar_to_ego
  az0 = rng.uniform(0, 2 * np.pi)
  dirs = beam_directions(az0)  # (3, 32, A)
  dirs_world = np.einsum("ij,jhw->ihw", lidar_to_world[:3, :3], dirs)
  origin = lidar_to_world[:3, 3]
  n_rows = len(ELEVATIONS_DEG)
  windows = raycast.azimuth_windows(scene.prims, lidar_to_world, az0, N_AZIMUTH, n_rows, MAX_RANGE)
  t, ids = raycast.cast(scene.prims, origin, dirs_world, windows, MAX_RANGE)

  # Firing order: all beams of one azimuth step, then the next step.
  t, ids = t.T.ravel(), ids.T.ravel()
  dirs, dirs_world = (
    dirs.transpose(0, 2, 1).reshape(3, -1),
    dirs_world.transpose(0, 2, 1).reshape(3, -1),
  )
  ring = np.tile(np.arange(n_rows), N_AZIMUTH)
  self_hit = ego_shadow(lidar_to_ego, dirs.reshape(3, N_AZIMUTH, n_rows)).ravel()

  hit = np.isfinite(t) & ~self_hit
  ids = np.where(hit, ids, raycast.SKY)
  points = origin + np.where(hit, t, 0.0)[:, None] * dirs_world.T  # (R, 3) world hit points
  labels, marking = scene.surface_labels(points, ids)
  refl = np.where(ids >= 0, scene.prims.reflectivity[np.maximum(ids, 0)], 0.0)
  for label, value in GROUND_REFLECTIVITY.items():
    refl = np.where((ids == raycast.GROUND) & (labels == label), value, refl)
  refl = np.where(marking, MARKING_REFLECTIVITY, refl)
  normals = raycast.hit_normals(scene.prims, points, ids)
  incidence = np.abs(np.sum(normals * dirs_world.T, axis=1))
  intensity = refl * (0.3 + 0.7 * incidence) * rng.lognormal(0.0, 0.3, len(t))

  # Far, dark and grazing returns drop out more often.
  far = np.minimum(t, MAX_RANGE) / MAX_RANGE
  p_drop = 0.006 + 0.04 * far**2 + 0.04 * far * (refl < 10) + 0.02 * (incidence < 0.15)
  keep = hit & (rng.random(len(t)) >= p_drop)
  ranges = t + rng.normal(0.0, RANGE_NOISE, len(t))

  # A few spurious returns in front of whatever the ray would have hit.
  spurious = ~self_hit & (rng.random(len(t)) < NOISE_FRACTION)
  ranges = np.where(
    spurious, rng.uniform(1.2, 1.0 + np.minimum(np.where(keep, t, 20.0), 20.0)), ranges
  )
  labels = np.where(spurious, NOISE_LABEL, labels).astype(np.uint8)
  intensity = np.where(spurious, rng.uniform(0, 8, len(t)), intensity)
  keep |= spurious

  xyz = dirs.T[keep] * ranges[keep, None]
  out = np.concatenate(
    [xyz, np.clip(np.round(intensity[keep]), 0, 255)[:, None], ring[keep, None]], axis=1
  ).astype(np.float32)
  return out, labels[keep]
