"""Two processes of two CPU devices each train as one process of four devices does.

Every run goes through the entry point (`python -m reldistill_jax.main`), the
two-process one with `--coordinator_address/--num_processes/--process_id` on
a free localhost port; each subprocess sets its own XLA_FLAGS (conftest's
eight devices are for this process only).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
ARG = "loss=relational,teacher=synthetic,dataset=synthetic,runlocal"
OVERRIDES = {
  "input.num_pairs": 256,
  "input.batch_size": 4,  # one pack of one scan per device, two per process
  "input.pack_size": 1,
  "model.patch_size": 128,
  "mesh.data": -1,
  "num_steps": 2,  # step 2's loss depends on step 1's all-reduced gradients
  "log_every": 1,
  "checkpoint.every": 1,
}
TIMEOUT = 240  # seconds, for each group of processes
LAST = re.compile(r"process (\d+) of (\d+), last measurements: (\{.*\})")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC honours them
  env = {k: v for k, v in env.items() if not k.startswith(("JAX_", "TPU_", "SLURM_", "OMPI_"))}
  env.update(
    XLA_FLAGS=xla_flags(devices),
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
  )
  return env


def _pair() -> list[list[str]]:
  """The flags of the two processes of a run, with a free localhost port as coordinator."""
  coordinator = f"--coordinator_address=localhost:{_free_port()}"
  return [[coordinator, "--num_processes=2", f"--process_id={i}"] for i in range(2)]


def _args(data, workdir: pathlib.Path, overrides: dict) -> list[str]:
  args = [sys.executable, "-m", "reldistill_jax.main", f"--config=configs/pretrain.py:{ARG}"]
  args += [f"--config.input.buckets={data['buckets']}"]
  args += [f"--config.input.features={data['features']}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()] + [f"--workdir={workdir}"]


def _start(args, devices: int, extra: list[list[str]], workdir: pathlib.Path):
  """One entry-point process per item of `extra` (its own flags), each logging to a file."""
  procs, logs = [], []
  for i, flags in enumerate(extra):
    logs.append(workdir.parent / f"{workdir.name}.{i}.log")
    with open(logs[-1], "wb") as log:
      procs.append(
        subprocess.Popen(
          args + flags, cwd=REPO, env=_env(devices), stdout=log, stderr=subprocess.STDOUT
        )
      )
  return procs, logs


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _tails(procs, logs) -> str:
  return "\n".join(
    f"--- process {i} (exit {p.poll()}), last lines of {log}:\n"
    + log.read_text(errors="replace")[-4000:]
    for i, (p, log) in enumerate(zip(procs, logs, strict=True))
  )


def _wait(procs, logs, deadline: float, status: int = 0) -> list[str]:
  """Waits for every process to exit with `status` (killing all when one exits otherwise or
  time runs out); returns their logs."""
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.returncode not in (None, status) for p in procs):
      time.sleep(5)  # give the others a moment to report, then stop them
      break
    time.sleep(0.2)
  _kill(procs)
  assert all(p.returncode == status for p in procs), (
    f"a process failed or timed out\n{_tails(procs, logs)}"
  )
  return [log.read_text(errors="replace") for log in logs]


def _history(workdir: pathlib.Path) -> dict[int, dict]:
  """The logged training steps of a run's history.jsonl, by step."""
  rows = map(json.loads, (workdir / "history.jsonl").read_text().splitlines())
  return {r["step"]: r for r in rows if "loss" in r}


def _last(texts: list[str], procs, logs) -> list[dict]:
  """Each process's last measurements, as the entry point logs them with several processes."""
  out = []
  for i, text in enumerate(texts):
    found = LAST.findall(text)
    assert len(found) == 1, f"process {i} logged no last measurements\n{_tails(procs, logs)}"
    index, count, measurements = found[0]
    assert (int(index), int(count)) == (i, len(texts)), _tails(procs, logs)
    out.append(json.loads(measurements))
  return out


