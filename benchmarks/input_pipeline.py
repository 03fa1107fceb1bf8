"""Scans/s the training input pipeline delivers, per CPU thread, against what the step consumes.

  python benchmarks/input_pipeline.py --out input_pipeline.json [--threads 1,2,4,8] \
      [--buckets DIR --features DIR] [--train_step_json train_step.json]

The pipeline is the one pretraining reads: `train.open_data` (the bucket store
through `records.ShardedReader`, the teacher feature store, the pack budgets
fitted to the store, the `input_pipeline.Transform` with the config's
augmentation and pair sampling, the packs of `packing.PackPlan`) and
`input_pipeline.process_dataset` (grain `to_iter_dataset` with
`config.input.num_threads` threads and `config.input.prefetch` batches of
read-ahead), on one device, with the config of `configs/pretrain.py`
(`--config`; batch 16 in packs of 4, 4,096 pair slots per scan). For each thread count of `--threads` a fresh iterator is opened;
the first batch's latency is timed (opening included), then the first
`threads` batches are taken as warm-up (the other threads finish their first
batch while the first is awaited), then `--batches` batches are timed.
Reported per thread count: scans/s (the scans the batches hold) and scans/s per thread, the process's CPU
seconds per scan (user + system; the cost of a scan whatever the threads),
and the first-batch latency; per scan: the bytes read from disk (the bucket
and feature stores' shard files divided by their records: compressed records
as they are read), the bytes decoded (the two records' arrays in memory) and
the bytes of the batch sent to the devices.

Input: `--buckets DIR --features DIR` (stores written by `data_prep.voxelise`
and `data_prep.teacher_features`; `--config` must name their teacher, e.g.
`teacher=clip_vitb16`), or by default a synthetic world the script makes in
`--workdir` (a temporary folder unless given; a given one is reused): the
world of `data_prep.synthetic` (`--scenes` x `--samples_per_scene`, HDL-32E
sweeps, six 1600x900 cameras), its TFDS build, 0.1 m buckets of its `train`
split with the default bucket settings (5 stages, 4 curves) and
the synthetic teacher's feature store (14 x 26 x 512 fp16 per camera, the shape
of CLIP ViT-B/16's), as `reldistill_jax.pipeline.prepare_synthetic_data` makes
them. The default config is then `teacher=synthetic,dataset=nuscenes`.

The consumption to compare with is `--consumption_scans_per_s`, or the
`results.scans_per_s` of a `benchmarks/train_step.py` JSON
(`--train_step_json`); the table then says how many threads feed it at the
measured per-thread rate. Writes JSON (`--out`) with the machine, devices,
date, command, settings and results, and prints a markdown table. `--smoke`
makes a 3-scene world (4 training scans), batch 2, threads 1 and 2, 2 timed
batches (the test).
"""

import datetime
import functools
import json
import math
import os
import pathlib
import sys
import tempfile
import time

# The repository root, for `configs` when the project is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import pretrain  # noqa: E402
from reldistill_jax import cli, hardware, input_pipeline, records, runtime, train  # noqa: E402

_OUT = flags.DEFINE_string("out", "input_pipeline.json", "JSON output file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny world, batch 2, 2 timed batches (tests).")
_CONFIG = flags.DEFINE_string(
  "config", None, "configs/pretrain.py argument (default: teacher=synthetic,dataset=nuscenes "
  "for the synthetic world, teacher=clip_vitb16,dataset=nuscenes for --buckets)."
)  # fmt: skip
_BUCKETS = flags.DEFINE_string("buckets", None, "Bucket store (default: a synthetic world's).")
_FEATURES = flags.DEFINE_string("features", None, "Feature store matching --buckets.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the synthetic data goes (default: temp).")
_SCENES = flags.DEFINE_integer("scenes", 10, "Scenes of the synthetic world (>= 2).")
_SAMPLES = flags.DEFINE_integer("samples_per_scene", 8, "Keyframes per synthetic scene.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes making the world.")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "config.input.num_threads values to measure.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Batch size (default: the config's).")
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per thread count.")
_PREFETCH = flags.DEFINE_integer(
  "prefetch", None, "config.input.prefetch (default: max(config's, threads))."
)
_CONSUMPTION = flags.DEFINE_float(
  "consumption_scans_per_s", None, "Scans/s the training step consumes, to compare with."
)
_TRAIN_STEP = flags.DEFINE_string(
  "train_step_json", None, "A benchmarks/train_step.py JSON whose scans/s to compare with."
)

SYNTHETIC_BUILDER = "nuscenes_lidarseg/v1.0-synthetic"
_SMOKE_SETTINGS = {"scenes": 3, "samples_per_scene": 2, "batch_size": 2, "batches": 2}


