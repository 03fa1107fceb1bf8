"""Primitives of the synthetic world and the recipes that build objects from them.

Everything solid is a yaw-rotated box or a yaw-rotated ellipsoid, each with a
raw lidarseg id, a colour for the cameras and a reflectivity for the lidar.
Objects (cars, trees, people, ...) are small groups of primitives placed in road
coordinates through `SceneBuilder`, so a curved street bends its content too.
"""

import dataclasses

import numpy as np

from data_prep.synthetic.road import Road

BOX, ELLIPSOID = 0, 1

# Raw lidarseg ids (the `index` of category.json).
NOISE, ADULT, CHILD, WORKER, POLICE = 0, 2, 3, 4, 6
BARRIER, DEBRIS, PUSHABLE, CONE = 9, 10, 11, 12
BICYCLE, BUS, CAR, CONSTRUCTION, MOTORCYCLE, TRAILER, TRUCK = 14, 16, 17, 18, 21, 22, 23
MANMADE, STATIC_OTHER, VEGETATION = 28, 29, 30

# Lidar reflectivity on the nuScenes intensity scale (0-255; real sweeps have a
# median near 12 and retro-reflectors near 255).
REFLECTIVITY = {
    ADULT: 9, CHILD: 9, WORKER: 40, POLICE: 30, BARRIER: 45, DEBRIS: 12, PUSHABLE: 18,
    CONE: 120, BICYCLE: 20, BUS: 28, CAR: 24, CONSTRUCTION: 35, MOTORCYCLE: 20,
    TRAILER: 30, TRUCK: 30, MANMADE: 26, STATIC_OTHER: 22, VEGETATION: 14,
}  # fmt: skip

