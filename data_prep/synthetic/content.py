"""What stands in a street: traffic, sidewalk life, buildings, parks, skyline.

Placement works in road coordinates (s, d). An occupancy list of (s, d)
rectangles keeps objects from overlapping; the classes every scene must contain
(road works with barriers, cones, an excavator and workers; a bus, a truck, a
trailer, motorcycles, bicycles, people) are placed first, near the ego's path,
so that every evaluation class reaches the lidar in every scene.
"""

import dataclasses

import numpy as np

from data_prep.synthetic import objects as obj
from data_prep.synthetic.road import TERRAIN, GroundLayout

ZONE_DEPTH = 45.0  # |d| beyond which only the skyline stands
BUILDINGS, PARK, PARKING = 0, 1, 2  # kinds of zone beyond a sidewalk
HEDGE_GREEN = (0.2, 0.36, 0.13)


class Occupancy:
  """Axis-aligned rectangles in (s, d) already taken by objects."""

  def __init__(self):
    self._rects = np.zeros((0, 4))

  def take(self, s0: float, s1: float, d0: float, d1: float) -> bool:
    """Marks the rectangle taken and returns True, unless it overlaps one already taken."""
    lo_s, hi_s = min(s0, s1), max(s0, s1)
    lo_d, hi_d = min(d0, d1), max(d0, d1)
    r = self._rects
    if ((r[:, 0] < hi_s) & (r[:, 1] > lo_s) & (r[:, 2] < hi_d) & (r[:, 3] > lo_d)).any():
      return False
    self._rects = np.vstack([r, [[lo_s, hi_s, lo_d, hi_d]]])
    return True


def choice(rng: np.random.Generator, options: dict):
  """Draws a key of `options` with probabilities proportional to its values."""
  keys = list(options)
  p = np.array([options[k] for k in keys], dtype=np.float64)
  return keys[int(rng.choice(len(keys), p=p / p.sum()))]


@dataclasses.dataclass
class Street:
  """A scene being furnished.

  Attributes:
    b: builder collecting the primitives.
    layout: ground layout.
    parking: (2,) parking-lane width per side (0 = none).
    zone_kind: per side, (Z,) BUILDINGS / PARK / PARKING per zone.
    s_lo: first arc length that gets content.
    s_hi: last arc length that gets content.
    near: (s0, s1) stretch the ego's sensors see best.
    ego_d: lateral offset of the ego lane.
    ego_span: (s0, s1) stretch of the ego lane kept clear.
    style: scene-wide parameters (heights, spacings, densities).
    occ: occupied rectangles.
  """

  b: obj.SceneBuilder
  layout: GroundLayout
  parking: np.ndarray
  zone_kind: tuple
  s_lo: float
  s_hi: float
  near: tuple[float, float]
  ego_d: float
  ego_span: tuple[float, float]
  style: dict
  occ: Occupancy = dataclasses.field(default_factory=Occupancy)

  @property
  def rng(self) -> np.random.Generator:
    return self.b.rng

  def lane_d(self, side: int, k: int) -> float:
    """Signed centre offset of traffic lane k (0 innermost) on a side (0 right, 1 left)."""
    return (2 * side - 1) * (self.layout.median_half + (k + 0.5) * self.layout.lane_width)

  def free(self, s: float, d: float, half: float = 0.5) -> bool:
    """Takes a square of half size `half` at (s, d) unless taken or in a side street."""
    if self.layout.in_cross(np.array([s]), margin=2.0)[0]:
      return False
    return self.occ.take(s - half, s + half, d - half, d + half)

  def crosses(self, s0: float, s1: float, margin: float) -> bool:
    """Whether [s0, s1] touches a side street (plus margin)."""
    return bool(self.layout.in_cross(np.array([s0, s1]), margin=margin).any())


def roadside_yaw(side: int) -> float:
  """Yaw that turns a roadside anchor's +y towards the road (0 right, pi left)."""
  return 0.0 if side == 0 else np.pi


