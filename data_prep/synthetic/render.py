"""Camera images and class maps rendered from the scene geometry.

A camera is rendered at 1/CLASSMAP_SCALE of its native resolution (400 x 225
for nuScenes' 1600 x 900): each grid pixel is the ray through the native image
point at its centre, cast with the windowed ray caster. The class map holds the
raw lidarseg id of the nearest surface per grid pixel (SKY_ID where the ray
meets nothing). The JPEG is made from the same buffers: class colours varied
per object, Lambert shading from the scene's sun, window patterns on facades,
lane markings, distance haze and a sky gradient, upsampled to the native size
with fine grain added.
"""

import io

import numpy as np
from PIL import Image, ImageChops

from data_prep import geometry
from data_prep.synthetic import raycast
from data_prep.synthetic.road import DRIVEABLE, OTHER_FLAT, SIDEWALK, TERRAIN
from data_prep.synthetic.world import Scene

CLASSMAP_SCALE = 4  # native pixels per class-map pixel along each axis
SKY_ID = 255
JPEG_QUALITY = 85  # with the grain below, about the size of real nuScenes JPEGs (~140 KB)
MAX_DEPTH = 400.0  # metres; ground beyond is drawn as sky (it is sub-pixel anyway)
GRAIN_SIGMA = 2.0  # intensity levels of the fine grain
_GRAIN_PAD = 64

GROUND_COLORS = {
  DRIVEABLE: (0.30, 0.30, 0.32),
  OTHER_FLAT: (0.52, 0.44, 0.40),
  SIDEWALK: (0.62, 0.61, 0.58),
  TERRAIN: (0.33, 0.44, 0.21),
}
MARKING_COLOR = (0.88, 0.88, 0.84)
GLASS_COLOR = (0.16, 0.20, 0.26)


def grid_rays(intrinsic: np.ndarray, width: int, height: int) -> np.ndarray:
  """Camera-frame ray directions (3, h, w) of the class-map grid, with z = 1.

  Grid pixel (i, j) looks through the native image point
  ((j + 0.5) * CLASSMAP_SCALE, (i + 0.5) * CLASSMAP_SCALE), so a native pixel
  coordinate (u, v) falls in grid pixel (floor(v / scale), floor(u / scale)).
  With z = 1 a hit distance along the ray is the camera depth.
  """
  w, h = width // CLASSMAP_SCALE, height // CLASSMAP_SCALE
  u = (np.arange(w) + 0.5) * CLASSMAP_SCALE
  v = (np.arange(h) + 0.5) * CLASSMAP_SCALE
  x = (u[None, :] - intrinsic[0, 2]) / intrinsic[0, 0]
  y = (v[:, None] - intrinsic[1, 2]) / intrinsic[1, 1]
  return np.stack(np.broadcast_arrays(x, y, np.ones((h, w))))


def grain_tile(rng: np.random.Generator, width: int, height: int) -> Image.Image:
  """Fine luminance grain as an RGB image offset by 128, padded for random crops."""
  noise = rng.normal(128.0, GRAIN_SIGMA, (height + _GRAIN_PAD, width + _GRAIN_PAD))
  gray = np.clip(np.round(noise), 0, 255).astype(np.uint8)
  return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")


def _facade_windows(
  scene: Scene, points: np.ndarray, ids: np.ndarray, normals: np.ndarray
) -> np.ndarray:
  """Mask of hit points that fall on a window of a building facade."""
  prims = scene.prims
  on = (ids >= 0) & (np.abs(normals[:, 2]) < 0.5)
  on[on] = prims.facade[ids[on]]
  mask = np.zeros(len(ids), dtype=bool)
  if not on.any():
    return mask
  p = ids[on]
  local = raycast.to_local(prims, p, points[on])
  # Position along the facade: local x on the long faces, local y on the ends.
  scaled = np.abs(local[:, :2] / prims.half[p, :2])
  along = np.where(scaled[:, 1] >= scaled[:, 0], local[:, 0], local[:, 1]) + p * 0.37
  z = points[on, 2]
  mask[on] = (np.mod(along / 3.2, 1.0) > 0.28) & (np.mod(along / 3.2, 1.0) < 0.74)
  mask[on] &= (np.mod(z / 3.3, 1.0) > 0.32) & (np.mod(z / 3.3, 1.0) < 0.8) & (z > 2.5)
  return mask


