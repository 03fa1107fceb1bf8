"""Ray casting of a grid of rays against the scene's primitives and ground.

Both sensors are a grid of rays from one origin: the lidar's beams x azimuth
steps (32 x 1084 for the HDL-32E), or a camera's pixels. Testing every ray
against every primitive would be far too slow in numpy, so each primitive is
tested only against the rays of its *window*: the sub-rectangle of the grid its projection can cover
(the projected bounding rectangle for a camera, the azimuth interval for the
lidar). A depth buffer keeps the nearest hit; the ground (z = 0) is intersected
analytically for every ray first.
"""

import numpy as np

from data_prep.synthetic.objects import BOX, Primitives

GROUND, SKY = -1, -2  # ids of non-primitive surfaces in the id buffer

# Corner order of Primitives.corners is 4 * ix + 2 * iy + iz; an edge joins two
# corners that differ in one of those bits.
_EDGES = np.array([(i, i | bit) for i in range(8) for bit in (4, 2, 1) if not i & bit])  # (12, 2)


def box_hit(o, h, lx, ly, lz):
  """Entry distance of rays into an axis-aligned box (inf where missed).

  Args:
    o: (3,) ray origin in the box frame.
    h: (3,) half extents.
    lx, ly, lz: direction components in the box frame, arrays of one shape.

  Returns:
    Array of that shape.
  """
  with np.errstate(divide="ignore", invalid="ignore"):
    near = far = None
    for axis, comp in enumerate((lx, ly, lz)):
      inv = 1.0 / comp
      ta = (-h[axis] - o[axis]) * inv
      tb = (h[axis] - o[axis]) * inv
      lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
      near = lo if near is None else np.maximum(near, lo)
      far = hi if far is None else np.minimum(far, hi)
    return np.where((near <= far) & (near > 0), near, np.inf)


def ellipsoid_hit(o, r, lx, ly, lz):
  """Entry distance of rays into an axis-aligned ellipsoid (inf where missed).

  Args:
    o: (3,) ray origin in the ellipsoid frame.
    r: (3,) radii.
    lx, ly, lz: direction components in the ellipsoid frame, arrays of one shape.

  Returns:
    Array of that shape.
  """
  ox, oy, oz = o / r
  ux, uy, uz = lx / r[0], ly / r[1], lz / r[2]
  a = ux * ux + uy * uy + uz * uz
  half_b = ox * ux + oy * uy + oz * uz
  disc = half_b * half_b - a * (ox * ox + oy * oy + oz * oz - 1.0)
  with np.errstate(invalid="ignore"):
    t = (-half_b - np.sqrt(disc)) / a
  return np.where((disc >= 0) & (t > 0), t, np.inf)


def cast(prims: Primitives, origin: np.ndarray, dirs: np.ndarray, windows, max_t: float):
  """Nearest surface along every ray of a grid.

  Args:
    prims: scene primitives.
    origin: (3,) world position of the sensor.
    dirs: (3, H, W) world ray directions (any positive scale: hit distances
      are in units of the direction's length).
    windows: iterable of (primitive index, row0, row1, col0, col1): the rays
      each primitive is tested against.
    max_t: ground hits beyond this distance count as sky.

  Returns:
    (t, ids): float64 (H, W) hit distance (inf for sky) and int32 (H, W)
    primitive index, GROUND or SKY.
  """
  dz = dirs[2]
  with np.errstate(divide="ignore"):
    t = np.where(dz < 0, -origin[2] / dz, np.inf)  # (H, W)
  t[t > max_t] = np.inf
  ids = np.where(np.isfinite(t), GROUND, SKY).astype(np.int32)

  cos, sin = np.cos(prims.yaw), np.sin(prims.yaw)
  rel = origin[None, :] - prims.center  # (P, 3)
  local_o = np.stack(
    [cos * rel[:, 0] + sin * rel[:, 1], -sin * rel[:, 0] + cos * rel[:, 1], rel[:, 2]], 1
  )
  for p, r0, r1, c0, c1 in windows:
    dx, dy = dirs[0, r0:r1, c0:c1], dirs[1, r0:r1, c0:c1]
    lx = cos[p] * dx + sin[p] * dy
    ly = cos[p] * dy - sin[p] * dx
    hit = box_hit if prims.kind[p] == BOX else ellipsoid_hit
    tp = hit(local_o[p], prims.half[p], lx, ly, dirs[2, r0:r1, c0:c1])
    t_win, id_win = t[r0:r1, c0:c1], ids[r0:r1, c0:c1]  # views into the buffers
    closer = tp < t_win
    t_win[closer] = tp[closer]
    id_win[closer] = p
  return t, ids