CAR_PAINTS = np.array([
    [0.92, 0.92, 0.92], [0.08, 0.08, 0.09], [0.62, 0.63, 0.66], [0.40, 0.41, 0.44],
    [0.65, 0.08, 0.07], [0.10, 0.22, 0.50], [0.80, 0.78, 0.70], [0.15, 0.35, 0.25],
])  # fmt: skip
FACADES = np.array([
    [0.80, 0.74, 0.62], [0.62, 0.60, 0.58], [0.55, 0.30, 0.22], [0.88, 0.87, 0.83],
    [0.45, 0.47, 0.52], [0.72, 0.62, 0.48], [0.70, 0.72, 0.70],
])  # fmt: skip
CLOTHES = np.array([
    [0.10, 0.10, 0.12], [0.20, 0.25, 0.45], [0.55, 0.10, 0.10], [0.45, 0.45, 0.45],
    [0.85, 0.85, 0.80], [0.30, 0.40, 0.20], [0.60, 0.45, 0.30],
])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Primitives:
  """Struct of arrays over the P primitives of a scene (world frame, metres).

  Attributes:
    kind: (P,) int8, BOX or ELLIPSOID.
    center: (P, 3) centre.
    half: (P, 3) half extents of a box, or radii of an ellipsoid, in the
      primitive's own frame (x along its yaw).
    yaw: (P,) rotation about the vertical axis.
    label: (P,) uint8 raw lidarseg id.
    color: (P, 3) float32 RGB in 0..1.
    reflectivity: (P,) float32 lidar reflectivity (0-255 scale).
    facade: (P,) bool, building fronts that get a window pattern in images.
  """

  kind: np.ndarray
  center: np.ndarray
  half: np.ndarray
  yaw: np.ndarray
  label: np.ndarray
  color: np.ndarray
  reflectivity: np.ndarray
  facade: np.ndarray

  def __len__(self) -> int:
    return len(self.kind)

  def corners(self) -> np.ndarray:
    """World corners (P, 8, 3) of each primitive's bounding box."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    local = signs[None] * self.half[:, None, :]  # (P, 8, 3)
    c, s = np.cos(self.yaw)[:, None], np.sin(self.yaw)[:, None]
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return np.stack([x, y, local[..., 2]], axis=-1) + self.center[:, None, :]


@dataclasses.dataclass(frozen=True)
class Anchor:
  """World placement of an object: position (x, y) and heading."""

  x: float
  y: float
  yaw: float


class SceneBuilder:
  """Collects primitives placed in road coordinates."""

  def __init__(self, road: Road, rng: np.random.Generator):
    self.road = road
    self.rng = rng
    self._rows: list[tuple] = []

  def anchor(self, s: float, d: float, yaw: float = 0.0) -> Anchor:
    """Anchor at road coordinates (s, d), turned by `yaw` from the road heading."""
    xy, heading = self.road.to_world(np.array([s]), np.array([d]))
    return Anchor(float(xy[0, 0]), float(xy[0, 1]), float(heading[0] + yaw))

  def _add(self, kind, anchor, dx, dy, z, half, label, color, refl, facade=False):
    c, s = np.cos(anchor.yaw), np.sin(anchor.yaw)
    centre = (anchor.x + c * dx - s * dy, anchor.y + s * dx + c * dy, z)
    refl = REFLECTIVITY.get(label, 20) if refl is None else refl
    row = (kind, centre, half, anchor.yaw, label, np.clip(color, 0, 1), refl, facade)
    self._rows.append(row)

  def box(
    self, anchor, length, width, z0, z1, label, color, dx=0.0, dy=0.0, refl=None, facade=False
  ):
    """Adds a box of the given size whose footprint centre is offset (dx, dy)."""
    half = (length / 2, width / 2, (z1 - z0) / 2)
    self._add(BOX, anchor, dx, dy, (z0 + z1) / 2, half, label, color, refl, facade)

  def ellipsoid(self, anchor, rx, ry, z, rz, label, color, dx=0.0, dy=0.0, refl=None):
    """Adds an ellipsoid with radii (rx, ry, rz) centred at height z."""
    self._add(ELLIPSOID, anchor, dx, dy, z, (rx, ry, rz), label, color, refl)

  def vary(self, color, amount: float = 0.08) -> np.ndarray:
    """A colour with per-object variation (brightness and a little hue)."""
    gain = self.rng.uniform(1 - amount * 2, 1 + amount * 2)
    return np.asarray(color) * gain + self.rng.normal(0, amount / 2, 3)

  def build(self) -> Primitives:
    """The collected primitives as arrays."""
    cols = list(zip(*self._rows, strict=True))
    return Primitives(
      kind=np.array(cols[0], dtype=np.int8),
      center=np.array(cols[1], dtype=np.float64),
      half=np.array(cols[2], dtype=np.float64),
      yaw=np.array(cols[3], dtype=np.float64),
      label=np.array(cols[4], dtype=np.uint8),
      color=np.array(cols[5], dtype=np.float32),
      reflectivity=np.array(cols[6], dtype=np.float32),
      facade=np.array(cols[7], dtype=bool),
    )


# Vehicle lengths (metres) drawn before placement so the road can be packed.
VEHICLE_LENGTH = {
    CAR: (3.9, 4.9), TRUCK: (6.5, 9.5), BUS: (10.5, 12.5), TRAILER: (11.0, 15.0),
    CONSTRUCTION: (5.5, 7.0), MOTORCYCLE: (1.9, 2.2), BICYCLE: (1.6, 1.8),
}  # fmt: skip


def vehicle(b: SceneBuilder, kind: int, a: Anchor, length: float) -> None:
  """Adds a vehicle of raw class `kind` centred on anchor `a`, facing its yaw."""
  rng = b.rng
  if kind == CAR:
    paint = b.vary(CAR_PAINTS[rng.integers(len(CAR_PAINTS))], 0.04)
    width, roof = rng.uniform(1.72, 1.95), rng.uniform(1.42, 1.75)
    if rng.random() < 0.15:  # a van: one tall box
      b.box(a, length, width, 0.25, roof + 0.35, CAR, paint)
      return
    b.box(a, length, width, 0.25, 0.95, CAR, paint)
    b.box(a, length * 0.5, width * 0.88, 0.95, roof, CAR, paint * 0.8, dx=-0.06 * length)
  elif kind == TRUCK:
    cab = b.vary(CAR_PAINTS[rng.integers(len(CAR_PAINTS))], 0.05)
    b.box(a, 2.2, 2.45, 0.45, 3.0, TRUCK, cab, dx=length / 2 - 1.1)
    b.box(
      a, length - 2.4, 2.5, 0.9, rng.uniform(3.3, 3.9), TRUCK, b.vary([0.85, 0.85, 0.83]), dx=-1.2
    )
  elif kind == BUS:
    body = b.vary(
      [[0.80, 0.15, 0.12], [0.15, 0.35, 0.75], [0.90, 0.85, 0.30]][rng.integers(3)], 0.04
    )
    b.box(a, length, 2.55, 0.3, 1.3, BUS, body)
    b.box(a, length, 2.55, 1.3, 2.4, BUS, body * 0.35)  # window band
    b.box(a, length, 2.55, 2.4, 3.25, BUS, body)
  elif kind == TRAILER:
    # A tractor unit (truck) pulling a box trailer.
    b.box(
      a, 3.0, 2.45, 0.45, 3.2, TRUCK, b.vary(CAR_PAINTS[rng.integers(8)], 0.05), dx=length / 2 - 1.5
    )
    color = b.vary([[0.75, 0.75, 0.78], [0.25, 0.35, 0.55], [0.85, 0.85, 0.85]][rng.integers(3)])
    b.box(a, length - 3.4, 2.5, 1.1, 4.0, TRAILER, color, dx=-1.7)
  elif kind == CONSTRUCTION:
    yellow = b.vary([0.95, 0.72, 0.08], 0.04)
    b.box(a, length * 0.6, 2.8, 0.0, 0.9, CONSTRUCTION, yellow * 0.3)  # tracks
    b.box(a, length * 0.5, 2.6, 0.9, 2.9, CONSTRUCTION, yellow, dx=-0.15 * length)
    b.box(a, length * 0.45, 0.5, 2.4, 2.9, CONSTRUCTION, yellow, dx=0.3 * length)  # boom
    b.box(a, 0.9, 1.0, 0.3, 1.6, CONSTRUCTION, yellow * 0.5, dx=length / 2 - 0.45)  # bucket
  elif kind == MOTORCYCLE:
    b.box(a, length, 0.7, 0.3, 1.15, MOTORCYCLE, b.vary(CAR_PAINTS[rng.integers(8)], 0.05))
  elif kind == BICYCLE:
    color = b.vary(
      [[0.8, 0.1, 0.1], [0.1, 0.3, 0.8], [0.1, 0.1, 0.1], [0.9, 0.9, 0.2]][rng.integers(4)]
    )
    b.box(a, length, 0.45, 0.3, 1.05, BICYCLE, color)
  else:
    raise ValueError(f"not a vehicle class: {kind}")


def pedestrian(b: SceneBuilder, a: Anchor, label: int = ADULT) -> None:
  """Adds a person (body box and head) of raw class `label`."""
  rng = b.rng
  scale = rng.uniform(0.62, 0.75) if label == CHILD else rng.uniform(0.93, 1.08)
  if label == WORKER:
    clothes = b.vary([1.0, 0.55, 0.05], 0.04)  # high-visibility vest
  elif label == POLICE:
    clothes = b.vary([0.08, 0.12, 0.30], 0.03)
  else:
    clothes = b.vary(CLOTHES[rng.integers(len(CLOTHES))], 0.05)
  b.box(a, 0.32 * scale, 0.5 * scale, 0.0, 1.48 * scale, label, clothes)
  skin = b.vary([0.78, 0.60, 0.48], 0.1)
  b.ellipsoid(a, 0.1 * scale, 0.1 * scale, 1.6 * scale, 0.12 * scale, label, skin)


def tree(b: SceneBuilder, a: Anchor, height: float, crown: float) -> None:
  """Adds a tree: a trunk and an ellipsoidal crown (both vegetation)."""
  rz = crown * b.rng.uniform(0.8, 1.2)
  trunk_top = max(height - 1.6 * rz, 1.5)
  b.box(a, 0.35, 0.35, 0.0, trunk_top + 0.5 * rz, VEGETATION, b.vary([0.33, 0.24, 0.15]))
  green = b.vary([0.20, 0.40, 0.15], 0.1)
  b.ellipsoid(a, crown, crown, trunk_top + rz, rz, VEGETATION, green)


def bush(b: SceneBuilder, a: Anchor) -> None:
  """Adds a low bush."""
  r = b.rng.uniform(0.5, 1.2)
  rz = r * b.rng.uniform(0.6, 0.9)
  b.ellipsoid(
    a, r, r * b.rng.uniform(0.8, 1.2), rz * 0.8, rz, VEGETATION, b.vary([0.22, 0.38, 0.14])
  )


def lamp_post(b: SceneBuilder, a: Anchor, height: float) -> None:
  """Adds a street lamp whose arm points along the anchor's +y (over the road)."""
  grey = b.vary([0.42, 0.43, 0.45], 0.03)
  b.box(a, 0.18, 0.18, 0.0, height, MANMADE, grey, refl=40)
  b.box(a, 0.15, 1.6, height - 0.2, height, MANMADE, grey, dy=0.8, refl=40)


