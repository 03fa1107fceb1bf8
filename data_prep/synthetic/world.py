"""The procedural street scene: layout, content and the ego trajectory.

A scene is a street (`road.Road`) with a cross-section and zones beyond the
sidewalks (`road.GroundLayout`) and several hundred primitives (`objects`).
The ego drives along one lane at constant speed; `Scene.ego_pose` gives its
pose at any timestamp, which is what puts cameras and lidar at their own
capture times. Everything is drawn from the scene's own random stream, so a
scene depends only on (seed, scene index, samples per scene).
"""

import dataclasses
import functools

import numpy as np

from data_prep import geometry
from data_prep.synthetic import content, raycast
from data_prep.synthetic import objects as obj
from data_prep.synthetic.road import DRIVEABLE, SIDEWALK, TERRAIN, GroundLayout, Road

KEYFRAME_PERIOD_US = 500_000  # nuScenes keyframes are 2 Hz
# Camera capture time relative to the lidar keyframe (microseconds), cameras in
# NUSCENES_CAMERAS order; the offsets of the real scene-0061 keyframe.
CAMERA_OFFSET_US = np.array([-35_500, -27_600, -20_000, -10_400, -600, -43_100])
_CAMERA_JITTER_US = 300
WORLD_STREAM = 1  # spawn_key component of the scene-content stream
_MARGIN = 110.0  # metres of street before the first and after the last pose
_ZONE_NAMES = ("buildings", "park", "parking")  # by content.BUILDINGS, PARK, PARKING
_ZONE_WEIGHTS = {content.BUILDINGS: 0.62, content.PARK: 0.25, content.PARKING: 0.13}


