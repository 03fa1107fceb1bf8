"""nuScenes JSON tables of a synthetic world and the file jobs behind them.

The tables are built in the parent process from each scene's timestamps, ego
trajectory and token stream; the sensor files named in them are rendered by
`writer.render_sample`, possibly in other processes, from the same seeds.

A world without cameras has LIDAR_TOP records only (sensor, calibrated_sensor,
sample_data, ego_pose). Its tokens are drawn from the same streams as a world
with cameras (the camera tokens are drawn and left unused), so the lidar
records of a seed do not depend on the cameras.
"""

import dataclasses
import datetime
import functools

import numpy as np

from data_prep import resources
from data_prep.synthetic import lidar, world
from reldistill_jax.classes import NUSCENES_CAMERAS

TABLE_STREAM = 0  # spawn_key component of a scene's token stream
LIDAR = "LIDAR_TOP"
CHANNELS = (LIDAR, *NUSCENES_CAMERAS)
IMAGE_WIDTH, IMAGE_HEIGHT = 1600, 900
EMPTY_TABLES = ("instance", "sample_annotation", "attribute", "visibility")
VEHICLE = "n015"  # the car whose calibration the rig reuses
LOCATION = "synthetic-city"


def channels(cameras: bool = True) -> tuple[str, ...]:
  """The channels of a world: LIDAR_TOP, then the six cameras if it has them."""
  return CHANNELS if cameras else (LIDAR,)


@functools.lru_cache(maxsize=4)
def rig(sensor: str = lidar.DEFAULT_SENSOR) -> tuple[list[dict], dict]:
  """(sensor records, calibrated_sensor record per channel) of the real rig.

  The records keep only the fields of the nuScenes calibrated_sensor table.
  A lidar profile with a mounting height of its own (`lidar.Sensor`) moves
  LIDAR_TOP to that height and keeps the rest of its calibration. The records
  are shared (cached): callers must not modify them.
  """
  data = resources.load_json("nuscenes_rig")
  fields = ("token", "sensor_token", "translation", "rotation", "camera_intrinsic")
  calib = {ch: {k: data["calibrated_sensor"][ch][k] for k in fields} for ch in CHANNELS}
  height = lidar.profile(sensor).mount_height
  if height is not None:
    x, y, _ = calib[LIDAR]["translation"]
    calib[LIDAR] = {**calib[LIDAR], "translation": [x, y, height]}
  return data["sensor"], calib


