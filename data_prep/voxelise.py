r"""Voxelises a built dataset split into serialised buckets.

  python -m data_prep.voxelise --data_dir DATA --builder nuscenes_lidarseg/v1.0-mini \
      --split train --out OUT [--voxel_size 0.1] [--grid cartesian|cylindrical] \
      [--curves z,z-trans,hilbert,hilbert-trans] [--num_stages 5] \
      [--records_per_shard 64] [--knn 16] [--workers N]

Reads the TFDS ArrayRecord split DATA/<builder>/... written by `data_prep.build`
(through `data_prep.builders.data_source`; of each record only `token`,
`points`, `labels`, `has_labels` and the `pairs_*` point-to-pixel pairs, never
the images) and writes one bucket record per scan (keys: the docstring of
`reldistill_jax.serialization`, plus `has_labels` and the cameras' native
`image_sizes`) into a record store (`reldistill_jax.records`):

  OUT/buckets-SSSSS-of-NNNNN.array_record   scans i*R .. (i+1)*R-1 of the split
  OUT/manifest.json                         config (every flag that defines the
                                            content, builder, split), shards,
                                            token -> [shard, position] index,
                                            and per scan its voxels per stage
                                            and its pairs (`sizes`), from which
                                            training fits its pack budgets

  python -m data_prep.voxelise --out OUT --verify

Shards are built in parallel worker processes and written atomically; a re-run
with the same flags verifies the shards already written (size and sha256 in
the manifest), rewrites a damaged one (logged, naming it) and skips the rest,
and a run whose flags differ from the store's config in OUT is refused.
`--verify` only checks OUT and reports (exit status 2 when a shard is damaged).
Scans with NaN/inf coordinates or no points stop the run with an error naming
the token. A bucket keeps every voxel of its scan. Scans without labels are counted in the manifest
(`stats.labelled_scans`) and a warning names how many: such a store serves
pretraining, not fine-tuning or evaluation.
"""

import functools
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from absl import app, flags, logging

from reldistill_jax import cli, errors, frustum, records, serialization
from reldistill_jax.models import waffleiron_inputs

STORE_NAME = "buckets"


def define_flags() -> None:
  """Defines the CLI's flags (only when run as a program: `data_prep.build`,
  imported beside this module, has a `--data_dir` of its own)."""
  flags.DEFINE_string("data_dir", None, "Folder of built TFDS datasets.")
  flags.DEFINE_string(
    "builder", None, "Builder name[/config], e.g. nuscenes_lidarseg/v1.0-mini or semantic_kitti."
  )
  flags.DEFINE_string("split", None, "Split to voxelise (TFDS slicing allowed).")
  flags.DEFINE_string("out", None, "Output folder of the bucket store.")
  flags.DEFINE_float("voxel_size", 0.1, "Cartesian voxel size (metres).")
  flags.DEFINE_enum("grid", "cartesian", serialization.GRIDS, "Voxel grid.")
  flags.DEFINE_list(
    "cylindrical_voxel_size",
    [repr(v) for v in serialization.DEFAULT_CYLINDRICAL_VOXEL_SIZE],
    "Cylindrical voxel sizes: rho (metres), phi (radians), z (metres).",
  )
  flags.DEFINE_list(
    "curves", list(serialization.CURVES), "Space-filling curves of the orders, in record order."
  )
  flags.DEFINE_integer("num_stages", 5, "Encoder stages (pooling levels + 1).")
  flags.DEFINE_integer("records_per_shard", 64, "Scans per output shard.")
  flags.DEFINE_integer(
    "knn", 0, "Also store each voxel's k nearest voxels (WaffleIron's embedding: 16; 0: none)."
  )
  flags.DEFINE_integer("workers", 0, "Worker processes (0: one per CPU core).")
  flags.DEFINE_bool("verify", False, "Only check the store at --out against its manifest.")