@dataclasses.dataclass(frozen=True)
class Scene:
  """One street and its content.

  Attributes:
    index: scene index within the world.
    road: centre-line geometry.
    layout: ground classes by (s, d).
    prims: the solid primitives.
    ego_d: lateral offset of the ego lane.
    speed: ego speed in m/s.
    lidar_us: (K,) int64 keyframe (LIDAR_TOP) timestamps in microseconds; the
      ego is at s = 0 at the first one.
    camera_us: (K, 6) int64 camera timestamps, cameras in NUSCENES_CAMERAS order.
    sun: (3,) unit vector towards the sun (world frame), for shading.
    sky: (2, 3) sky colour at the horizon and the zenith.
    description: a sentence for scene.json.
  """

  index: int
  road: Road
  layout: GroundLayout
  prims: obj.Primitives
  ego_d: float
  speed: float
  lidar_us: np.ndarray
  camera_us: np.ndarray
  sun: np.ndarray
  sky: np.ndarray
  description: str

  def ego_pose(self, timestamp_us: int) -> dict:
    """ego_pose record (translation, rotation w,x,y,z) at a timestamp."""
    s = self.speed * (timestamp_us - int(self.lidar_us[0])) * 1e-6
    xy, heading = self.road.to_world(np.array([s]), np.array([self.ego_d]))
    half = 0.5 * float(heading[0])
    return {
      "timestamp": int(timestamp_us),
      "rotation": [float(np.cos(half)), 0.0, 0.0, float(np.sin(half))],
      "translation": [float(xy[0, 0]), float(xy[0, 1]), 0.0],
    }

  def ego_matrix(self, timestamp_us: int) -> np.ndarray:
    """4x4 ego-to-global transform at a timestamp."""
    return geometry.pose_matrix(self.ego_pose(timestamp_us))

  def surface_labels(self, points: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids of hit surfaces and the painted-line mask of ground hits.

    Lidar and cameras both label through this, so they agree by construction.

    Args:
      points: (N, 3) world hit points.
      ids: (N,) primitive index, raycast.GROUND or raycast.SKY (label 0).

    Returns:
      (labels, marking): uint8 (N,) raw ids and bool (N,) painted lines.
    """
    labels = np.zeros(len(ids), dtype=np.uint8)
    marking = np.zeros(len(ids), dtype=bool)
    on_prim = ids >= 0
    labels[on_prim] = self.prims.label[ids[on_prim]]
    ground = ids == raycast.GROUND
    s, d = self.road.to_sd(points[ground, 0], points[ground, 1])
    labels[ground], marking[ground] = self.layout.classify(s, d)
    return labels, marking


def _layout(rng: np.random.Generator, s_lo: float, s_hi: float):
  """Draws the street cross-section, side streets and zones.

  Returns:
    (layout, parking, zone_kind): the GroundLayout, the parking-lane width per
    side (0 = none), and per side the content.BUILDINGS/PARK/PARKING kind of
    each zone.
  """
  lanes = int(rng.choice([1, 2, 3], p=[0.45, 0.45, 0.1]))
  lane_w = rng.uniform(3.0, 3.6)
  median = rng.uniform(0.6, 2.0) if rng.random() < (0.5 if lanes > 1 else 0.2) else 0.0
  parking = np.where(rng.random(2) < 0.5, rng.uniform(2.1, 2.5, 2), 0.0)
  lanes_end = median / 2 + lanes * lane_w
  verge = np.where(rng.random(2) < 0.5, rng.uniform(1.0, 3.5, 2), 0.0)
  sidewalk = rng.uniform(1.8, 4.5, 2)

  n_cross = int(rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2]))
  centres = np.sort(rng.uniform(s_lo + 30, s_hi - 30, n_cross))
  if n_cross == 2 and centres[1] - centres[0] < 45:
    centres = centres[:1]
  cross = np.array([[c, rng.uniform(4.0, 7.0)] for c in centres]).reshape(-1, 2)

  bounds, grounds, kinds = [], [], []
  for _ in range(2):
    edges, kind = [s_lo - 60.0], []
    while edges[-1] < s_hi + 60:
      kind.append(content.choice(rng, _ZONE_WEIGHTS))
      edges.append(edges[-1] + rng.uniform(30, 110))
    # Building zones are paved forecourts or front gardens.
    fixed = {content.PARK: TERRAIN, content.PARKING: DRIVEABLE}
    ground = [
      fixed[k] if k in fixed else rng.choice([SIDEWALK, TERRAIN], p=[0.6, 0.4]) for k in kind
    ]
    bounds.append(np.array(edges))
    grounds.append(np.array(ground, dtype=np.uint8))
    kinds.append(np.array(kind))

  # Islands stop at side streets.
  cuts = [s_lo - 200.0] + [v for c, h in cross for v in (c - h - 3, c + h + 3)] + [s_hi + 200.0]
  spans = np.array(cuts).reshape(-1, 2) if median > 0 else np.zeros((0, 2))
  layout = GroundLayout(
    median_half=median / 2,
    median_spans=spans,
    lane_width=lane_w,
    lanes_per_side=lanes,
    edge=lanes_end + parking,
    lanes_end=np.full(2, lanes_end),
    verge=verge,
    sidewalk=sidewalk,
    zone_bounds=tuple(bounds),
    zone_ground=tuple(grounds),
    zone_depth=content.ZONE_DEPTH,
    cross=cross,
    cross_sidewalk=rng.uniform(1.8, 3.0),
    cross_island=rng.uniform(0.5, 1.2) if rng.random() < 0.6 else 0.0,
  )
  return layout, parking, tuple(kinds)


@functools.lru_cache(maxsize=4)
def build_scene(seed: int, index: int, samples_per_scene: int) -> Scene:
  """Draws scene `index` of the world of `seed`.

  Args:
    seed: world seed.
    index: scene index; the scene's stream is SeedSequence(seed) spawned at
      (index, WORLD_STREAM), independent of every other scene.
    samples_per_scene: keyframes in the scene (sets how far the ego drives).

  Returns:
    The scene.
  """
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, WORLD_STREAM)))
  speed = rng.uniform(5.0, 10.0)
  start = 1_533_000_000_000_000 + index * 3_600_000_000 + int(rng.integers(0, 1_000_000_000))
  jitter = rng.integers(-2_000, 2_001, samples_per_scene)
  lidar_us = start + np.arange(samples_per_scene, dtype=np.int64) * KEYFRAME_PERIOD_US + jitter
  lidar_us[0] = start
  cam_jitter = rng.integers(-_CAMERA_JITTER_US, _CAMERA_JITTER_US + 1, (samples_per_scene, 6))
  camera_us = lidar_us[:, None] + CAMERA_OFFSET_US[None, :] + cam_jitter
  travel = speed * (samples_per_scene - 1) * KEYFRAME_PERIOD_US * 1e-6
  s_lo, s_hi = -_MARGIN, travel + _MARGIN
  curvature = 0.0 if rng.random() < 0.35 else rng.choice([-1, 1]) / rng.uniform(150, 600)
  road = Road(
    origin=(float(rng.uniform(300, 2000)), float(rng.uniform(300, 2000))),
    heading=float(rng.uniform(-np.pi, np.pi)),
    curvature=float(curvature),
    s_ref=travel / 2,
  )
  layout, parking, zone_kind = _layout(rng, s_lo, s_hi)
  ego_d = -(
    layout.median_half + (int(rng.integers(layout.lanes_per_side)) + 0.5) * layout.lane_width
  )
  style = {
    "height": rng.uniform(9, 28),
    "terraced": rng.uniform(0.2, 0.8),
    "tree_h": rng.uniform(6, 12),
    "crown": rng.uniform(1.8, 3.2),
    "tree_spacing": rng.uniform(6, 12),
    "street_trees": rng.random(2) < 0.75,
    "shrubs": rng.uniform(0.2, 0.7),
    "lamp_spacing": rng.uniform(22, 38),
    "lamp_h": rng.uniform(6, 9),
    "people": rng.uniform(0.02, 0.09),
  }
  street = content.Street(
    b=obj.SceneBuilder(road, rng),
    layout=layout,
    parking=parking,
    zone_kind=zone_kind,
    s_lo=s_lo,
    s_hi=s_hi,
    near=(-5.0, travel + 35.0),  # where the ego's sensors look closest
    ego_d=ego_d,
    ego_span=(-10.0, travel + 12.0),
    style=style,
  )
  notes = content.furnish(street)

  sun_el, sun_az = np.deg2rad(rng.uniform(25, 65)), rng.uniform(-np.pi, np.pi)
  sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
  sky = np.array([[0.80, 0.85, 0.90], [0.38, 0.55, 0.82]]) * rng.uniform(0.9, 1.05)
  turn = "left" if curvature > 0 else "right"
  shape = "straight" if curvature == 0 else f"{turn} curve R={abs(1 / curvature):.0f} m"
  kinds = [_ZONE_NAMES[k] for k in sorted(set(np.concatenate(zone_kind).tolist()))]
  description = (
    f"Synthetic street, {layout.lanes_per_side}+{layout.lanes_per_side} lanes, {shape}, "
    + f"ego at {speed:.1f} m/s"
    + (", median island" if layout.median_half > 0 else "")
    + f", {len(layout.cross)} side street(s), {', '.join(notes)}, {'/'.join(kinds)}"
  )
  return Scene(
    index=index,
    road=road,
    layout=layout,
    prims=street.b.build(),
    ego_d=ego_d,
    speed=speed,
    lidar_us=lidar_us,
    camera_us=camera_us,
    sun=sun,
    sky=sky,
    description=description,
  )
