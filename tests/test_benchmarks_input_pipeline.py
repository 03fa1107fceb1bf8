"""The input-pipeline benchmark's smoke mode makes a world, reads it with 1 and 2 threads,
and compares with a training-step JSON."""

import json
import math
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "input_pipeline.py"


def test_smoke_measures_threads_and_compares(tmp_path):
  step = tmp_path / "train_step.json"
  step.write_text(
    json.dumps(
      {
        "devices": {"device_kind": "test"},
        "runs": [
          {"settings": {"variant": "base", "batch_size": 16}, "results": {"scans_per_s": 3.0}}
        ],
      }
    )
  )
  out = tmp_path / "input_pipeline.json"
  proc = subprocess.run(
    [
      sys.executable,
      str(SCRIPT),
      "--smoke",
      f"--out={out}",
      f"--train_step_json={step}",
      f"--workdir={tmp_path / 'data'}",
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for field in ("benchmark", "machine", "date", "command", "settings", "results"):
    assert field in result, field
  assert "--smoke" in result["command"]
  settings, r = result["settings"], result["results"]
  assert settings["batch_size"] == 2 and settings["threads"] == [1, 2]
  assert settings["pack_size"] == 2 and settings["num_pairs"] == 4096
  assert result["data"]["scans"] == 4  # the 2 training scenes x 2 keyframes

  per = r["per_threads"]
  assert [p["threads"] for p in per] == [1, 2]
  for p in per:
    assert p["scans_per_s"] > 0 and p["first_batch_s"] > 0 and p["cpu_s_per_scan"] > 0
    assert math.isclose(p["scans_per_s_per_thread"], p["scans_per_s"] / p["threads"])
    assert p["timed_batches"] == 2 and p["prefetch"] >= p["threads"]
    # What a scan sends to the devices: its share of the pack (a few MB).
    assert 1e6 < p["device_bytes_per_scan"] < 50e6
  shapes = r["batch_shapes"]
  # One pack of 2 scans a batch: its budgets hold both, rounded to 128 tokens.
  voxels = result["data"]["voxels_of_first_scan"][0]
  t0 = shapes["features"][1]
  assert shapes["features"][0] == 1 and t0 % 128 == 0 and t0 >= voxels
  assert shapes["pairs_voxel"] == [1, 2 * 4096] and shapes["teacher"] == [1, 2, 6, 14, 26, 512]
  assert shapes["s4/neighbors"][:1] == [1] and shapes["s4/neighbors"][2] == 27

  # Compressed records read from disk: a bucket (~1.5 MB) and six fp16 grids (~2 MB).
  assert r["bytes_read_per_scan"] == r["bucket_bytes_per_scan"] + r["feature_bytes_per_scan"]
  assert 5e5 < r["bucket_bytes_per_scan"] < 5e6 and 5e5 < r["feature_bytes_per_scan"] < 5e6
  assert r["decoded_bytes_per_scan"] > 0

  comparison = r["comparison"]
  assert comparison["consumption_scans_per_s"] == 3.0
  assert str(step) in comparison["consumption_source"]
  best = max(p["scans_per_s_per_thread"] for p in per)
  assert comparison["threads_needed"] == math.ceil(3.0 / best)
  assert math.isclose(comparison["delivered_over_consumed"], per[-1]["scans_per_s"] / 3.0)
  assert "| threads | scans/s |" in proc.stdout and "needs" in proc.stdout
