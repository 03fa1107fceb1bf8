"""Reading a nuScenes dataroot from its JSON tables, without nuscenes-devkit.

The devkit pins numpy<2 and breaks jax beside it, so the tables are parsed
here directly. `NuScenes` indexes the keyframes of one version folder and
`NuScenes.keyframe(sample_token)` turns one keyframe into the record the
`nuscenes_lidarseg` builder writes: points, 16-class labels, and the
point-to-pixel pairs of the six cameras computed with the full projection chain
of PROTOCOLS.md (camera-time ego pose included). A version folder without any
camera keyframe (a lidar-only synthetic world) gives records with no cameras
and no pairs.

Every problem with the input raises `DatarootError` naming the file at fault.
"""

import json
import pathlib
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import Image

from data_prep import geometry, pointfiles
from reldistill_jax import classes, errors

# Tables the builder cannot work without; `lidarseg` is optional (no labels).
REQUIRED_TABLES = (
  "category",
  "scene",
  "sample",
  "sample_data",
  "calibrated_sensor",
  "ego_pose",
  "sensor",
)
LIDAR_CHANNEL = "LIDAR_TOP"
POINT_COLUMNS = ("x", "y", "z", "intensity", "ring")
POINT_DIMS = len(POINT_COLUMNS)


class DatarootError(errors.DataError):
  """A nuScenes dataroot is missing a file or holds a malformed one."""


def available_versions(dataroot: str | pathlib.Path) -> list[str]:
  """Version folders (`v1.0-*` holding a `scene.json`) under a dataroot."""
  root = pathlib.Path(dataroot)
  return sorted(p.name for p in root.glob("v*") if (p / "scene.json").is_file())


def read_sweep(path: pathlib.Path) -> np.ndarray:
  """Reads a `.pcd.bin` sweep as float32 (N, 5): x, y, z, intensity, ring.

  Raises:
    DatarootError: if the file is missing, its size is not a multiple of 20
      bytes, or it holds a non-finite value.
  """
  return pointfiles.read_points(path, POINT_COLUMNS, DatarootError)


def read_lidarseg(path: pathlib.Path, num_points: int) -> np.ndarray:
  """Reads a lidarseg `.bin` (uint8 raw ids) and maps it to training ids.

  Raises:
    DatarootError: if its length differs from the sweep's point count or it
      holds ids outside 0..31.
  """
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size != num_points:
    raise DatarootError(f"{path}: {raw.size} labels for a sweep of {num_points} points")
  try:
    return classes.nuscenes_raw_to_train(raw)
  except ValueError as e:
    raise DatarootError(f"{path}: {e}") from e