def _fill_lane(st: Street, d: float, yaw: float, weights: dict, gap: float) -> None:
  """Packs vehicles along the lane at offset d with exponential gaps of mean `gap`."""
  rng, b = st.rng, st.b
  s = st.s_lo + rng.exponential(gap)
  while s < st.s_hi:
    kind = choice(rng, weights)
    length = rng.uniform(*obj.VEHICLE_LENGTH[kind])
    if st.occ.take(s, s + length, d - 1.2, d + 1.2):
      obj.vehicle(b, kind, b.anchor(s + length / 2, d, yaw + rng.normal(0, 0.02)), length)
    s += length + rng.exponential(gap) + 1.0


def required(st: Street) -> list[str]:
  """Road works, a bus, a truck, a trailer and a motorcycle near the ego path.

  Returns:
    Notes for the scene description.
  """
  rng, layout, b = st.rng, st.layout, st.b
  side = int(rng.integers(2)) if st.parking[0] > 0 else 1
  sign = 2 * side - 1
  # The works take the parking lane, or else the outer lane of the left side
  # (never the ego's lane), and a strip of the sidewalk.
  d_in = layout.lanes_end[side] - (0.0 if st.parking[side] > 0 else layout.lane_width)
  d_out = layout.edge[side] + 1.5
  length = rng.uniform(12, 22)
  s0 = rng.uniform(st.near[0] + 10, st.near[1])
  st.occ.take(s0 - 24, s0 + length, sign * d_in, sign * (d_out + 0.5))
  obj.construction_site(b, s0, length, sign * d_in, sign * d_out)

  lanes = [(s, k) for s in (0, 1) for k in range(layout.lanes_per_side)]
  lanes = [(s, k) for s, k in lanes if abs(st.lane_d(s, k) - st.ego_d) > 0.1]
  for kind in (obj.BUS, obj.TRUCK, obj.TRAILER, obj.MOTORCYCLE):
    for _ in range(20):
      lane_side, k = lanes[int(rng.integers(len(lanes)))]
      d, yaw = st.lane_d(lane_side, k), roadside_yaw(lane_side)
      length = rng.uniform(*obj.VEHICLE_LENGTH[kind])
      # Ahead of or behind the ego rather than beside it, where one bus would
      # fill half of every sweep.
      if rng.random() < 0.7:
        s = rng.uniform(st.near[1] - 25, st.near[1] + 20)
      else:
        s = rng.uniform(-45, -12 - length)
      if st.occ.take(s, s + length, d - 1.3, d + 1.3):
        obj.vehicle(b, kind, b.anchor(s + length / 2, d, yaw), length)
        break
  return [f"road works on the {('right', 'left')[side]}"]


def traffic(st: Street) -> None:
  """Vehicles in the travel lanes (right-hand traffic) and the parking lanes."""
  moving = {obj.CAR: 0.8, obj.TRUCK: 0.08, obj.BUS: 0.04, obj.MOTORCYCLE: 0.04, obj.TRAILER: 0.02}
  parked = {obj.CAR: 0.9, obj.TRUCK: 0.04, obj.MOTORCYCLE: 0.06}
  gap = st.rng.uniform(15, 50)
  for side in (0, 1):
    for k in range(st.layout.lanes_per_side):
      _fill_lane(st, st.lane_d(side, k), roadside_yaw(side), moving, gap)
    if st.parking[side] > 0:
      d = (2 * side - 1) * (st.layout.lanes_end[side] + st.parking[side] / 2)
      _fill_lane(st, d, roadside_yaw(side), parked, st.rng.uniform(3.0, 12.0))


def median(st: Street) -> None:
  """Small trees and shrubs on the central island."""
  rng, b = st.rng, st.b
  for s0, s1 in st.layout.median_spans:
    for s in np.arange(max(s0, st.s_lo) + 2, min(s1, st.s_hi) - 2, rng.uniform(5, 10)):
      if rng.random() < 0.3:
        obj.tree(b, b.anchor(s, 0.0), st.style["tree_h"] * 0.7, min(st.style["crown"], 2.0))
      elif st.layout.median_half > 0.5:
        obj.bush(b, b.anchor(s, 0.0))