def traffic_sign(b: SceneBuilder, a: Anchor) -> None:
  """Adds a sign on a post; the plate is retro-reflective."""
  b.box(a, 0.08, 0.08, 0.0, 2.2, MANMADE, [0.5, 0.5, 0.5], refl=40)
  color = [[0.85, 0.1, 0.1], [0.1, 0.3, 0.8], [0.95, 0.95, 0.95]][b.rng.integers(3)]
  b.box(a, 0.6, 0.05, 2.0, 2.65, MANMADE, color, refl=220)


def building(b: SceneBuilder, a: Anchor, length: float, depth: float, height: float) -> None:
  """Adds a building whose front face passes through the anchor, facing its +y.

  Roadside anchors have +y towards the road, so the body extends away from it.
  """
  color = b.vary(FACADES[b.rng.integers(len(FACADES))], 0.05)
  b.box(a, length, depth, 0.0, height, MANMADE, color, dy=-depth / 2, facade=True)
  if height > 9 and b.rng.random() < 0.35:  # a set-back top storey
    top = b.rng.uniform(3.0, 6.0)
    b.box(
      a,
      length * 0.7,
      depth * 0.6,
      height,
      height + top,
      MANMADE,
      color * 0.9,
      dy=-depth * 0.6,
      facade=True,
    )