def _smoke_or(flag, default=None):
  if _SMOKE.value and not flags.FLAGS[flag.name].present and flag.name in _SMOKE_SETTINGS:
    return _SMOKE_SETTINGS[flag.name]
  return default if flag.value is None else flag.value


def make_synthetic_data(root: pathlib.Path, scenes: int, samples: int, workers: int) -> dict:
  """World, TFDS build, `train` buckets (defaults) and synthetic-teacher features in `root`."""
  from data_prep import build, teacher_features, voxelise
  from data_prep.builders import data_source
  from data_prep.synthetic import writer
  from reldistill_jax import teachers

  seconds = {}
  world, tfds_dir = root / "world", root / "tfds"
  buckets, features = root / "buckets" / "train", root / "features" / "train"
  start = time.perf_counter()
  writer.generate(world, scenes, samples, seed=0, workers=workers)
  build.build("nuscenes_lidarseg", str(world), str(tfds_dir), config="v1.0-synthetic")
  seconds["world_and_build"] = time.perf_counter() - start
  start = time.perf_counter()
  source = functools.partial(voxelise.open_builder_split, str(tfds_dir), SYNTHETIC_BUILDER, "train")
  config = voxelise.bucket_config(SYNTHETIC_BUILDER, "train", len(source()))
  voxelise.voxelise_split(source, str(buckets), config, workers=workers)
  seconds["voxelise"] = time.perf_counter() - start
  start = time.perf_counter()
  teacher_features.write_store(
    teachers.load("synthetic", world),
    data_source(tfds_dir, SYNTHETIC_BUILDER, "train"),
    str(features),
    SYNTHETIC_BUILDER,
    "train",
  )
  seconds["features"] = time.perf_counter() - start
  return {"buckets": buckets, "features": features, "seconds": seconds}


def _store_bytes(path: pathlib.Path) -> dict:
  manifest = records.read_manifest(str(path))
  files = [path / e["file"] for e in manifest["shards"].values()]
  total = sum(f.stat().st_size for f in files)
  count = manifest["num_records"]
  return {"records": count, "bytes": total, "per_record": total / max(1, count)}


def _nbytes(record) -> int:
  return sum(v.nbytes for v in record.values() if isinstance(v, np.ndarray))


def measure(config, threads: int, batches: int) -> dict:
  """First-batch latency and steady scans/s of a fresh iterator with `threads` threads."""
  with config.unlocked():
    config.input.num_threads = threads
    config.input.prefetch = _PREFETCH.value or max(config.input.prefetch, threads)
  cpu0, start = os.times(), time.perf_counter()
  with config.unlocked():
    config.mesh.data = 1
  ds, *_ = train.open_data(config, NamedSharding(runtime.make_mesh(config), P("data")))
  iterator = iter(ds)
  first = next(iterator)
  first_s = time.perf_counter() - start
  for _ in range(threads - 1):  # the other threads' first batches
    next(iterator)
  cpu1, start = os.times(), time.perf_counter()
  scans = 0
  for _ in range(batches):
    batch = next(iterator)
    scans += int((batch["scan_voxels"] > 0).sum())
  seconds = time.perf_counter() - start
  cpu2 = os.times()
  iterator.close()
  cpu = lambda a, b: (b.user - a.user) + (b.system - a.system)
  device_bytes = sum(v.nbytes for k, v in batch.items() if k not in input_pipeline.HOST_KEYS)
  return {
    "threads": threads,
    "prefetch": config.input.prefetch,
    "first_batch_s": first_s,
    "timed_batches": batches,
    "timed_s": seconds,
    "scans_per_s": scans / seconds,
    "scans_per_s_per_thread": scans / seconds / threads,
    "cpu_s_per_scan": cpu(cpu1, cpu2) / scans,
    "cpu_s_first_batches": cpu(cpu0, cpu1),
    "device_bytes_per_scan": device_bytes / int((batch["scan_voxels"] > 0).sum()),
    "batch_shapes": {k: list(v.shape) for k, v in first.items()},
  }


def _consumption() -> tuple[float | None, str | None]:
  if _CONSUMPTION.value is not None:
    return _CONSUMPTION.value, "--consumption_scans_per_s"
  if _TRAIN_STEP.value:
    step = json.loads(pathlib.Path(_TRAIN_STEP.value).read_text())
    devices, run = step.get("devices", {}), step["runs"][0]
    where = f"{_TRAIN_STEP.value} ({devices.get('device_kind')}, {run['settings']['variant']}, "
    return run["results"]["scans_per_s"], where + f"batch {run['settings']['batch_size']})"
  return None, None


