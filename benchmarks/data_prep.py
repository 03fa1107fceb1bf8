"""Throughput and disk size of the offline data stages on this machine.

  python benchmarks/data_prep.py --workdir /tmp/bench_data --out data_prep.json

Runs, each as its user-facing CLI and timed end to end (process start
included): the synthetic world generator at its default size, the TFDS build
of that world, the voxeliser on its `train` split, the same voxeliser command
run again (it verifies every shard and rewrites none), and `--verify` alone.
The verification is also timed in-process (`records.verify_store`, without the
process start) to give its cost per scan and its read rate, against the
voxeliser's cost per scan: what a rerun on a store of any size costs against
rewriting it. Writes JSON with scans/s of each stage and the bytes per scan of
each output (the world's raw files split by kind, the TFDS records, the voxel
buckets), and prints a markdown table. `--smoke` runs a tiny world (a test
uses it).
"""

import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from absl import flags

from reldistill_jax import cli, hardware, records

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/reldistill_bench_data", "Scratch folder (emptied).")
_OUT = flags.DEFINE_string("out", "data_prep.json", "JSON output file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny world, for tests.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes of each stage.")

VERSION = "v1.0-synthetic"


def _run(args: list[str]) -> float:
  """Runs a CLI of the project and returns its wall time in seconds."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True, text=True)
  return time.perf_counter() - start


def _size(paths) -> int:
  return sum(p.stat().st_size for p in paths if p.is_file())


def measure(workdir: pathlib.Path, smoke: bool, workers: int) -> dict:
  """Runs the three stages into `workdir` and returns the measurements."""
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.mkdir(parents=True)
  world, tfds_dir, buckets = workdir / "world", workdir / "tfds", workdir / "buckets"
  size_args = ["--scenes", "2", "--samples-per-scene", "2"] if smoke else []
  gen_s = _run(
    ["data_prep.synthetic", "--out", str(world), "--seed", "0", "--workers", str(workers)]
    + size_args
  )
  scans = len(list((world / "samples" / "LIDAR_TOP").glob("*.pcd.bin")))
  build_s = _run(
    [
      "data_prep.build",
      "nuscenes_lidarseg",
      "--manual_dir",
      str(world),
      "--data_dir",
      str(tfds_dir),
    ]
  )
  split = "train"
  vox_args = [
      "data_prep.voxelise",
      "--data_dir", str(tfds_dir),
      "--builder", f"nuscenes_lidarseg/{VERSION}",
      "--split", split,
      "--out", str(buckets),
      "--workers", str(workers),
  ]  # fmt: skip
  vox_s = _run(vox_args)
  rerun_s = _run(vox_args)  # every shard verified, none rewritten
  verify_cli_s = _run(["data_prep.voxelise", "--out", str(buckets), "--verify"])
  start = time.perf_counter()
  damaged = records.verify_store(str(buckets))
  verify_s = time.perf_counter() - start
  assert not damaged, damaged
  train_scans = json.loads((buckets / "manifest.json").read_text())["num_records"]
  store_bytes = _size(buckets.glob("*.array_record"))
  tfds_files = list((tfds_dir / "nuscenes_lidarseg" / VERSION).rglob(f"*-{split}.array_record-*"))
  per_scan = {
    "world_sweep_bytes": _size((world / "samples" / "LIDAR_TOP").glob("*")) / scans,
    "world_lidarseg_bytes": _size((world / "lidarseg").rglob("*.bin")) / scans,
    "world_jpeg_bytes_6_cameras": _size(
      p for cam in (world / "samples").glob("CAM_*") for p in cam.glob("*.jpg")
    )
    / scans,
    "world_classmap_bytes_6_cameras": _size((world / "synthetic" / "classmaps").glob("*")) / scans,
    "tfds_record_bytes": _size(tfds_files) / train_scans,
    "voxel_bucket_bytes": _size(buckets.glob("*.array_record")) / train_scans,
  }
  return {
    "machine": hardware.machine(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
    "workers": workers,
    "scans": scans,
    "voxelised_scans": train_scans,
    "seconds": {
      "generate": gen_s,
      "build": build_s,
      "voxelise": vox_s,
      "voxelise_rerun": rerun_s,
      "verify_cli": verify_cli_s,
    },
    "scans_per_second": {
      "generate": scans / gen_s,
      "build": scans / build_s,
      "voxelise": train_scans / vox_s,
    },
    "verify": {
      "seconds_in_process": verify_s,
      "seconds_per_scan": verify_s / train_scans,
      "bytes_per_second": store_bytes / verify_s,
      "voxelise_seconds_per_scan_per_worker": vox_s * workers / train_scans,
    },
    "bytes_per_scan": per_scan,
  }


def main(argv):
  del argv
  result = measure(pathlib.Path(_WORKDIR.value), _SMOKE.value, _WORKERS.value)
  pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=2))
  print("| stage | scans | seconds | scans/s |\n|---|---|---|---|")
  for stage, rate in result["scans_per_second"].items():
    n = result["voxelised_scans"] if stage == "voxelise" else result["scans"]
    print(f"| {stage} | {n} | {result['seconds'][stage]:.1f} | {rate:.2f} |")
  v = result["verify"]
  print(
    f"\nrerun (verify, nothing to write): {result['seconds']['voxelise_rerun']:.1f} s; "
    f"--verify: {result['seconds']['verify_cli']:.1f} s; in-process "
    f"{1e3 * v['seconds_per_scan']:.2f} ms/scan ({v['bytes_per_second'] / 1e9:.2f} GB/s) "
    f"against {1e3 * v['voxelise_seconds_per_scan_per_worker']:.0f} ms/scan/worker to voxelise"
  )
  print("\n| output | KiB per scan |\n|---|---|")
  for name, size in result["bytes_per_scan"].items():
    print(f"| {name} | {size / 1024:.0f} |")


if __name__ == "__main__":
  cli.run(main)
