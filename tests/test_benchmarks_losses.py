"""The loss benchmark's smoke mode runs every method and writes its JSON."""

import json
import pathlib
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "losses.py"


def _run(tmp_path, *args):
  out = tmp_path / "losses.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), f"--out={out}", *args], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text()), proc.stdout


def test_smoke_times_every_method(tmp_path):
  result, stdout = _run(tmp_path, "--smoke")
  for field in ("benchmark", "machine", "devices", "date", "command", "settings", "results"):
    assert field in result, field
  assert result["devices"]["backend"] == "cpu" and result["devices"]["jax_version"]
  assert "--smoke" in result["command"]
  records = result["results"]
  assert {(r["method"], r["dtype"]) for r in records} == {
    (m, t) for m in ("naive", "xla", "pallas") for t in ("bfloat16", "float32")
  }
  for r in records:
    assert r["status"] == "ok", r
    assert r["median_ms"] > 0 and len(r["times_ms"]) == 1
    assert r["peak_bytes"] > 0 and "memory_analysis" in r["peak_source"]
    assert r["compiled_memory"]["temp_bytes"] >= 0
  assert {r["implementation"] for r in records if r["method"] == "pallas"} == {"interpret_gpu"}
  # The three methods compute the same loss on the same features.
  for dtype, rtol in (("float32", 1e-5), ("bfloat16", 2e-2)):
    losses = [r["loss"] for r in records if r["dtype"] == dtype]
    np.testing.assert_allclose(losses, losses[0], rtol=rtol)
  assert stdout.startswith("| N | dtype | method |") and stdout.count("\n") >= len(records) + 1


def test_configurations_over_memory_are_skipped(tmp_path):
  result, _ = _run(
    tmp_path,
    "--n=64",
    "--d=16",
    "--dtypes=float32",
    "--repeats=1",
    "--noisolate",
    "--memory_headroom=1e-12",
  )
  by_method = {r["method"]: r for r in result["results"]}
  assert by_method["naive"]["status"] == "skipped"
  assert "compiled memory analysis needs" in by_method["naive"]["reason"]
  assert by_method["naive"]["memory_estimate_bytes"] > 0
  # A CPU has no compiled Pallas kernel (only interpret mode).
  assert by_method["pallas"]["status"] == "skipped"
  assert "no Pallas kernel for the cpu backend" in by_method["pallas"]["reason"]