class NuScenes:
  """The keyframes of one version folder of a nuScenes dataroot.

  Attributes:
    dataroot: the dataroot folder.
    version: the version folder name, e.g. `v1.0-trainval`.
    scenes: scene records in the order of scene.json.
    cameras: the camera channels of every keyframe: `classes.NUSCENES_CAMERAS`,
      or () when no sample_data record is of a camera (a lidar-only world).
  """

  def __init__(self, dataroot: str | pathlib.Path, version: str):
    self.dataroot = pathlib.Path(dataroot)
    self.version = version
    table_dir = self.dataroot / version
    if not table_dir.is_dir():
      found = available_versions(self.dataroot) if self.dataroot.is_dir() else []
      raise DatarootError(
        f"{table_dir}: version folder not found (versions found in "
        f"{self.dataroot}: {found or 'none'})"
      )
    tables = {name: self._read_table(table_dir / f"{name}.json") for name in REQUIRED_TABLES}
    self._check_categories(table_dir / "category.json", tables["category"])
    self.scenes = tables["scene"]
    self._samples = {s["token"]: s for s in tables["sample"]}
    self._calib = {c["token"]: c for c in tables["calibrated_sensor"]}
    self._poses = {p["token"]: p for p in tables["ego_pose"]}
    channel_of_sensor = {s["token"]: s["channel"] for s in tables["sensor"]}
    # (sample token, channel) -> keyframe sample_data record.
    self._keyframe_data = {}
    for sd in tables["sample_data"]:
      if not sd["is_key_frame"]:
        continue
      calib = self._lookup(self._calib, sd["calibrated_sensor_token"], "calibrated_sensor", sd)
      channel = channel_of_sensor.get(calib["sensor_token"])
      if channel is None:
        raise DatarootError(
          f"{table_dir / 'sensor.json'}: no sensor {calib['sensor_token']} "
          f"(referenced by calibrated_sensor {calib['token']})"
        )
      self._keyframe_data[(sd["sample_token"], channel)] = sd
    present = {channel for _, channel in self._keyframe_data}
    # All six or none: a keyframe missing some of them fails in `keyframe`.
    has_cameras = not present.isdisjoint(classes.NUSCENES_CAMERAS)
    self.cameras = tuple(classes.NUSCENES_CAMERAS) if has_cameras else ()
    lidarseg_path = table_dir / "lidarseg.json"
    self._lidarseg = {}
    if lidarseg_path.is_file():
      for rec in self._read_table(lidarseg_path):
        self._lidarseg[rec["sample_data_token"]] = rec["filename"]

  @staticmethod
  def _read_table(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
      raise DatarootError(f"{path}: table not found")
    try:
      table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DatarootError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(table, list):
      raise DatarootError(f"{path}: expected a JSON list of records")
    return table

  @staticmethod
  def _check_categories(path: pathlib.Path, table: list[dict]) -> None:
    """The label map is by raw id: check the ids mean what the map assumes."""
    expected = {i: name for i, (name, _) in enumerate(classes.NUSCENES_LIDARSEG_CATEGORIES)}
    for cat in table:
      if "index" in cat and expected.get(cat["index"]) != cat["name"]:
        raise DatarootError(
          f"{path}: category {cat['name']!r} has index {cat['index']}, but the "
          f"lidarseg label map expects {expected.get(cat['index'])!r} there"
        )

  def _lookup(self, table: dict, token: str, name: str, referrer: dict) -> dict:
    try:
      return table[token]
    except KeyError:
      raise DatarootError(
        f"{self.dataroot / self.version / (name + '.json')}: no record {token} "
        f"(referenced by {referrer.get('token', referrer)})"
      ) from None

  def scene_samples(self, scene: dict) -> Iterator[str]:
    """Sample tokens of a scene in time order (following `next`)."""
    token = scene["first_sample_token"]
    while token:
      sample = self._lookup(self._samples, token, "sample", scene)
      yield token
      token = sample["next"]

  def _sample_data(self, sample_token: str, channel: str) -> dict:
    try:
      return self._keyframe_data[(sample_token, channel)]
    except KeyError:
      raise DatarootError(
        f"{self.dataroot / self.version / 'sample_data.json'}: sample {sample_token} "
        f"has no keyframe {channel} record"
      ) from None

  def lidarseg_path(self, lidar_token: str) -> pathlib.Path:
    """Where the lidarseg labels of a lidar sample_data record are (may not exist)."""
    filename = self._lidarseg.get(
      lidar_token, f"lidarseg/{self.version}/{lidar_token}_lidarseg.bin"
    )
    return self.dataroot / filename

  def keyframe(self, sample_token: str, scene_name: str = "") -> dict:
    """The builder record of one keyframe (see `nuscenes_lidarseg` for fields)."""
    lidar = self._sample_data(sample_token, LIDAR_CHANNEL)
    points = read_sweep(self.dataroot / lidar["filename"])
    seg_path = self.lidarseg_path(lidar["token"])
    has_labels = seg_path.is_file()
    if has_labels:
      labels = read_lidarseg(seg_path, len(points))
    else:
      labels = np.zeros(len(points), np.uint8)
    lidar_calib = self._lookup(
      self._calib, lidar["calibrated_sensor_token"], "calibrated_sensor", lidar
    )
    lidar_pose = self._lookup(self._poses, lidar["ego_pose_token"], "ego_pose", lidar)

    images, tokens, intrinsics, sizes = [], [], [], []
    pairs_point, pairs_camera, pairs_uv = [], [], []
    for cam_index, channel in enumerate(self.cameras):
      cam = self._sample_data(sample_token, channel)
      path = self.dataroot / cam["filename"]
      jpeg, (width, height) = _read_jpeg(path)
      if (cam.get("width"), cam.get("height")) not in ((width, height), (0, 0), (None, None)):
        raise DatarootError(
          f"{path}: image is {width}x{height} but sample_data {cam['token']} "
          f"says {cam['width']}x{cam['height']}"
        )
      cam_calib = self._lookup(
        self._calib, cam["calibrated_sensor_token"], "calibrated_sensor", cam
      )
      cam_pose = self._lookup(self._poses, cam["ego_pose_token"], "ego_pose", cam)
      intrinsic = np.asarray(cam_calib["camera_intrinsic"], dtype=np.float64)
      if intrinsic.shape != (3, 3):
        raise DatarootError(
          f"{self.dataroot / self.version / 'calibrated_sensor.json'}: record "
          f"{cam_calib['token']} ({channel}) has no 3x3 camera_intrinsic"
        )
      lidar2cam = geometry.lidar_to_camera(lidar_calib, lidar_pose, cam_pose, cam_calib)
      index, uv = geometry.project_points(points[:, :3], lidar2cam, intrinsic, width, height)
      if index.size == 0:
        logging.warning("%s: no lidar point projects into this image", path)
      images.append(jpeg)
      tokens.append(cam["token"])
      intrinsics.append(intrinsic)
      sizes.append((height, width))
      pairs_point.append(index)
      pairs_camera.append(np.full(index.shape, cam_index, np.uint8))
      pairs_uv.append(uv)

    return {
      "token": sample_token,
      "lidar_token": lidar["token"],
      "scene": scene_name,
      "timestamp": int(lidar["timestamp"]),
      "points": points,
      "labels": labels,
      "has_labels": has_labels,
      # Empty arrays of the same dtypes and trailing shapes without cameras.
      "pairs_point": np.concatenate([np.zeros(0, np.int32), *pairs_point]).astype(np.int32),
      "pairs_camera": np.concatenate([np.zeros(0, np.uint8), *pairs_camera]),
      "pairs_uv": np.concatenate([np.zeros((0, 2)), *pairs_uv]).reshape(-1, 2).astype(np.float32),
      "camera_tokens": np.array(tokens, dtype=object),
      "images": np.array(images, dtype=object),
      "intrinsics": np.array(intrinsics, np.float32).reshape(-1, 3, 3),
      "image_sizes": np.array(sizes, dtype=np.int32).reshape(-1, 2),
    }


def _read_jpeg(path: pathlib.Path) -> tuple[bytes, tuple[int, int]]:
  """Reads a camera image's bytes and its (width, height) from its header."""
  if not path.is_file():
    raise DatarootError(f"{path}: camera image not found")
  data = path.read_bytes()
  try:
    with Image.open(path) as img:
      if img.format != "JPEG":
        raise DatarootError(f"{path}: expected a JPEG image, found {img.format}")
      size = img.size
  except (OSError, SyntaxError) as e:
    raise DatarootError(f"{path}: not a readable image ({e})") from e
  # A JPEG ends with the EOI marker; a truncated download does not. Checking
  # it avoids decoding every image of the dataset.
  if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
    raise DatarootError(f"{path}: JPEG is truncated (no end-of-image marker)")
  return data, size
