"""Command line: python -m data_prep.synthetic --out DIR [options]."""

import argparse
import os
import sys
import time

import numpy as np

from data_prep.synthetic import lidar, writer
from reldistill_jax import cli, errors

_DESCRIPTION = """\
Writes a procedural street world as a nuScenes-format dataroot in DIR:
  <version>/*.json            tables: scene, sample, sample_data (keyframes:
                              LIDAR_TOP + 6 cameras), ego_pose, calibrated_sensor
                              (real n015 rig), sensor, log, category, lidarseg,
                              and empty instance/sample_annotation/attribute/
                              visibility/map
  samples/LIDAR_TOP/*.pcd.bin lidar sweeps: float32 x, y, z, intensity, ring
  lidarseg/<version>/*.bin    uint8 raw lidarseg id per point
  samples/CAM_*/*.jpg         1600x900 images rendered from the same scene at
                              each camera's own timestamp
  synthetic/classmaps/*.png   per camera image: raw ids at 400x225 (255 = sky)
  synthetic/meta.json         generator parameters (sensor, cameras, ...)
The lidar is the nuScenes HDL-32E (--sensor hdl32, 32 beams, 1.84 m) or
KITTI's HDL-64E (--sensor hdl64, 64 beams from +2.0 to -24.9 degrees, 1.73 m).
--no-cameras writes a lidar-only world: no CAM_* records, images or class maps.
The same arguments always give byte-identical files. DIR must be absent or
empty; if it already holds this exact world nothing is done.
"""


def _default_workers() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m data_prep.synthetic",
    description=_DESCRIPTION,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--out", required=True, help="output dataroot folder (absent or empty)")
  parser.add_argument("--scenes", type=int, default=10, help="number of scenes, >= 2 (default 10)")
  parser.add_argument(
    "--samples-per-scene", type=int, default=8, help="keyframes per scene (default 8)"
  )
  parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
  parser.add_argument(
    "--version", default="v1.0-synthetic", help="table folder name (default v1.0-synthetic)"
  )
  parser.add_argument(
    "--workers",
    type=int,
    default=_default_workers(),
    help="rendering processes (default: number of CPUs)",
  )
  parser.add_argument(
    "--sensor",
    choices=sorted(lidar.SENSORS),
    default=lidar.DEFAULT_SENSOR,
    help="lidar profile: hdl32 (nuScenes LIDAR_TOP, default) or hdl64 (KITTI's HDL-64E)",
  )
  parser.add_argument(
    "--no-cameras",
    dest="cameras",
    action="store_false",
    help="write a lidar-only world (no camera records, images or class maps)",
  )
  args = parser.parse_args(argv)
  try:
    writer.validate(
      args.scenes, args.samples_per_scene, args.seed, args.version, args.workers, args.sensor
    )
  except ValueError as e:
    parser.error(str(e))

  start = time.perf_counter()
  cli.catch_sigterm()
  try:
    stats = writer.generate(
      args.out, args.scenes, args.samples_per_scene, args.seed, args.version, args.workers,
      sensor=args.sensor, cameras=args.cameras,
    )  # fmt: skip
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (OSError, KeyboardInterrupt, errors.Terminated) as e:
    found = cli.exit_status(e)
    if found is None:
      raise
    print(f"error: {errors.one_line(found[0])}", file=sys.stderr)
    return found[1]
  if stats is None:
    print(f"{args.out} already holds this synthetic world (identical meta.json); nothing to do")
    return 0
  elapsed = time.perf_counter() - start
  points = np.array([s["points"] for s in stats])
  counts = np.sum([s["label_counts"] for s in stats], axis=0)
  share = ", ".join(f"{i}: {100 * c / counts.sum():.2f}%" for i, c in enumerate(counts) if c)
  sizes = {k: sum(s["bytes"][k] for s in stats) / len(stats) / 1024 for k in stats[0]["bytes"]}
  print(f"wrote {len(stats)} samples to {args.out} in {elapsed:.1f} s")
  print(f"points per sweep: mean {points.mean():.0f}, min {points.min()}, max {points.max()}")
  print(f"raw lidarseg classes (% of points): {share}")
  print("KiB per sample: " + ", ".join(f"{k} {v:.0f}" for k, v in sizes.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