def bucket_config(
  builder: str,
  split: str,
  num_scans: int,
  *,
  voxel_size: float = 0.1,
  grid: str = "cartesian",
  cylindrical_voxel_size: Sequence[float] = serialization.DEFAULT_CYLINDRICAL_VOXEL_SIZE,
  curves: Sequence[str] = serialization.CURVES,
  num_stages: int = 5,
  records_per_shard: int = 64,
  knn: int = 0,
) -> dict[str, Any]:
  """The store config: everything that defines the buckets' content and layout.

  `voxel_size` is stored as the three sizes of the grid in use (x, y, z or
  rho, phi, z). `knn` > 0 adds every bucket's `knn` key, the k nearest kept
  points of every voxel's kept point (WaffleIron's embedding); the key enters
  the config only then, so stores written without it keep their config.
  """
  if knn < 0:
    raise ValueError(f"knn must be >= 0, got {knn}")
  if grid not in serialization.GRIDS:
    raise ValueError(f"unknown grid {grid!r}; expected one of {serialization.GRIDS}")
  sizes = (
    [float(voxel_size)] * 3 if grid == "cartesian" else [float(v) for v in cylindrical_voxel_size]
  )
  if len(sizes) != 3:
    raise ValueError(f"the cylindrical grid needs 3 voxel sizes, got {sizes}")
  serialization.check_bucket_config(curves, num_stages)
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
  return {
    "bucket_version": serialization.BUCKET_VERSION,
    "builder": builder,
    "split": split,
    "num_scans": int(num_scans),
    "grid": grid,
    "voxel_size": sizes,
    "curves": list(curves),
    "num_stages": int(num_stages),
    "records_per_shard": int(records_per_shard),
  } | ({"knn": int(knn)} if knn else {})