def sidewalks(st: Street) -> None:
  """Street trees, shrubs, lamps, signs, furniture, litter, people, parked two-wheelers."""
  rng, b, layout, style = st.rng, st.b, st.layout, st.style
  for side in (0, 1):
    sign, yaw = 2 * side - 1, roadside_yaw(side)
    edge, walk_end = layout.edge[side], layout.walk_end(side)
    kerb = edge + (layout.verge[side] / 2 if layout.verge[side] > 1.2 else 0.7)
    if style["street_trees"][side]:
      for s in np.arange(st.s_lo + rng.uniform(0, 5), st.s_hi, style["tree_spacing"]):
        if st.free(s, sign * kerb, 0.4):
          height = style["tree_h"] * rng.uniform(0.85, 1.15)
          obj.tree(b, b.anchor(s, sign * kerb), height, style["crown"])
    if layout.verge[side] > 1.5:  # shrubs between the verge's trees
      for s in np.arange(st.s_lo, st.s_hi, 4.0):
        if rng.random() < style["shrubs"] and st.free(s + 2, sign * kerb, 0.4):
          obj.bush(b, b.anchor(s + 2, sign * kerb))
    for s in np.arange(st.s_lo + rng.uniform(0, 10), st.s_hi, style["lamp_spacing"]):
      if st.free(s + 3, sign * (edge + 0.5), 0.3):
        obj.lamp_post(b, b.anchor(s + 3, sign * (edge + 0.5), yaw), style["lamp_h"])
    for _ in range(int(rng.integers(2, 6))):
      s = rng.uniform(st.s_lo, st.s_hi)
      if st.free(s, sign * (edge + 0.4), 0.4):
        obj.traffic_sign(b, b.anchor(s, sign * (edge + 0.4), yaw))
    for _ in range(int(rng.integers(0, 3))):  # litter at the kerb
      s = rng.uniform(*st.near)
      if st.free(s, sign * (edge + 0.3), 0.3):
        a = b.anchor(s, sign * (edge + 0.3), rng.uniform(0, np.pi))
        size = rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.5), rng.uniform(0.1, 0.3)
        b.box(a, size[0], size[1], 0.0, size[2], obj.DEBRIS, b.vary([0.45, 0.38, 0.3]))
    for _ in range(int(rng.integers(2, 8))):  # bins, benches, utility cabinets
      s = rng.uniform(st.s_lo, st.s_hi)
      if st.free(s, sign * (walk_end - 0.5), 1.0):
        a = b.anchor(s, sign * (walk_end - 0.5), yaw)
        if rng.random() < 0.5:
          b.box(a, 0.6, 0.6, 0.0, 1.0, obj.PUSHABLE, b.vary([0.15, 0.3, 0.2]))
        else:
          length, width, height = (1.8, 0.5, 0.45) if rng.random() < 0.5 else (0.7, 0.45, 1.3)
          b.box(a, length, width, 0.0, height, obj.STATIC_OTHER, b.vary([0.35, 0.4, 0.35]))

    # People; the first two near the ego path so that every scene has some.
    people = {obj.ADULT: 0.86, obj.CHILD: 0.08, obj.POLICE: 0.03, obj.WORKER: 0.03}
    for k in range(int((st.s_hi - st.s_lo) * style["people"]) + 1):
      s = rng.uniform(*st.near) if k < 2 else rng.uniform(st.s_lo, st.s_hi)
      a = rng.uniform(edge + layout.verge[side] + 0.4, walk_end - 0.4)
      label = choice(rng, people)
      if st.free(s, sign * a, 0.4):
        obj.pedestrian(b, b.anchor(s, sign * a, rng.uniform(0, 2 * np.pi)), label)

    # Parked bicycles in small groups and motorcycles, one of each near the path.
    for g in range(int(rng.integers(1, 3))):
      s0 = rng.uniform(*st.near) if g == 0 else rng.uniform(st.s_lo, st.s_hi)
      for k in range(int(rng.integers(1, 4))):
        if st.free(s0 + 0.8 * k, sign * (walk_end - 0.9), 0.35):
          a = b.anchor(s0 + 0.8 * k, sign * (walk_end - 0.9), np.pi / 2 + rng.normal(0, 0.1))
          obj.vehicle(b, obj.BICYCLE, a, rng.uniform(*obj.VEHICLE_LENGTH[obj.BICYCLE]))
    for g in range(int(rng.integers(1, 3))):
      s = rng.uniform(*st.near) if g == 0 else rng.uniform(st.s_lo, st.s_hi)
      if st.free(s, sign * (walk_end - 1.2), 0.5):
        a = b.anchor(s, sign * (walk_end - 1.2), np.pi / 2 + rng.normal(0, 0.1))
        obj.vehicle(b, obj.MOTORCYCLE, a, rng.uniform(*obj.VEHICLE_LENGTH[obj.MOTORCYCLE]))