def scene_names(seed: int, n_scenes: int) -> list[str]:
  """Real nuScenes scene names for the synthetic scenes, sorted.

  n_val = max(1, S // 5) come from `val`; of the n_train = S - n_val training
  scenes, min(7, max(1, n_train // 8)) come from `slidr_train_1pct`,
  n_train // 10 from `slidr_verify_100`, and the rest from `train` minus both,
  so the builders' split rules apply to the synthetic world unchanged. Picks
  are drawn from the root stream of SeedSequence(seed).

  Raises:
    ValueError: if the split lists cannot supply that many names.
  """
  splits = resources.load_json("nuscenes_splits")
  n_val = max(1, n_scenes // 5)
  n_train = n_scenes - n_val
  n_1pct = min(7, max(1, n_train // 8))
  n_verify = n_train // 10
  n_rest = n_train - n_1pct - n_verify
  held = set(splits["slidr_train_1pct"]) | set(splits["slidr_verify_100"])
  pools = [
    (sorted(splits["val"]), n_val),
    (sorted(splits["slidr_train_1pct"]), n_1pct),
    (sorted(splits["slidr_verify_100"]), n_verify),
    (sorted(set(splits["train"]) - held), n_rest),
  ]
  rng = np.random.default_rng(np.random.SeedSequence(seed))
  names = []
  for pool, count in pools:
    if count > len(pool) or count < 0:
      raise ValueError(f"{n_scenes} scenes need {count} names from a split list of {len(pool)}")
    names += [pool[i] for i in sorted(rng.choice(len(pool), count, replace=False))]
  return sorted(names)


@dataclasses.dataclass(frozen=True)
class SampleJob:
  """Everything a worker needs to render one keyframe's files.

  Paths are relative to the dataroot; `lidar_us`/`camera_us` are the capture
  timestamps of LIDAR_TOP and the six cameras (NUSCENES_CAMERAS order);
  `sensor` is the lidar profile (a key of `lidar.SENSORS`).
  """

  seed: int
  scene_index: int
  sample_index: int
  samples_per_scene: int
  sensor: str
  lidar_us: int
  camera_us: tuple[int, ...]
  lidar_file: str
  lidarseg_file: str
  camera_files: tuple[str, ...]  # empty in a world without cameras
  classmap_files: tuple[str, ...]


def _token(rng: np.random.Generator) -> str:
  return rng.bytes(16).hex()


def _log_record(token: str, logfile: str, start: datetime.datetime) -> dict:
  """The log record of one scene (one drive of the rig's car)."""
  return {
    "token": token,
    "logfile": logfile,
    "vehicle": VEHICLE,
    "date_captured": f"{start:%Y-%m-%d}",
    "location": LOCATION,
  }


def _sample_data_record(
  token: str, sample_token: str, calib: dict, stamp: int, filename: str, prev: str, nxt: str
) -> dict:
  """A keyframe's sample_data record (a lidar sweep or a camera image, by its filename)."""
  sweep = filename.endswith(".pcd.bin")
  return {
    "token": token,
    "sample_token": sample_token,
    "ego_pose_token": token,  # as in nuScenes, one ego pose per sample_data, same token
    "calibrated_sensor_token": calib["token"],
    "timestamp": stamp,
    "fileformat": "pcd" if sweep else "jpg",
    "is_key_frame": True,
    "height": 0 if sweep else IMAGE_HEIGHT,
    "width": 0 if sweep else IMAGE_WIDTH,
    "filename": filename,
    "prev": prev,
    "next": nxt,
  }


def scene_tables(
  seed: int,
  index: int,
  samples_per_scene: int,
  name: str,
  version: str,
  sensor: str = lidar.DEFAULT_SENSOR,
  cameras: bool = True,
):
  """Table records of one scene and the jobs that render its files.

  Args:
    seed: world seed.
    index: scene index.
    samples_per_scene: keyframes in the scene.
    name: scene name.
    version: table version folder name (e.g. v1.0-synthetic).
    sensor: lidar profile (a key of `lidar.SENSORS`).
    cameras: whether the world has the six cameras (else LIDAR_TOP only).

  Returns:
    (records, jobs): a dict table name -> list of records (scene, log, sample,
    sample_data, ego_pose, lidarseg), and a list of SampleJob.
  """
  scene = world.build_scene(seed, index, samples_per_scene)
  _, calib = rig(sensor)
  used = channels(cameras)
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, TABLE_STREAM)))
  scene_token, log_token = _token(rng), _token(rng)
  sample_tokens = [_token(rng) for _ in range(samples_per_scene)]
  sd_tokens = [[_token(rng) for _ in CHANNELS] for _ in range(samples_per_scene)]

  start = datetime.datetime.fromtimestamp(int(scene.lidar_us[0]) // 1_000_000, tz=datetime.UTC)
  logfile = f"{VEHICLE}-{start:%Y-%m-%d-%H-%M-%S}+0000-synthetic"
  records = {k: [] for k in ("scene", "log", "sample", "sample_data", "ego_pose", "lidarseg")}
  records["log"].append(_log_record(log_token, logfile, start))
  records["scene"].append(
    {
      "token": scene_token,
      "log_token": log_token,
      "nbr_samples": samples_per_scene,
      "first_sample_token": sample_tokens[0],
      "last_sample_token": sample_tokens[-1],
      "name": name,
      "description": scene.description,
    }
  )

  def link(seq, k):
    return (seq[k - 1] if k > 0 else "", seq[k + 1] if k + 1 < len(seq) else "")

  jobs = []
  for k in range(samples_per_scene):
    prev, nxt = link(sample_tokens, k)
    lidar_us = int(scene.lidar_us[k])
    records["sample"].append(
      {
        "token": sample_tokens[k],
        "timestamp": lidar_us,
        "prev": prev,
        "next": nxt,
        "scene_token": scene_token,
      }
    )
    files = []
    for c, channel in enumerate(used):
      stamp = lidar_us if c == 0 else int(scene.camera_us[k, c - 1])
      token = sd_tokens[k][c]
      ext = "pcd.bin" if c == 0 else "jpg"
      filename = f"samples/{channel}/{logfile}__{channel}__{stamp}.{ext}"
      files.append(filename)
      prev, nxt = link([row[c] for row in sd_tokens], k)
      records["sample_data"].append(
        _sample_data_record(token, sample_tokens[k], calib[channel], stamp, filename, prev, nxt)
      )
      records["ego_pose"].append({"token": token, **scene.ego_pose(stamp)})
    lidarseg_file = f"lidarseg/{version}/{sd_tokens[k][0]}_lidarseg.bin"
    records["lidarseg"].append(
      {"token": sd_tokens[k][0], "sample_data_token": sd_tokens[k][0], "filename": lidarseg_file}
    )
    jobs.append(
      SampleJob(
        seed=seed,
        scene_index=index,
        sample_index=k,
        samples_per_scene=samples_per_scene,
        sensor=sensor,
        lidar_us=lidar_us,
        camera_us=tuple(int(v) for v in scene.camera_us[k]),
        lidar_file=files[0],
        lidarseg_file=lidarseg_file,
        camera_files=tuple(files[1:]),
        classmap_files=tuple(f"synthetic/classmaps/{t}.png" for t in sd_tokens[k][1 : len(used)]),
      )
    )
  return records, jobs


# The world has no map layer, but nuscenes-devkit's loader needs one map record
# whose log_tokens cover every log, and a mask file at its filename (read
# lazily); so one record points at a small, all-background mask.
MAP_SIZE = 64
_MAP_KEY = (1 << 31,)  # spawn_key of the map token's stream; scene keys are (index, stream)


def map_record(seed: int, log_tokens: list[str]) -> dict:
  """The one map record (semantic prior) of the world."""
  token = _token(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=_MAP_KEY)))
  return {
    "category": "semantic_prior",
    "token": token,
    "filename": f"maps/{token}.png",
    "log_tokens": log_tokens,
  }


def static_tables(
  seed: int, log_tokens: list[str], sensor: str = lidar.DEFAULT_SENSOR, cameras: bool = True
) -> dict:
  """Tables shared by every scene: sensor, calibrated_sensor, category, map, empties.

  The sensor and calibrated_sensor tables hold the world's channels only.
  """
  sensors, calib = rig(sensor)
  used = channels(cameras)
  tables = {
    "sensor": [s for s in sensors if s["channel"] in used],
    "calibrated_sensor": [calib[ch] for ch in used],
    "category": resources.load_json("nuscenes_category"),
    "map": [map_record(seed, log_tokens)],
  }
  tables.update({name: [] for name in EMPTY_TABLES})
  return tables
