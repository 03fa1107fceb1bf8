"""Writes a synthetic world as a nuScenes dataroot, safely and in parallel.

Layout of the output folder:

  <version>/*.json                       nuScenes tables (+ lidarseg.json)
  maps/<token>.png                       empty semantic-prior mask (see tables.MAP_TOKEN)
  samples/LIDAR_TOP/*.pcd.bin            float32 x, y, z, intensity, ring
  samples/CAM_*/*.jpg                    1600 x 900 JPEGs
  lidarseg/<version>/<token>_lidarseg.bin  uint8 raw lidarseg id per point
  synthetic/classmaps/<cam sd token>.png  uint8 raw ids at 400 x 225 (255 sky)
  synthetic/meta.json                    generator parameters (written last)

The lidar is a profile of `lidar.SENSORS` (`sensor`, default the nuScenes
HDL-32E). A world without cameras (`cameras=False`: a lidar-only target, as
SemanticKITTI is used) has no CAM_* folders, images or class maps, and only
LIDAR_TOP records in its tables. meta.json records both: `lidar` describes the
profile (`model`, beams, elevations, azimuth steps, and `mount_height_m` where
the profile moves the lidar off the nuScenes rig), and `cameras` lists the
camera channels (empty without cameras; `image`, `classmap` and
`camera_offset_us` are then absent). No key names the profile itself, so the
default world's meta.json keeps its bytes: worlds already written, and the
synthetic teacher's weights hash (which covers meta.json), stay valid.

The world is written into a temporary sibling folder that is renamed into place
at the end, so an interrupted run never leaves a folder that looks complete.
"""

import concurrent.futures
import functools
import json
import multiprocessing
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.synthetic import lidar, render, tables, world
from reldistill_jax import cli, errors
from reldistill_jax.classes import NUSCENES_CAMERAS

FORMAT_VERSION = 1
SAMPLE_STREAM, GRAIN_STREAM = 2, 3  # spawn_key components (see world.WORLD_STREAM)


def make_meta(
  seed: int,
  scenes: int,
  samples_per_scene: int,
  version: str,
  sensor: str = lidar.DEFAULT_SENSOR,
  cameras: bool = True,
) -> dict:
  """Generator parameters recorded in synthetic/meta.json (module docstring)."""
  meta = {
    "format_version": FORMAT_VERSION,
    "generator": "data_prep.synthetic",
    "seed": seed,
    "scenes": scenes,
    "samples_per_scene": samples_per_scene,
    "version": version,
    "cameras": list(NUSCENES_CAMERAS) if cameras else [],
  }
  if cameras:
    meta |= _camera_meta()
  meta["lidar"] = _lidar_meta(sensor)
  meta["keyframe_period_us"] = world.KEYFRAME_PERIOD_US
  if cameras:
    meta["camera_offset_us"] = [int(v) for v in world.CAMERA_OFFSET_US]
  return meta


def _camera_meta() -> dict:
  """The `image` and `classmap` entries of meta.json."""
  w, h = tables.IMAGE_WIDTH, tables.IMAGE_HEIGHT
  return {
    "image": {"width": w, "height": h, "jpeg_quality": render.JPEG_QUALITY},
    "classmap": {
      "dir": "synthetic/classmaps",
      "width": w // render.CLASSMAP_SCALE,
      "height": h // render.CLASSMAP_SCALE,
      "scale": 1.0 / render.CLASSMAP_SCALE,
      "pixel_rule": "native (u, v) -> row floor(v * scale), col floor(u * scale)",
      "values": "raw lidarseg ids (category index)",
      "sky_id": render.SKY_ID,
    },
  }


def _lidar_meta(sensor: str) -> dict:
  """The `lidar` entry of meta.json: the profile's parameters."""
  spec = lidar.profile(sensor)
  out = {
    "model": spec.model,
    "elevation_deg": [float(spec.elevations_deg[0]), float(spec.elevations_deg[-1])],
    "beams": len(spec.elevations_deg),
    "azimuth_steps": spec.n_azimuth,
    "max_range_m": lidar.MAX_RANGE,
    "range_noise_m": lidar.RANGE_NOISE,
  }
  if spec.mount_height is not None:
    out["mount_height_m"] = spec.mount_height
  return out


def describe_rig(meta: dict) -> str:
  """The sensors of a world's meta.json in words, e.g. 'Velodyne HDL-32E with 6 cameras'."""
  model = meta.get("lidar", {}).get("model", "an unknown lidar")
  n = len(meta.get("cameras", []))
  return f"{model} with {n} cameras" if n else f"{model} without cameras"


