"""The data-preparation benchmark's smoke mode runs the three stages and writes its JSON."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data_prep.py"


def test_smoke_measures_every_stage(tmp_path):
  out = tmp_path / "data_prep.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--smoke", f"--workdir={tmp_path / 'work'}", f"--out={out}"],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["scans"] == 4 and result["voxelised_scans"] == 2  # 1 val + 1 train scene
  assert set(result["seconds"]) == {"generate", "build", "voxelise", "voxelise_rerun", "verify_cli"}
  assert all(v > 0 for v in result["scans_per_second"].values())
  verify = result["verify"]
  assert 0 < verify["seconds_per_scan"] < verify["voxelise_seconds_per_scan_per_worker"]
  sizes = result["bytes_per_scan"]
  # A sweep of ~30k points x 20 bytes; six JPEGs are larger than the sweep.
  assert 400_000 < sizes["world_sweep_bytes"] < 800_000
  assert sizes["world_jpeg_bytes_6_cameras"] > sizes["world_sweep_bytes"]
  assert sizes["voxel_bucket_bytes"] > 0 and sizes["tfds_record_bytes"] > 0
  assert "| voxelise |" in proc.stdout