def _building_row(st: Street, side: int, z0: float, z1: float, gardens: bool) -> None:
  """A row of buildings along [z0, z1]; front gardens with greenery when unpaved."""
  rng, b, style = st.rng, st.b, st.style
  sign, yaw = 2 * side - 1, roadside_yaw(side)
  walk_end = st.layout.walk_end(side)
  setback = rng.uniform(2.0, 5.0) if gardens else rng.uniform(0.0, 1.5)
  s = z0 + rng.uniform(0, 4)
  while s < z1 - 6:
    length = min(rng.uniform(8, 26), z1 - s)
    if not st.crosses(s, s + length, 3.0):
      front = walk_end + setback + rng.uniform(0, 0.8)
      height = max(4.0, style["height"] * rng.uniform(0.6, 1.5))
      anchor = b.anchor(s + length / 2, sign * front, yaw)
      obj.building(b, anchor, length, rng.uniform(10, 22), height)
      st.occ.take(s, s + length, sign * front, sign * (front + 22))
      if gardens:  # a hedge along the sidewalk, bushes, and often a tree
        if rng.random() < 0.5:
          hedge = b.anchor(s + length / 2, sign * (walk_end + 0.5), yaw)
          height = rng.uniform(0.9, 1.6)
          b.box(hedge, length, 0.8, 0.0, height, obj.VEGETATION, b.vary(HEDGE_GREEN, 0.05))
        for _ in range(int(rng.integers(0, 4))):
          d = walk_end + rng.uniform(1.5, setback)
          obj.bush(b, b.anchor(rng.uniform(s, s + length), sign * d))
        if rng.random() < 0.6:
          a = b.anchor(s + rng.uniform(0.2, 0.8) * length, sign * (walk_end + setback / 2))
          obj.tree(b, a, style["tree_h"] * rng.uniform(0.8, 1.3), min(style["crown"], setback))
    s += length + (0.0 if rng.random() < style["terraced"] else rng.uniform(1.5, 6))