@functools.lru_cache(maxsize=2)
def _grain(seed: int, scene_index: int) -> Image.Image:
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(scene_index, GRAIN_STREAM)))
  return render.grain_tile(rng, tables.IMAGE_WIDTH, tables.IMAGE_HEIGHT)


def render_sample(job: tables.SampleJob, root: str) -> dict:
  """Renders and writes the files of one keyframe.

  Args:
    job: what to render and where.
    root: dataroot the job's relative paths are under.

  Returns:
    Statistics: `points`, `label_counts` (32,) and bytes written per kind.
  """
  scene = world.build_scene(job.seed, job.scene_index, job.samples_per_scene)
  _, calib = tables.rig(job.sensor)
  key = (job.scene_index, SAMPLE_STREAM, job.sample_index)
  rng = np.random.default_rng(np.random.SeedSequence(job.seed, spawn_key=key))
  base = pathlib.Path(root)
  sizes = {"sweep": 0, "lidarseg": 0, "jpeg": 0, "classmap": 0}

  points, labels = lidar.sweep(scene, calib[tables.LIDAR], job.lidar_us, rng, job.sensor)
  (base / job.lidar_file).write_bytes(points.astype("<f4").tobytes())
  (base / job.lidarseg_file).write_bytes(labels.astype(np.uint8).tobytes())
  sizes["sweep"] += points.nbytes
  sizes["lidarseg"] += labels.nbytes

  # A world without cameras has no camera files: nothing more is drawn from rng.
  grain = _grain(job.seed, job.scene_index) if job.camera_files else None
  for c, channel in enumerate(NUSCENES_CAMERAS[: len(job.camera_files)]):
    jpeg, classmap = render.render_camera(
      scene, calib[channel], job.camera_us[c], tables.IMAGE_WIDTH, tables.IMAGE_HEIGHT, rng, grain
    )
    (base / job.camera_files[c]).write_bytes(jpeg)
    path = base / job.classmap_files[c]
    Image.fromarray(classmap, mode="L").save(path, format="PNG")
    sizes["jpeg"] += len(jpeg)
    sizes["classmap"] += path.stat().st_size
  return {"points": len(points), "label_counts": np.bincount(labels, minlength=32), "bytes": sizes}


def _dump(path: pathlib.Path, records) -> None:
  # indent=0 puts one field per line like the real tables; the key order is the
  # insertion order, so the bytes depend only on the content.
  path.write_text(json.dumps(records, indent=0) + "\n")


def _check_existing(out: pathlib.Path, meta: dict) -> bool:
  """Whether `out` already holds this exact world.

  Returns:
    True if it does (nothing to do); False if `out` is absent or empty.

  Raises:
    FileExistsError: if `out` holds anything else.
  """
  if not out.exists():
    return False
  if not out.is_dir():
    raise FileExistsError(f"{out} exists and is not a directory")
  meta_path = out / "synthetic" / "meta.json"
  if meta_path.is_file():
    existing = json.loads(meta_path.read_text())
    if describe_rig(existing) != describe_rig(meta) or existing.get("lidar") != meta["lidar"]:
      raise FileExistsError(
        f"{out} holds a different synthetic world, of other sensors ({describe_rig(existing)}, "
        f"not {describe_rig(meta)}); choose another --out or delete that folder"
      )
    if existing != meta:
      diff = sorted(k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k))
      raise FileExistsError(
        f"{out} holds a different synthetic world (meta.json differs in {diff}); "
        "choose another --out or delete that folder"
      )
    sample_data = out / meta["version"] / "sample_data.json"
    records = json.loads(sample_data.read_text()) if sample_data.is_file() else []
    expected = meta["scenes"] * meta["samples_per_scene"] * (1 + len(meta["cameras"]))
    missing = [r["filename"] for r in records if not (out / r["filename"]).is_file()]
    if len(records) != expected or missing:
      raise FileExistsError(
        f"{out} holds this world's meta.json but is damaged ({len(missing)} files missing)"
      )
    return True
  if any(out.iterdir()):
    raise FileExistsError(
      f"{out} is not empty and holds no synthetic world; refusing to write into it"
    )
  return False