@pytest.mark.slow
def test_two_processes_give_the_one_process_loss(small_training_data, tmp_path):
  data = small_training_data
  start = time.monotonic()
  # The pair and the single process run at once (they share the 2 cores of CI).
  pair = _start(_args(data, tmp_path / "two", OVERRIDES), 2, _pair(), tmp_path / "two")
  single = _start(_args(data, tmp_path / "one", OVERRIDES), 4, [[]], tmp_path / "one")
  try:
    deadline = time.monotonic() + TIMEOUT
    two = _last(_wait(*pair, deadline), *pair)
    _wait(*single, deadline)
    one = _history(tmp_path / "one")[OVERRIDES["num_steps"]]
  finally:
    _kill(pair[0] + single[0])
  print(f"3 processes in {time.monotonic() - start:.1f}s; losses: one {one['loss']!r}, "
        f"two {two[0]['loss']!r} {two[1]['loss']!r}")  # fmt: skip

  keys = ("loss", "loss/cross", "loss/intra", "grad_norm", "param_norm", "pairs")
  for key in keys:
    # Both processes see the same replicated values (bit for bit), and those of one process.
    assert two[0][key] == two[1][key], key
    np.testing.assert_allclose(two[0][key], one[key], rtol=1e-5, err_msg=key)
  assert one["pairs"] == 4 * 256

  # One checkpoint folder, with each process's grain iterator position.
  for step in (1, 2):
    folder = tmp_path / "two" / "checkpoints" / str(step) / "data"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".json") == [
      "process_0-of-2.json",
      "process_1-of-2.json",
    ]
  # Only process 0 writes TensorBoard events.
  assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(small_training_data, tmp_path):
  workdir = tmp_path / "two"
  overrides = {**OVERRIDES, "num_steps": 1000, "checkpoint.every": 1000}
  args = _args(small_training_data, workdir, overrides)
  procs, logs = _start(args, 2, _pair(), workdir)
  try:
    deadline = time.monotonic() + TIMEOUT
    while "step 2/1000" not in logs[0].read_text(errors="replace"):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
        f"no step 2 within {TIMEOUT}s\n{_tails(procs, logs)}"
      )
      time.sleep(0.2)
    # JAX's preemption service gets the notice to every process; both stop after one step.
    procs[1].send_signal(signal.SIGTERM)  # process 0 gets none
    texts = _wait(procs, logs, deadline, status=143)  # both exit as preempted
  finally:
    _kill(procs)
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < 1000, (steps, _tails(procs, logs))
  for text in texts:
    assert f"stopped by SIGTERM after saving step {steps[0]}" in text, _tails(procs, logs)


def _resume(workdir: pathlib.Path, copy: pathlib.Path) -> pathlib.Path:
  """A copy of a finished run, cut back to its step-2 checkpoint (its newest one lost)."""
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "4")
  return copy


@pytest.mark.slow
def test_a_run_resumes_on_another_number_of_processes(small_training_data, tmp_path):
  """2 processes -> 1 and 1 -> 2 (four devices in all, each time): the steps after the
  resume give the uninterrupted run's losses."""
  data, overrides = small_training_data, {**OVERRIDES, "num_steps": 4, "checkpoint.every": 2}
  pair = _start(_args(data, tmp_path / "two", overrides), 2, _pair(), tmp_path / "two")
  single = _start(_args(data, tmp_path / "one", overrides), 4, [[]], tmp_path / "one")
  try:
    deadline = time.monotonic() + TIMEOUT
    _wait(*pair, deadline)
    _wait(*single, deadline)
  finally:
    _kill(pair[0] + single[0])
  # Each resumes from step 2 of the other's checkpoints, at once.
  to_one = _resume(tmp_path / "two", tmp_path / "two_to_one")
  to_two = _resume(tmp_path / "one", tmp_path / "one_to_two")
  resumed_one = _start(_args(data, to_one, overrides), 4, [[]], to_one)
  resumed_two = _start(_args(data, to_two, overrides), 2, _pair(), to_two)
  try:
    deadline = time.monotonic() + TIMEOUT
    texts = _wait(*resumed_one, deadline) + _wait(*resumed_two, deadline)
  finally:
    _kill(resumed_one[0] + resumed_two[0])
  assert "was saved by 2 process(es), this run has 1" in texts[0], texts[0][-3000:]
  assert "was saved by 1 process(es), this run has 2" in texts[1], texts[1][-3000:]
  uninterrupted = _history(tmp_path / "one")
  for workdir in (to_one, to_two):
    history = _history(workdir)
    assert sorted(history) == [1, 2, 3, 4], workdir
    for step in (3, 4):
      for key in ("loss", "loss/cross", "loss/intra", "grad_norm"):
        np.testing.assert_allclose(
          history[step][key], uninterrupted[step][key], rtol=1e-5, err_msg=f"{workdir} {step} {key}"
        )