def render_camera(
  scene: Scene,
  cam_calib: dict,
  timestamp_us: int,
  width: int,
  height: int,
  rng: np.random.Generator,
  grain: np.ndarray,
) -> tuple[bytes, np.ndarray]:
  """Renders one camera.

  Args:
    scene: the scene.
    cam_calib: the camera's calibrated_sensor record.
    timestamp_us: capture time; the ego pose at this time places the camera.
    width: native image width.
    height: native image height.
    rng: generator for per-pixel texture noise and the grain offset.
    grain: image from `grain_tile`.

  Returns:
    (jpeg, classmap): the JPEG bytes (width x height) and the uint8 class map
    (height / CLASSMAP_SCALE, width / CLASSMAP_SCALE) of raw lidarseg ids.
  """
  intrinsic = np.asarray(cam_calib["camera_intrinsic"], dtype=np.float64)
  cam_to_world = scene.ego_matrix(timestamp_us) @ geometry.pose_matrix(cam_calib)
  rays = grid_rays(intrinsic, width, height)  # (3, h, w)
  _, h, w = rays.shape
  dirs = np.einsum("ij,jhw->ihw", cam_to_world[:3, :3], rays)
  grid_k = intrinsic / np.array([[CLASSMAP_SCALE], [CLASSMAP_SCALE], [1.0]])
  windows = raycast.camera_windows(scene.prims, cam_to_world, grid_k, w, h)
  depth, ids = raycast.cast(scene.prims, cam_to_world[:3, 3], dirs, windows, MAX_DEPTH)

  depth, ids = depth.ravel(), ids.ravel()
  dirs = dirs.reshape(3, -1).T  # (h * w, 3)
  solid = ids != raycast.SKY
  points = cam_to_world[:3, 3] + np.where(solid, depth, 0.0)[:, None] * dirs
  labels, marking = scene.surface_labels(points, ids)
  classmap = np.where(solid, labels, SKY_ID).astype(np.uint8).reshape(h, w)

  # Base colour per pixel.
  color = np.zeros((h * w, 3), dtype=np.float32)
  on_prim = ids >= 0
  color[on_prim] = scene.prims.color[ids[on_prim]]
  ground = ids == raycast.GROUND
  for label, rgb in GROUND_COLORS.items():
    color[ground & (labels == label)] = rgb
  color[marking] = MARKING_COLOR
  normals = raycast.hit_normals(scene.prims, points, ids)
  color[_facade_windows(scene, points, ids, normals)] = GLASS_COLOR

  # Lambert shading, distance haze, and a sky gradient from horizon to zenith.
  unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
  lambert = np.clip(normals @ scene.sun, 0.0, 1.0)
  color *= (0.45 + 0.55 * lambert)[:, None]
  color *= 1.0 + rng.normal(0.0, 0.05, (h * w, 1)).astype(np.float32)
  distance = np.where(solid, depth, 0.0) * np.linalg.norm(dirs, axis=1)  # metres
  haze = np.exp(-distance / 250.0)[:, None]
  elevation = np.clip(unit[:, 2], 0.0, 1.0)[:, None] ** 0.6
  sky = (1 - elevation) * scene.sky[0] + elevation * scene.sky[1]
  color = np.where(solid[:, None], color * haze + sky * (1 - haze), sky)

  low = Image.fromarray(np.clip(color * 255, 0, 255).astype(np.uint8).reshape(h, w, 3))
  oy, ox = rng.integers(0, _GRAIN_PAD, 2)
  crop = grain.crop((int(ox), int(oy), int(ox) + width, int(oy) + height))
  # (image + grain) - 128, clipped to 0..255: the grain is stored offset by 128.
  image = ImageChops.add(low.resize((width, height), Image.BILINEAR), crop, scale=1.0, offset=-128)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
  return buffer.getvalue(), classmap