def validate(
  scenes: int,
  samples_per_scene: int,
  seed: int,
  version: str,
  workers: int,
  sensor: str = lidar.DEFAULT_SENSOR,
) -> None:
  """Raises ValueError (errors.ConfigError) with a clear message for unusable arguments."""
  if sensor not in lidar.SENSORS:
    raise errors.ConfigError(f"--sensor must be one of {', '.join(lidar.SENSORS)}, got {sensor!r}")
  if scenes < 2:
    raise errors.ConfigError(
      f"--scenes must be at least 2 (one validation and one training scene), got {scenes}"
    )
  if samples_per_scene < 1:
    raise errors.ConfigError(f"--samples-per-scene must be positive, got {samples_per_scene}")
  if seed < 0:
    raise errors.ConfigError(f"--seed must be non-negative, got {seed}")
  if workers < 1:
    raise errors.ConfigError(f"--workers must be positive, got {workers}")
  if not version or "/" in version or version.startswith("."):
    raise errors.ConfigError(f"--version must be a plain folder name, got {version!r}")
  try:
    tables.scene_names(seed, scenes)
  except ValueError as e:
    raise errors.ConfigError(
      f"--scenes {scenes} is too many for the nuScenes split lists: {e}"
    ) from None


def generate(
  out,
  scenes: int,
  samples_per_scene: int,
  seed: int,
  version: str = "v1.0-synthetic",
  workers: int = 1,
  sensor: str = lidar.DEFAULT_SENSOR,
  cameras: bool = True,
):
  """Generates a synthetic world into `out`.

  Args:
    out: output folder; must be absent or empty, or already hold this exact
      world (then nothing is done).
    scenes: number of scenes (>= 2).
    samples_per_scene: keyframes per scene.
    seed: world seed; same arguments give byte-identical files.
    version: name of the table folder.
    workers: processes rendering samples.
    sensor: lidar profile, a key of `lidar.SENSORS` ("hdl32": the nuScenes
      LIDAR_TOP; "hdl64": KITTI's HDL-64E). The scenes themselves depend
      only on the seed.
    cameras: False writes a lidar-only world: no camera records, images or
      class maps.

  Returns:
    None if the world already existed, else a list of per-sample statistics
    (see `render_sample`).

  Raises:
    ValueError: for invalid arguments.
    FileExistsError: if `out` holds something else (a world of other
      sensors included).
  """
  validate(scenes, samples_per_scene, seed, version, workers, sensor)
  out = pathlib.Path(out).absolute()
  meta = make_meta(seed, scenes, samples_per_scene, version, sensor, cameras)
  if _check_existing(out, meta):
    return None
  names = tables.scene_names(seed, scenes)

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    all_tables, jobs = {}, []
    for index, name in enumerate(names):
      records, scene_jobs = tables.scene_tables(
        seed, index, samples_per_scene, name, version, sensor, cameras
      )
      for key, rows in records.items():
        all_tables.setdefault(key, []).extend(rows)
      jobs += scene_jobs
    logs = [log["token"] for log in all_tables["log"]]
    all_tables.update(tables.static_tables(seed, logs, sensor, cameras))
    folders = [
      version,
      f"lidarseg/{version}",
      *(["synthetic/classmaps"] if cameras else ["synthetic"]),
      "maps",
      *(f"samples/{c}" for c in tables.channels(cameras)),
    ]
    for sub in folders:
      (tmp / sub).mkdir(parents=True, exist_ok=True)
    for key, rows in sorted(all_tables.items()):
      _dump(tmp / version / f"{key}.json", rows)
    empty_mask = np.zeros((tables.MAP_SIZE, tables.MAP_SIZE), dtype=np.uint8)
    Image.fromarray(empty_mask, mode="L").save(tmp / all_tables["map"][0]["filename"], format="PNG")

    stats = _run_jobs(jobs, str(tmp), workers)
    _dump(tmp / "synthetic" / "meta.json", meta)  # last: marks the world complete
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
    if out.exists():
      out.rmdir()  # checked empty above
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return stats


def _run_jobs(jobs: list, root: str, workers: int) -> list[dict]:
  """Renders all jobs with a progress bar; results in job order."""
  bar = tqdm(total=len(jobs), unit="sample", desc="synthetic world", disable=None)  # TTY only
  results = [None] * len(jobs)
  if workers == 1:
    for i, job in enumerate(jobs):
      results[i] = render_sample(job, root)
      bar.update()
  else:
    # Spawned, not forked: callers (tests, the training entry point) may have
    # started JAX's threads, and forking a multithreaded process can deadlock.
    context = multiprocessing.get_context("spawn")
    with cli.signals_deferred():  # the workers start (at the first submit) whole
      pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=cli.worker_started
      )
      futures = {pool.submit(render_sample, job, root): i for i, job in enumerate(jobs)}
    with pool:
      try:
        for future in concurrent.futures.as_completed(futures):
          results[futures[future]] = future.result()
          bar.update()
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # stop queued work before cleaning up
        raise
  bar.close()
  return results