def bucket_of_scan(scan: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
  """The bucket record of one builder record (the one place that reads its fields).

  Args:
    scan: a builder record: `token` (str or bytes), `points` (N, F) float32,
      `labels` (N,) uint8 and `has_labels` (absent labels are all ignore),
      and for datasets with cameras `pairs_point` (M,), `pairs_camera` (M,),
      `pairs_uv` (M, 2).
    config: from `bucket_config`.

  Returns:
    The bucket record (`serialization.build_bucket`) plus `has_labels` (bool),
    `knn` ((V_0, k) int32, `waffleiron_inputs.knn_indices`, when `config` asks)
    and `image_sizes` ((cameras, 2) int32 native (height, width), (0, 2)
    without cameras), which the input pipeline needs to place pairs on the
    teacher's feature grid.
  """
  token = scan["token"]
  token = token.decode() if isinstance(token, bytes) else str(token)
  points = np.asarray(scan["points"], np.float32)
  labels = scan.get("labels")
  if labels is None or not scan.get("has_labels", True):
    labels = np.zeros(len(points), np.uint8)
  bucket = serialization.build_bucket(
    points,
    labels,
    token=token,
    voxel_size=config["voxel_size"],
    grid=config["grid"],
    curves=config["curves"],
    num_stages=config["num_stages"],
    pairs_point=scan.get("pairs_point"),
    pairs_camera=scan.get("pairs_camera"),
    pairs_uv=scan.get("pairs_uv"),
  )
  if config.get("knn"):
    try:
      bucket["knn"] = waffleiron_inputs.knn_indices(bucket["features"][:, :3], config["knn"])
    except ValueError as e:
      raise errors.DataError(f"scan {token}: {e}") from None
  bucket["has_labels"] = bool(scan.get("has_labels", True))
  bucket["image_sizes"] = np.asarray(scan.get("image_sizes", np.zeros((0, 2))), np.int32).reshape(
    -1, 2
  )
  return bucket


def open_builder_split(data_dir: str, builder: str, split: str) -> Sequence[Mapping[str, Any]]:
  """The builder records of a split (a random-access sequence)."""
  from data_prep import builders  # TFDS import kept out of `--help`

  return builders.data_source(data_dir, builder, split)


# State of a worker process: its own handle on the source, and the config.
_worker: dict[str, Any] = {}


def _init_worker(open_source: Callable[[], Sequence], config: Mapping[str, Any]) -> None:
  _worker["source"] = open_source()
  _worker["config"] = config


def _start_worker(open_source: Callable[[], Sequence], config: Mapping[str, Any]) -> None:
  cli.worker_started()
  _init_worker(open_source, config)


def scan_sizes(bucket: Mapping[str, Any]) -> list[int]:
  """A bucket's row of the manifest's `sizes`: its voxels per stage, its pairs, then the
  voxels per stage of its largest one-camera crop (`frustum.largest_crop`)."""
  counts = [int(n) for n in bucket["counts"]]
  return [*counts, len(bucket["pairs_voxel"]), *frustum.largest_crop(bucket)]


def _write_shard(shard: int, path: str) -> tuple[int, dict, list[list[int]], int]:
  """Buckets the scans of one shard into `path`.

  Returns:
    (shard, what `records.write_shard_file` returned, `scan_sizes` of every
    scan, the number of labelled scans).
  """
  source, config = _worker["source"], _worker["config"]
  per_shard = config["records_per_shard"]
  sizes, labelled = [], 0

  def buckets():
    nonlocal labelled
    for i in range(shard * per_shard, min(len(source), (shard + 1) * per_shard)):
      bucket = bucket_of_scan(source[i], config)
      sizes.append(scan_sizes(bucket))
      labelled += bucket["has_labels"]
      yield bucket

  written = records.write_shard_file(path, buckets())
  return shard, written, sizes, labelled


def voxelise_split(
  open_source: Callable[[], Sequence[Mapping[str, Any]]],
  out: str,
  config: Mapping[str, Any],
  workers: int = 1,
) -> dict[str, Any]:
  """Buckets every scan of a source into the store `out`, resuming a partial one.

  Args:
    open_source: picklable callable returning the random-access sequence of
      builder records; called once here and once in each worker process.
    out: the store's folder.
    config: from `bucket_config` (its `num_scans` must match the source).
    workers: worker processes; 1 runs in this process.

  Returns:
    The store's final manifest.

  Raises:
    records.ConfigMismatchError: `out` holds a store of another config.
    ValueError: a scan is empty or has NaN/inf coordinates (names the token).
  """
  source = open_source()
  if len(source) != config["num_scans"]:
    raise errors.DataError(
      f"{config['builder']} split {config['split']}: the config says {config['num_scans']} "
      f"scans, the source has {len(source)}"
    )
  if not len(source):
    raise errors.DataError(f"{config['builder']} split {config['split']} holds no scans")
  num_shards = -(-len(source) // config["records_per_shard"])
  writer = records.ShardedWriter(out, config, num_shards, name=STORE_NAME)
  pending = writer.pending
  per_shard = config["records_per_shard"]
  todo = {s: min(len(source), (s + 1) * per_shard) - s * per_shard for s in pending}
  logging.info(
    "%s: %d scans in %d shards, %d to write with %d workers",
    out,
    len(source),
    num_shards,
    len(pending),
    workers,
  )
  total = sum(todo.values())
  # Drawn on a terminal only (disable=None: off when stderr is not a TTY).
  progress = tqdm.tqdm(
    total=total,
    unit="scan",
    desc=f"voxelise {config['split']}",
    disable=True if not total else None,  # a terminal only
  )
  jobs = [(s, writer.shard_path(s)) for s in pending]
  if workers <= 1 or len(pending) <= 1:
    _init_worker(lambda: source, config)
    results = (_write_shard(*job) for job in jobs)
    pool = None
  else:
    # spawn: the parent may hold threads (TFDS, absl) that fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    with cli.signals_deferred():  # the workers start whole; a stop signal waits for that
      pool = context.Pool(min(workers, len(pending)), _start_worker, (open_source, config))
    results = pool.imap_unordered(_unpack_write_shard, jobs)
  try:
    for shard, written, sizes, labelled in results:
      writer.mark_complete(shard, written, {"labelled_scans": labelled}, sizes)
      progress.update(todo[shard])
  finally:
    progress.close()
    if pool is not None:
      pool.terminate()
      pool.join()
    _worker.clear()
  manifest = writer.finalize()
  unlabelled = manifest["num_records"] - manifest["stats"].get("labelled_scans", 0)
  if unlabelled:
    logging.warning(
      "%s: %d of %d scans of %s split %s have no labels (the dataset was built without its "
      "label files): the store serves pretraining, not fine-tuning or evaluation",
      out, unlabelled, manifest["num_records"], config["builder"], config["split"],
    )  # fmt: skip
  return manifest


def _unpack_write_shard(job: tuple[int, str]):
  return _write_shard(*job)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.verify:
    if f.out is None:
      raise app.UsageError("--verify needs --out")
    print(records.check_store(f.out))
    return
  for name in ("data_dir", "builder", "split", "out"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  try:  # the flags first, before the data is opened
    config_of = functools.partial(
      bucket_config, f.builder, f.split, voxel_size=f.voxel_size, grid=f.grid,
      cylindrical_voxel_size=[float(v) for v in f.cylindrical_voxel_size], curves=f.curves,
      num_stages=f.num_stages, records_per_shard=f.records_per_shard, knn=f.knn,
    )  # fmt: skip
    config_of(0)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  open_source = functools.partial(open_builder_split, f.data_dir, f.builder, f.split)
  config = config_of(len(open_source()))
  manifest = voxelise_split(open_source, f.out, config, f.workers or os.cpu_count() or 1)
  print(f"{f.out}: {manifest['num_records']} buckets in {manifest['num_shards']} shards")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