def construction_site(b: SceneBuilder, s0: float, length: float, d_in: float, d_out: float) -> None:
  """Adds road works between |d| = d_in and d_out over s in [s0, s0 + length].

  Barriers line the inner edge, cones taper the approach, an excavator stands
  inside with workers, and sometimes debris lies about. d_in and d_out carry the
  side's sign (negative on the right).
  """
  rng = b.rng
  s = s0
  while s < s0 + length - 1.0:  # barrier line
    seg = rng.uniform(1.8, 2.2)
    color = [0.9, 0.9, 0.88] if rng.random() < 0.6 else [0.95, 0.45, 0.10]
    b.box(b.anchor(s + seg / 2, d_in), seg - 0.05, 0.45, 0.0, 0.95, BARRIER, b.vary(color, 0.04))
    s += seg
  for k in range(int(rng.integers(4, 9))):  # cone taper before the zone
    a = b.anchor(s0 - 2.0 - 2.5 * k, d_in + (d_out - d_in) * k / 8)
    b.box(a, 0.4, 0.4, 0.0, 0.06, CONE, [0.1, 0.1, 0.1])
    b.box(a, 0.26, 0.26, 0.06, 0.72, CONE, b.vary([1.0, 0.45, 0.05], 0.03))
  mid = (d_in + d_out) / 2 + 0.3 * np.sign(d_out)
  a = b.anchor(s0 + length * 0.4, mid, rng.uniform(-0.4, 0.4))
  vehicle(b, CONSTRUCTION, a, rng.uniform(*VEHICLE_LENGTH[CONSTRUCTION]))
  lo, hi = sorted((d_in, d_out))
  for _ in range(int(rng.integers(1, 4))):
    pedestrian(
      b, b.anchor(s0 + rng.uniform(0.7, 0.95) * length, rng.uniform(lo + 0.6, hi - 0.4)), WORKER
    )
  if rng.random() < 0.5:
    debris = b.anchor(s0 + length * 0.8, mid)
    b.box(debris, 1.2, 0.8, 0.0, 0.35, DEBRIS, b.vary([0.45, 0.35, 0.25]))
