"""benchmarks/gpu.sh: every GPU measurement in one command, checked on a CPU at smoke size."""

import json
import os
import pathlib
import subprocess

import pytest
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
RESULTS = ("losses", "train_step", "input_pipeline", "teacher")


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  return subprocess.run(
    ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
    timeout=timeout,
  )  # fmt: skip


@pytest.mark.parametrize(
  "args, message",
  [
    (["--bogus", "out"], "error: unknown option --bogus (see --help)"),
    (["--wheels", "/nonexistent/wheels", "out"], "error: no wheels in /nonexistent/wheels"),
  ],
)
def test_bad_arguments_are_one_line(args, message, tmp_path):
  proc = _run(*[str(tmp_path / a) if a == "out" else a for a in args])
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
  assert not (tmp_path / "out").exists()  # refused before anything is written


def test_no_output_folder_prints_the_usage():
  proc = _run()
  assert proc.returncode == 2 and "bash benchmarks/gpu.sh --smoke OUTDIR" in proc.stderr


@pytest.mark.slow
def test_smoke_runs_every_measurement_and_writes_json(tmp_path):
  out = tmp_path / "out"
  proc = _run("--smoke", str(out), timeout=600)
  log = (out / "gpu.log").read_text()
  assert proc.returncode == 0, log[-3000:]
  for name in RESULTS:
    result = json.loads((out / f"{name}.json").read_text())
    assert {"benchmark", "machine", "date", "command"} <= set(result), name
    assert "--smoke" in result["command"], name
    assert f"== {name}: exit 0 after" in log, name
  steps = json.loads((out / "train_step.json").read_text())["runs"]
  assert [r["name"] for r in steps] == [
    "point_encoder packed", "minkunet packed", "waffleiron packed",
  ]  # fmt: skip
  assert all(r["results"]["status"] == "ok" and r["results"]["loss_finite"] for r in steps)
  pipeline = json.loads((out / "input_pipeline.json").read_text())
  assert pipeline["settings"]["threads"] == [1, 2], pipeline["settings"]
  assert proc.stdout.rstrip().endswith(f"gpu.sh: results in {out} (exit 0)")