def camera_windows(
  prims: Primitives, cam_to_world: np.ndarray, intrinsic: np.ndarray, width: int, height: int
):
  """Pixel windows of the primitives in a pinhole camera.

  A primitive's window is the bounding rectangle of its bounding box's
  projection; box edges that cross the near plane are clipped there, so the
  rectangle stays exact when a box reaches behind the camera.

  Args:
    prims: scene primitives.
    cam_to_world: (4, 4) camera pose (camera frame: x right, y down, z ahead).
    intrinsic: (3, 3) camera matrix of the rendered grid.
    width: grid width in pixels.
    height: grid height in pixels.

  Returns:
    List of (primitive index, row0, row1, col0, col1), rows/cols exclusive at
    the end, pixel (i, j) being the ray through the grid point (j + .5, i + .5).
  """
  near = 0.05
  rot, pos = cam_to_world[:3, :3], cam_to_world[:3, 3]
  cam = (prims.corners() - pos) @ rot  # (P, 8, 3)
  p0, p1 = cam[:, _EDGES[:, 0]], cam[:, _EDGES[:, 1]]  # (P, 12, 3)
  z0, z1 = p0[..., 2], p1[..., 2]
  crosses = (z0 - near) * (z1 - near) < 0
  with np.errstate(divide="ignore", invalid="ignore"):
    f = np.where(crosses, (near - z0) / (z1 - z0), 0.0)
  clipped = p0 + f[..., None] * (p1 - p0)
  points = np.concatenate([cam, clipped], axis=1)  # (P, 20, 3)
  valid = np.concatenate([cam[..., 2] >= near, crosses], axis=1)
  z = np.where(valid, points[..., 2], 1.0)
  u = intrinsic[0, 0] * points[..., 0] / z + intrinsic[0, 2]
  v = intrinsic[1, 1] * points[..., 1] / z + intrinsic[1, 2]
  big = np.inf
  c0 = np.ceil(np.where(valid, u, big).min(1) - 0.5)
  c1 = np.floor(np.where(valid, u, -big).max(1) - 0.5) + 1
  r0 = np.ceil(np.where(valid, v, big).min(1) - 0.5)
  r1 = np.floor(np.where(valid, v, -big).max(1) - 0.5) + 1
  with np.errstate(invalid="ignore"):
    c0, c1 = np.clip(c0, 0, width), np.clip(c1, 0, width)
    r0, r1 = np.clip(r0, 0, height), np.clip(r1, 0, height)
  keep = valid.any(1) & (c1 > c0) & (r1 > r0)
  idx = np.flatnonzero(keep)
  return list(
    zip(
      idx,
      r0[idx].astype(int),
      r1[idx].astype(int),
      c0[idx].astype(int),
      c1[idx].astype(int),
      strict=True,
    )
  )


def azimuth_windows(
  prims: Primitives,
  sensor_to_world: np.ndarray,
  az0: float,
  n_az: int,
  n_rows: int,
  max_range: float,
):
  """Column windows of the primitives for a spinning sensor.

  Column c looks at azimuth az0 + 2 pi c / n_az in the sensor frame. A convex
  body that does not surround the sensor's vertical axis covers exactly the
  azimuth interval of its corners, which spans less than pi; a wider span means
  it surrounds the axis, and then every column is tested.

  Args:
    prims: scene primitives.
    sensor_to_world: (4, 4) sensor pose.
    az0: azimuth of column 0 (radians).
    n_az: columns per revolution.
    n_rows: rows (beams) of the grid; every window spans all of them.
    max_range: primitives entirely beyond this distance are skipped.

  Returns:
    List of (primitive index, 0, n_rows, col0, col1); an interval that wraps
    past column n_az - 1 is split in two windows.
  """
  rot, pos = sensor_to_world[:3, :3], sensor_to_world[:3, 3]
  local = (prims.corners() - pos) @ rot  # (P, 8, 3)
  az = np.arctan2(local[..., 1], local[..., 0])
  ref = np.arctan2(local[..., 1].mean(1), local[..., 0].mean(1))
  rel = np.mod(az - ref[:, None] + np.pi, 2 * np.pi) - np.pi
  lo, hi = ref + rel.min(1), ref + rel.max(1)
  surrounds = hi - lo >= np.pi - 1e-9
  step = 2 * np.pi / n_az
  first = np.ceil((lo - az0) / step).astype(int)
  count = np.floor((hi - az0) / step).astype(int) - first + 1
  first = np.where(surrounds, 0, first % n_az)
  count = np.where(surrounds, n_az, np.minimum(count, n_az))
  reach = np.linalg.norm(prims.center - pos, axis=1) - np.linalg.norm(prims.half, axis=1)
  windows = []
  for p in np.flatnonzero((count > 0) & (reach < max_range)):
    start, end = int(first[p]), int(first[p] + count[p])
    windows.append((p, 0, n_rows, start, min(end, n_az)))
    if end > n_az:
      windows.append((p, 0, n_rows, 0, end - n_az))
  return windows


def to_local(prims: Primitives, p: np.ndarray, points: np.ndarray) -> np.ndarray:
  """World points (N, 3) in the frames of primitives p (N,)."""
  cos, sin = np.cos(prims.yaw[p]), np.sin(prims.yaw[p])
  rel = points - prims.center[p]
  return np.stack(
    [cos * rel[:, 0] + sin * rel[:, 1], -sin * rel[:, 0] + cos * rel[:, 1], rel[:, 2]], 1
  )


def hit_normals(prims: Primitives, points: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Unit surface normals at hit points.

  Args:
    prims: scene primitives.
    points: (N, 3) world hit points.
    ids: (N,) primitive index, or GROUND (normal +z).

  Returns:
    (N, 3) normals.
  """
  normals = np.zeros_like(points)
  normals[:, 2] = 1.0
  on = ids >= 0
  if not on.any():
    return normals
  p = ids[on]
  local = to_local(prims, p, points[on])
  half = prims.half[p]
  # A box's face is the axis where the point is relatively farthest out; an
  # ellipsoid's normal is the gradient of its implicit function.
  scaled = local / half
  axis = np.argmax(np.abs(scaled), axis=1)
  box_n = np.zeros_like(local)
  box_n[np.arange(len(p)), axis] = np.sign(scaled[np.arange(len(p)), axis])
  ell_n = local / half**2
  n_local = np.where((prims.kind[p] == BOX)[:, None], box_n, ell_n)
  cos, sin = np.cos(prims.yaw[p]), np.sin(prims.yaw[p])
  world = np.stack(
    [
      cos * n_local[:, 0] - sin * n_local[:, 1],
      sin * n_local[:, 0] + cos * n_local[:, 1],
      n_local[:, 2],
    ],
    1,
  )
  normals[on] = world / np.linalg.norm(world, axis=1, keepdims=True)
  return normals
