"""The teacher benchmark's smoke mode times a tower and writes its JSON."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "teacher.py"


def test_smoke_writes_json(tmp_path):
  out = tmp_path / "teacher.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--smoke", f"--out={out}"], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  (result,) = report["results"]
  assert result["grid"] == [2, 4] and result["feature_dim"] == 32
  assert result["images_per_second"] > 0
  assert result["store_bytes_per_sample_fp16"] == 6 * 2 * 4 * 32 * 2
  assert report["device"].startswith("cpu") and "| tiny_clip |" in proc.stdout
