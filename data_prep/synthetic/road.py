"""Road geometry of a synthetic street and the classes of its ground.

A street is a centre line of constant curvature (a straight line or a gentle
circular arc) parametrised by arc length `s`; `d` is the signed lateral offset
from it (positive to the left of the driving direction). Every object of a scene
is placed in (s, d) and the ground's class is a function of (s, d), so the lidar
and the cameras label the ground through the same function.

Raw lidarseg ids used here: 24 driveable surface, 25 other flat, 26 sidewalk,
27 terrain.
"""

import dataclasses

import numpy as np

DRIVEABLE, OTHER_FLAT, SIDEWALK, TERRAIN = 24, 25, 26, 27

# Below this curvature (1/m) the centre line is treated as straight: the arc
# formulas divide by the curvature.
_STRAIGHT = 1e-6
_MARK_HALF_WIDTH = 0.07  # metres, half width of a painted line
_DASH_PERIOD, _DASH_LENGTH = 9.0, 3.0  # metres, dashed lane lines


@dataclasses.dataclass(frozen=True)
class Road:
  """Centre line of constant curvature.

  Attributes:
    origin: world (x, y) of s = 0.
    heading: direction of travel at s = 0 (radians, counter-clockwise from +x).
    curvature: signed curvature in 1/m (positive turns left).
    s_ref: arc length around which angles are unwrapped in `to_sd` (the middle
      of the scene), so points within half a turn of it map back correctly.
  """

  origin: tuple[float, float]
  heading: float
  curvature: float
  s_ref: float = 0.0

  def _centre(self) -> np.ndarray:
    """Centre (2,) of the arc (only when curved)."""
    r = 1.0 / self.curvature
    return np.asarray(self.origin) + r * np.array([-np.sin(self.heading), np.cos(self.heading)])

  def frame(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points and headings.

    Args:
      s: arc lengths, any shape.

    Returns:
      (xy, heading): xy of shape s.shape + (2,) and heading of shape s.shape.
    """
    s = np.asarray(s, dtype=np.float64)
    heading = self.heading + self.curvature * s
    if abs(self.curvature) < _STRAIGHT:
      direction = np.array([np.cos(self.heading), np.sin(self.heading)])
      return np.asarray(self.origin) + s[..., None] * direction, heading
    r = 1.0 / self.curvature
    # On the arc p(s) = c + r (sin h, -cos h): its derivative is (cos h, sin h).
    xy = self._centre() + r * np.stack([np.sin(heading), -np.cos(heading)], axis=-1)
    return xy, heading

  def to_world(self, s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y) of road coordinates and the road heading there.

    Args:
      s: arc lengths.
      d: lateral offsets (left positive), broadcastable with `s`.

    Returns:
      (xy, heading) as in `frame`.
    """
    xy, heading = self.frame(s)
    normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
    return xy + np.asarray(d, dtype=np.float64)[..., None] * normal, heading

  def to_sd(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Road coordinates (s, d) of world points (inverse of `to_world`).

    Args:
      x: world x, any shape.
      y: world y, same shape.

    Returns:
      (s, d), each of the shape of `x`.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if abs(self.curvature) < _STRAIGHT:
      dx, dy = x - self.origin[0], y - self.origin[1]
      c, s_ = np.cos(self.heading), np.sin(self.heading)
      return dx * c + dy * s_, -dx * s_ + dy * c
    r = 1.0 / self.curvature
    centre = self._centre()
    vx, vy = x - centre[0], y - centre[1]
    dist = np.hypot(vx, vy)
    # p = c + u(h) (r - d) with u(h) = (sin h, -cos h), and r - d has the sign of r.
    sign = np.sign(r)
    heading = np.arctan2(sign * vx, -sign * vy)
    ref = self.heading + self.curvature * self.s_ref
    delta = np.mod(heading - ref + np.pi, 2 * np.pi) - np.pi
    return self.s_ref + delta / self.curvature, r - sign * dist


@dataclasses.dataclass(frozen=True)
class GroundLayout:
  """Cross-section of the street and what lies beyond it, per side.

  Index 0 of the per-side arrays is the right side (d < 0), index 1 the left.

  Attributes:
    median_half: half width of the central traffic island (0 = none).
    median_spans: (M, 2) s intervals where the island exists.
    lane_width: width of a traffic lane.
    lanes_per_side: traffic lanes on each side of the centre line.
    edge: (2,) |d| of the kerb (traffic lanes plus parking lane).
    lanes_end: (2,) |d| where the traffic lanes end (edge line).
    verge: (2,) width of the grass strip between kerb and sidewalk.
    sidewalk: (2,) sidewalk width.
    zone_bounds: per side, (Z + 1,) increasing s boundaries of the zones that
      lie beyond the sidewalk.
    zone_ground: per side, (Z,) raw ground id of each zone.
    zone_depth: |d| beyond which everything is terrain.
    cross: (C, 2) side streets as (s centre, half width); they cut through
      kerb, sidewalk and zones on both sides.
    cross_sidewalk: sidewalk width along the side streets.
    cross_island: half width of the traffic island splitting each side street
      near its mouth (0 = none).
  """

  median_half: float
  median_spans: np.ndarray
  lane_width: float
  lanes_per_side: int
  edge: np.ndarray
  lanes_end: np.ndarray
  verge: np.ndarray
  sidewalk: np.ndarray
  zone_bounds: tuple[np.ndarray, np.ndarray]
  zone_ground: tuple[np.ndarray, np.ndarray]
  zone_depth: float
  cross: np.ndarray
  cross_sidewalk: float
  cross_island: float = 0.0

  def walk_end(self, side: int) -> float:
    """|d| of the outer edge of the sidewalk on a side (0 right, 1 left)."""
    return float(self.edge[side] + self.verge[side] + self.sidewalk[side])

  def in_cross(self, s: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Whether arc lengths fall in a side street (plus `margin`)."""
    s = np.asarray(s, dtype=np.float64)
    inside = np.zeros(s.shape, dtype=bool)
    for centre, half in self.cross:
      inside |= np.abs(s - centre) < half + margin
    return inside

  def classify(self, s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw lidarseg id of the ground and painted-line mask.

    Args:
      s: arc lengths, any shape.
      d: lateral offsets, same shape.

    Returns:
      (labels, marking): uint8 raw ids and a bool mask of painted lines (lane
      and edge lines: still driveable surface, but bright in the camera and
      highly reflective for the lidar).
    """
    s = np.asarray(s, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    a = np.abs(d)
    side = (d > 0).astype(np.intp)
    edge = self.edge[side]
    verge_end = edge + self.verge[side]
    walk_end = verge_end + self.sidewalk[side]

    zone = np.full(s.shape, TERRAIN, dtype=np.uint8)
    for k in (0, 1):
      bounds, ground = self.zone_bounds[k], self.zone_ground[k]
      idx = np.clip(np.searchsorted(bounds, s, side="right") - 1, 0, len(ground) - 1)
      zone = np.where(side == k, ground[idx], zone)

    labels = np.where(a < self.zone_depth, zone, TERRAIN).astype(np.uint8)
    labels[a < walk_end] = SIDEWALK
    labels[a < verge_end] = TERRAIN
    for centre, half in self.cross:
      off = np.abs(s - centre)
      labels[(off < half + self.cross_sidewalk) & (a >= edge)] = SIDEWALK
      labels[(off < half) & (a >= edge)] = DRIVEABLE
      island = (off < self.cross_island) & (a >= edge + 4.0) & (a < edge + 24.0)
      labels[island] = OTHER_FLAT
    road = a < edge
    labels[road] = DRIVEABLE

    on_median = np.zeros(s.shape, dtype=bool)
    if self.median_half > 0:
      for s0, s1 in self.median_spans:
        on_median |= (s >= s0) & (s < s1)
      on_median &= a < self.median_half
      labels[on_median] = OTHER_FLAT

    # Painted lines: edge lines where traffic lanes end, dashed lines between
    # lanes, and a centre line when there is no island; none inside side streets.
    marking = np.abs(a - self.lanes_end[side]) < _MARK_HALF_WIDTH
    dashed = np.mod(s, _DASH_PERIOD) < _DASH_LENGTH
    for k in range(1, self.lanes_per_side):
      marking |= dashed & (np.abs(a - self.median_half - k * self.lane_width) < _MARK_HALF_WIDTH)
    if self.median_half == 0:
      marking |= a < _MARK_HALF_WIDTH
    marking &= road & ~on_median & ~self.in_cross(s)
    return labels, marking