def _table(results: list[dict], comparison: dict) -> str:
  lines = [
    "| threads | scans/s | scans/s per thread | CPU s per scan | first batch s |",
    "|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['threads']} | {r['scans_per_s']:.2f} | {r['scans_per_s_per_thread']:.2f} "
      f"| {r['cpu_s_per_scan']:.3f} | {r['first_batch_s']:.2f} |"
    )
  if comparison.get("consumption_scans_per_s") is not None:
    lines.append("")
    lines.append(
      f"The step consumes {comparison['consumption_scans_per_s']:.2f} scans/s "
      f"({comparison['consumption_source']}): at the best measured "
      f"{comparison['per_thread_scans_per_s']:.2f} scans/s per thread that needs "
      f"{comparison['threads_needed']} thread(s) (ratio delivered/consumed with the most threads "
      f"measured: {comparison['delivered_over_consumed']:.2f})."
    )
  return "\n".join(lines)


def main(argv):
  del argv
  load_at_start = list(os.getloadavg())
  smoke = _SMOKE.value
  if bool(_BUCKETS.value) != bool(_FEATURES.value):
    raise app.UsageError("give both --buckets and --features, or neither")
  tmp = None
  data_seconds = None
  if _BUCKETS.value:
    buckets, features = pathlib.Path(_BUCKETS.value), pathlib.Path(_FEATURES.value)
    config_arg = _CONFIG.value or "loss=relational,teacher=clip_vitb16,dataset=nuscenes"
    source = "given stores"
  else:
    if _WORKDIR.value:
      root = pathlib.Path(_WORKDIR.value)
    else:
      tmp = tempfile.TemporaryDirectory(prefix="bench_input_")
      root = pathlib.Path(tmp.name)
    scenes, samples = _smoke_or(_SCENES), _smoke_or(_SAMPLES)
    made = make_synthetic_data(root, scenes, samples, _WORKERS.value)
    buckets, features, data_seconds = made["buckets"], made["features"], made["seconds"]
    config_arg = _CONFIG.value or "loss=relational,teacher=synthetic,dataset=nuscenes"
    source = f"synthetic world, {scenes} scenes x {samples} keyframes (train split), seed 0"

  config = pretrain.get_config(config_arg)
  with config.unlocked():
    config.input.buckets = str(buckets)
    config.input.features = str(features)
    config.input.batch_size = _smoke_or(_BATCH, config.input.batch_size)
    config.input.pack_size = min(config.input.pack_size, config.input.batch_size)
  threads = [int(t) for t in _THREADS.value]
  batches = _smoke_or(_BATCHES)
  bucket_store, feature_store = _store_bytes(buckets), _store_bytes(features)
  reader = records.ShardedReader(str(buckets))
  sample = reader[0]
  from reldistill_jax import feature_store as fs

  decoded = _nbytes(sample) + _nbytes(fs.FeatureStore(features).get(sample["token"]))

  results = []
  for n in threads:
    logging.info("measuring %d threads", n)
    results.append(measure(config, n, batches))
    print(f"threads={n}: {results[-1]['scans_per_s']:.2f} scans/s", file=sys.stderr, flush=True)

  shapes = [r.pop("batch_shapes") for r in results][0]
  consumption, consumption_source = _consumption()
  best = max(r["scans_per_s_per_thread"] for r in results)
  most = max(results, key=lambda r: r["threads"])
  comparison = {"consumption_scans_per_s": consumption, "consumption_source": consumption_source}
  if consumption is not None:
    comparison |= {
      "per_thread_scans_per_s": best,
      "threads_needed": math.ceil(consumption / best),
      "delivered_over_consumed": most["scans_per_s"] / consumption,
      "config_num_threads": pretrain.get_config(config_arg).input.num_threads,
    }
  result = {
    "benchmark": "input pipeline (train.open_data: grain, buckets + feature store on disk)",
    "machine": hardware.machine(load_at_start),
    "devices": None,  # the pipeline runs on the host only
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
    "settings": {
      "config": config_arg,
      "source": source,
      "buckets": str(buckets),
      "features": str(features),
      "batch_size": config.input.batch_size,
      "pack_size": config.input.pack_size,
      "num_pairs": config.input.num_pairs,
      "augment": config.input.augment.to_dict(),
      "threads": threads,
      "timed_batches": batches,
      "smoke": smoke,
    },
    "data": {
      "scans": len(reader),
      "bucket_config": {k: reader.config.get(k) for k in ("voxel_size", "num_stages", "curves")},
      "voxels_of_first_scan": sample["counts"].tolist(),
      "preparation_s": data_seconds,
    },
    "results": {
      "per_threads": results,
      "batch_shapes": shapes,
      "bytes_read_per_scan": bucket_store["per_record"] + feature_store["per_record"],
      "bucket_bytes_per_scan": bucket_store["per_record"],
      "feature_bytes_per_scan": feature_store["per_record"],
      "decoded_bytes_per_scan": decoded,
      "comparison": comparison,
    },
  }
  pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=2))
  print(_table(results, comparison))
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  cli.run(main)