def _park(st: Street, side: int, z0: float, z1: float) -> None:
  """Dense trees and bushes, often behind a fence or a hedge."""
  rng, b, style = st.rng, st.b, st.style
  sign, yaw = 2 * side - 1, roadside_yaw(side)
  walk_end = st.layout.walk_end(side)
  if rng.random() < 0.6:
    fence = rng.random() < 0.5
    for s in np.arange(z0, z1 - 4, 6.0):
      if not st.crosses(s, s + 6, 1.0):
        a = b.anchor(s + 3, sign * (walk_end + 0.3), yaw)
        if fence:
          b.box(a, 6.0, 0.08, 0.0, 1.4, obj.MANMADE, b.vary([0.3, 0.32, 0.3], 0.03))
        else:
          b.box(a, 6.0, 0.8, 0.0, 1.3, obj.VEGETATION, b.vary(HEDGE_GREEN, 0.05))
  for _ in range(int((z1 - z0) * rng.uniform(0.15, 0.35))):
    s, a = rng.uniform(z0, z1), walk_end + rng.uniform(2, ZONE_DEPTH - 8)
    if st.crosses(s, s, 4.0) or not st.occ.take(s - 2, s + 2, sign * a - 2, sign * a + 2):
      continue
    if rng.random() < 0.7:
      height = style["tree_h"] * rng.uniform(0.8, 1.3)
      obj.tree(b, b.anchor(s, sign * a), height, style["crown"] * 1.2)
    else:
      obj.bush(b, b.anchor(s, sign * a))


def _parking_lot(st: Street, side: int, z0: float, z1: float) -> None:
  """Rows of cars parked across the street's direction, a wall at the back."""
  rng, b = st.rng, st.b
  sign, yaw = 2 * side - 1, roadside_yaw(side)
  walk_end = st.layout.walk_end(side)
  rows = int(rng.integers(1, 4))
  for r in range(rows):
    a = walk_end + 3.0 + 6.5 * r
    for s in np.arange(z0 + 2, z1 - 2, rng.uniform(2.5, 2.9)):
      if rng.random() < 0.5 and not st.crosses(s, s, 4.0):
        if st.occ.take(s - 1.1, s + 1.1, sign * (a - 2.4), sign * (a + 2.4)):
          yaw_car = np.pi / 2 + rng.choice([0.0, np.pi]) + rng.normal(0, 0.04)
          length = rng.uniform(*obj.VEHICLE_LENGTH[obj.CAR])
          obj.vehicle(b, obj.CAR, b.anchor(s, sign * a, yaw_car), length)
  back = walk_end + 6.5 * rows + 2.0
  for s in np.arange(z0, z1 - 5, 5.0):
    if not st.crosses(s, s + 5, 1.0):
      wall = b.anchor(s + 2.5, sign * back, yaw)
      b.box(wall, 5.0, 0.3, 0.0, 2.0, obj.MANMADE, b.vary([0.7, 0.66, 0.58], 0.03))


def zones(st: Street) -> None:
  """Buildings, parks and parking lots beyond the sidewalks."""
  for side in (0, 1):
    bounds = st.layout.zone_bounds[side]
    for z, kind in enumerate(st.zone_kind[side]):
      z0, z1 = max(bounds[z], st.s_lo), min(bounds[z + 1], st.s_hi)
      if kind == BUILDINGS:
        _building_row(st, side, z0, z1, st.layout.zone_ground[side][z] == TERRAIN)
      elif kind == PARK:
        _park(st, side, z0, z1)
      else:
        _parking_lot(st, side, z0, z1)


def skyline(st: Street) -> None:
  """Tall buildings behind the zones on both sides, which close the street canyon."""
  rng, b = st.rng, st.b
  for side in (0, 1):
    sign, yaw = 2 * side - 1, roadside_yaw(side)
    s = st.s_lo - 20 + rng.uniform(0, 10)
    while s < st.s_hi + 20:
      length = rng.uniform(15, 40)
      front = ZONE_DEPTH + rng.uniform(0, 12)
      height = st.style["height"] * rng.uniform(1.0, 2.2)
      anchor = b.anchor(s + length / 2, sign * front, yaw)
      obj.building(b, anchor, length, rng.uniform(15, 30), height)
      s += length + rng.uniform(0, 12)


def furnish(st: Street) -> list[str]:
  """Places all content; returns notes for the scene description."""
  median(st)
  st.occ.take(*st.ego_span, st.ego_d - 1.3, st.ego_d + 1.3)  # keep the ego lane clear
  notes = required(st)
  traffic(st)
  sidewalks(st)
  zones(st)
  skyline(st)
  return notes
