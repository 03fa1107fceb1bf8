"""Spinning-lidar models: the nuScenes LIDAR_TOP (Velodyne HDL-32E) and a KITTI-like HDL-64E.

A sensor profile (`SENSORS`) gives the beam elevations, the azimuth steps per
revolution and, where it differs from the nuScenes rig, the mounting height:

  hdl32  the nuScenes LIDAR_TOP (the default): 32 beams evenly spaced from
         -30.67 to +10.67 degrees, 1084 azimuth steps, the rig's 1.84 m mount.
  hdl64  KITTI's Velodyne HDL-64E: 64 beams from -24.9 to +2.0 degrees (a
         lower block of 32 at about 1/2 degree and an upper block of 32 at
         about 1/3 degree, as on the real unit), the real unit's 2083
         azimuth steps at 10 Hz, mounted 1.73 m above the ground as in KITTI.
         A scan holds about 114k points (KITTI: ~120k), about 20k voxels at
         0.3 m against the hdl32's 12k, and is cast in about 0.1 s: cheap
         enough on a 2-core CPU that the real density is kept.

Both return up to about 100 m with ~2 cm range noise and a small,
range-dependent dropout. Rays that hit the ego vehicle are removed (nuScenes
keeps them as `vehicle.ego`; the builders would drop them anyway), as are
rays that hit nothing. Points are written in the LIDAR_TOP frame of the real
rig (x right, y forward, z up); the ring of a point is its beam's index, ring
0 the lowest beam.
"""

import dataclasses

import numpy as np

from data_prep import geometry
from data_prep.synthetic import raycast
from data_prep.synthetic.road import DRIVEABLE, OTHER_FLAT, SIDEWALK, TERRAIN
from data_prep.synthetic.world import Scene
from reldistill_jax import errors


@dataclasses.dataclass(frozen=True, eq=False)
class Sensor:
  """A spinning lidar: what the sweep fires and where it sits.

  Attributes:
    model: the unit's name, as `synthetic/meta.json` records it.
    elevations_deg: (beams,) ascending beam elevations; ring r fires at
      elevations_deg[r].
    n_azimuth: azimuth steps per revolution.
    mount_height: height of the lidar above the ground (metres, the z of its
      calibrated_sensor translation); None keeps the nuScenes rig's.
  """

  model: str
  elevations_deg: np.ndarray
  n_azimuth: int
  mount_height: float | None = None


ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)  # HDL-32E: ring r has elevation ELEVATIONS_DEG[r]
N_AZIMUTH = 1084
# HDL-64E: the lower block (-24.9 to -8.83 degrees), then the upper (-8.33 to +2.0).
HDL64_ELEVATIONS_DEG = np.concatenate([np.linspace(-24.9, -8.83, 32), np.linspace(-8.33, 2.0, 32)])
HDL64_AZIMUTH = 2083  # 0.1728 degrees a step: the real unit at 10 Hz
KITTI_MOUNT_HEIGHT = 1.73

DEFAULT_SENSOR = "hdl32"
SENSORS = {
  "hdl32": Sensor("Velodyne HDL-32E", ELEVATIONS_DEG, N_AZIMUTH),
  "hdl64": Sensor("Velodyne HDL-64E", HDL64_ELEVATIONS_DEG, HDL64_AZIMUTH, KITTI_MOUNT_HEIGHT),
}
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


def profile(sensor: str) -> Sensor:
  """The profile named `sensor` (a key of SENSORS).

  Raises:
    errors.ConfigError: for an unknown name (the message lists the known ones).
  """
  if sensor not in SENSORS:
    raise errors.ConfigError(f"unknown lidar sensor {sensor!r}; choose from {', '.join(SENSORS)}")
  return SENSORS[sensor]


def beam_directions(az0: float, sensor: str = DEFAULT_SENSOR) -> np.ndarray:
  """Unit ray directions (3, beams, azimuth steps) of `sensor` in the lidar frame.

  Column 0 looks at azimuth az0; row r is ring r.
  """
  spec = profile(sensor)
  n_az = spec.n_azimuth
  el = np.deg2rad(spec.elevations_deg)[:, None]
  az = az0 + 2 * np.pi * np.arange(n_az)[None, :] / n_az
  shape = (len(el), n_az)
  return np.stack(
    [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.broadcast_to(np.sin(el), shape)]
  )


def ego_shadow(lidar_to_ego: np.ndarray, dirs: np.ndarray) -> np.ndarray:
  """Bool mask (H, W) of rays that hit the ego vehicle's body.

  Args:
    lidar_to_ego: (4, 4) calibrated_sensor transform of the lidar.
    dirs: (3, H, W) ray directions in the lidar frame (a grid of beams and
      azimuth steps, in either order).
  """
  d = np.einsum("ij,jhw->ihw", lidar_to_ego[:3, :3], dirs)
  o = lidar_to_ego[:3, 3]
  hit = np.zeros(d.shape[1:], dtype=bool)
  for lo, hi in EGO_BOXES:
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    half = (np.asarray(hi) - np.asarray(lo)) / 2
    hit |= np.isfinite(raycast.box_hit(o - centre, half, d[0], d[1], d[2]))
  return hit


def sweep(
  scene: Scene,
  lidar_calib: dict,
  timestamp_us: int,
  rng: np.random.Generator,
  sensor: str = DEFAULT_SENSOR,
):
  """Simulates one keyframe sweep of `sensor`.

  Args:
    scene: the scene.
    lidar_calib: LIDAR_TOP calibrated_sensor record (`tables.rig(sensor)`'s,
      which carries the profile's mounting height).
    timestamp_us: capture time; the whole revolution uses the ego pose at it.
    rng: generator for azimuth phase, noise and dropout.
    sensor: a key of SENSORS.

  Returns:
    (points, labels): float32 (N, 5) x, y, z (lidar frame), intensity 0-255,
    ring 0 .. beams - 1; uint8 (N,) raw lidarseg ids. Points are in firing
    order (azimuth step, then beam).
  """
  spec = profile(sensor)
  lidar_to_ego = geometry.pose_matrix(lidar_calib)
  lidar_to_world = scene.ego_matrix(timestamp_us) @ lidar_to_ego
  az0 = rng.uniform(0, 2 * np.pi)
  dirs = beam_directions(az0, sensor)  # (3, beams, A)
  dirs_world = np.einsum("ij,jhw->ihw", lidar_to_world[:3, :3], dirs)
  origin = lidar_to_world[:3, 3]
  n_rows, n_az = len(spec.elevations_deg), spec.n_azimuth
  windows = raycast.azimuth_windows(scene.prims, lidar_to_world, az0, n_az, n_rows, MAX_RANGE)
  t, ids = raycast.cast(scene.prims, origin, dirs_world, windows, MAX_RANGE)

  # Firing order: all beams of one azimuth step, then the next step.
  t, ids = t.T.ravel(), ids.T.ravel()
  dirs, dirs_world = (
    dirs.transpose(0, 2, 1).reshape(3, -1),
    dirs_world.transpose(0, 2, 1).reshape(3, -1),
  )
  ring = np.tile(np.arange(n_rows), n_az)
  self_hit = ego_shadow(lidar_to_ego, dirs.reshape(3, n_az, n_rows)).ravel()

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
