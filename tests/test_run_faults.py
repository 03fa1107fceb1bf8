"""What a cluster does to a run: a second process on its workdir, a full disk, SIGTERM in
every data stage. Each case checks the exit status, the one line and what is kept."""

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import PRETRAIN_ARG, PRETRAIN_OVERRIDES, SYNTHETIC_BUILDER, xla_flags

from reldistill_jax import checkpoint_health, errors, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")


# The steps of a run that a test stops: one number, so that its runs compile one step program
# (the schedule is part of it), which the run's compilation cache then serves.
LONG_RUN = 1000


def _pretrain_args(data, workdir, **overrides) -> list[str]:
  args = [
    sys.executable,
    "-m",
    "reldistill_jax.main",
    f"--config=configs/pretrain.py:{PRETRAIN_ARG}",
  ]
  args += [f"--config.input.{k}={data[k]}" for k in ("buckets", "features")]
  args += [f"--config.{k}={v}" for k, v in {**PRETRAIN_OVERRIDES, **overrides}.items()]
  return [*args, f"--workdir={workdir}"]


def _wait_for_line(proc: subprocess.Popen, text: bytes, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  for line in proc.stderr:  # absl logs to stderr
    if text in line or time.time() > deadline:
      return
  raise AssertionError(f"the process ended before logging {text!r}")


def _wait_for_lock(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
  """The holder written in the lock at `path`, once `proc` has written it whole."""
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    try:
      return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
      time.sleep(0.02)
  raise AssertionError(f"{path}: no lock written by pid {proc.pid}")


def _only_line(stderr: str) -> str:
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------
# The workdir lock.
# ----------------------------------------------------------------------------


def test_a_second_run_on_a_workdir_is_refused_and_the_first_goes_on(small_training_data, tmp_path):
  workdir = tmp_path / "run"
  long = {"num_steps": LONG_RUN, "checkpoint.every": LONG_RUN}
  first = subprocess.Popen(
    _pretrain_args(small_training_data, workdir, **long), cwd=REPO, env=ENV,
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
  )  # fmt: skip
  holder = _wait_for_lock(workdir / workdir_lock.LOCK_FILE, first)
  assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
  second = subprocess.run(  # while the first compiles its step
    _pretrain_args(small_training_data, workdir, **long), cwd=REPO, env=ENV,
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert second.returncode == errors.WorkdirLocked.exit_status == 2, second.stderr[-3000:]
  line = _only_line(second.stderr)
  assert line.startswith(
    f"error: {workdir} is in use by pid {first.pid} on host {socket.gethostname()}, started "
    f"{holder['started']} ({workdir / workdir_lock.LOCK_FILE}); wait for that run to end"
  ), line
  # The first run never noticed: it trains, stops on SIGTERM as any run, and leaves no lock.
  _wait_for_line(first, f"step 1/{LONG_RUN}".encode())
  first.send_signal(signal.SIGTERM)
  first.communicate(timeout=300)
  assert first.returncode == 143
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  steps = [
    json.loads(line)["step"] for line in (workdir / "history.jsonl").read_text().splitlines()
  ]
  assert steps == sorted(set(steps)), steps  # every step once, in order
  assert not list((workdir / "checkpoints").glob("*tmp*"))


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock = tmp_path / workdir_lock.LOCK_FILE
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
  with caplog.at_level(logging.WARNING), workdir_lock.hold(tmp_path):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert f"taking over the lock of pid {dead.pid} on host {socket.gethostname()}" in caplog.text
  assert not lock.exists()


def test_a_lock_from_another_host_is_refused(tmp_path):
  lock = tmp_path / workdir_lock.LOCK_FILE
  lock.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": "2026-12-07T10:00:00"}))
  with pytest.raises(errors.WorkdirLocked, match=r"in use by pid 4242 on host node-7, started"):
    with workdir_lock.hold(tmp_path):
      pass
  assert json.loads(lock.read_text())["host"] == "node-7"  # untouched


def test_a_new_workdir_is_locked_once_created_and_processes_after_the_first_take_none(tmp_path):
  workdir = tmp_path / "new"
  with workdir_lock.hold(workdir):
    assert not workdir.exists()  # nothing made before the inputs are checked
    workdir.mkdir()
    workdir_lock.take(workdir)
    assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  with workdir_lock.hold(workdir, take=False):
    workdir_lock.take(workdir)
    assert not (workdir / workdir_lock.LOCK_FILE).exists()


# ----------------------------------------------------------------------------
# A full disk.
# ----------------------------------------------------------------------------

# Run in a private mount namespace on a small tmpfs: the run starts, its first checkpoint
# completes, then the disk is filled to 64 KiB of free space.
_FULL_DISK = textwrap.dedent(
  """
  import json, os, pathlib, shutil, subprocess, sys, time
  mount, out, args = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
  proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first = mount / "run" / "checkpoints" / "2" / "file_sizes.json"
  while not first.exists() and proc.poll() is None:
    time.sleep(0.02)
  stat = os.statvfs(mount)
  with open(mount / "filler", "wb") as f:
    f.write(b"\\0" * (stat.f_bavail * stat.f_frsize - 64 * 1024))
  _, err = proc.communicate(timeout=300)
  shutil.copytree(mount / "run", out / "run")
  (out / "result.json").write_text(json.dumps({"status": proc.returncode, "stderr": err}))
  """
)


def _namespaces_work() -> bool:
  if shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
  return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="needs `unshare -rm` to mount a small tmpfs")
def test_a_full_disk_is_one_line_with_its_own_status(small_training_data, tmp_path):
  mount = tmp_path / "mount"
  mount.mkdir()
  args = _pretrain_args(small_training_data, mount / "run", num_steps=LONG_RUN, log_every=LONG_RUN)
  script = tmp_path / "full_disk.py"
  script.write_text(_FULL_DISK)
  subprocess.run(
    ["unshare", "-rm", sys.executable, str(script), str(mount), str(tmp_path), *args],
    cwd=REPO, env=ENV, check=True, timeout=400,
  )  # fmt: skip
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["status"] == errors.StorageError.exit_status == 4, result["stderr"][-3000:]
  line = _only_line(result["stderr"])
  assert line.startswith(f"error: {mount / 'run' / 'checkpoints'}"), line
  assert "no space left on device" in line and "run the same command again" in line, line
  assert "ERROR" not in result["stderr"]  # orbax's own error lines go to run.log, space allowing
  # What looks complete is complete: every finished step passes its checks.
  checkpoints = tmp_path / "run" / "checkpoints"
  finished = [p for p in checkpoints.iterdir() if p.name.isdigit()]
  assert finished and all(checkpoint_health.fault(p) is None for p in finished)


# ----------------------------------------------------------------------------
# SIGTERM in every data stage.
# ----------------------------------------------------------------------------


def _stages(pipeline, out: pathlib.Path) -> dict[str, tuple[list[str], callable]]:
  """stage -> (its command, when to signal it): each writes under `out`. The world
  generation is also stopped by SIGINT (Ctrl-C), with its workers, which ignore it."""
  tfds, world = str(pipeline["tfds"]), str(pipeline["world"])

  def partial(pattern: str):
    """Whether `pattern` matches under `out`: a glob of the stage's own folders only, since
    listing every stage's growing tree each poll could outlast a short stage."""

    def ready() -> bool:
      try:
        return any(out.glob(pattern))
      except OSError:  # a folder renamed or removed while it was listed
        return False

    return ready

  return {
    "world": (
      ["-m", "data_prep.synthetic", f"--out={out / 'world'}", "--scenes=8", "--workers=1"],
      partial(".world.partial-*/samples/LIDAR_TOP/*"),
    ),
    "world, Ctrl-C": (
      ["-m", "data_prep.synthetic", f"--out={out / 'world_int'}", "--scenes=8", "--workers=2"],
      partial(".world_int.partial-*/samples/LIDAR_TOP/*"),
    ),
    "build": (
      [
        "-m",
        "data_prep.build",
        "nuscenes_lidarseg",
        f"--manual_dir={world}",
        f"--data_dir={out / 'tfds'}",
      ],
      partial("tfds/nuscenes_lidarseg/*/incomplete.*"),
    ),  # fmt: skip
    "voxelise": (
      [
        "-m",
        "data_prep.voxelise",
        f"--data_dir={tfds}",
        f"--builder={SYNTHETIC_BUILDER}",
        "--split=train",
        f"--out={out / 'buckets'}",
        "--voxel_size=0.05",
        "--workers=2",
        "--records_per_shard=1",
      ],
      partial("buckets/manifest.json"),
    ),  # fmt: skip
    "features": (
      [
        "-m",
        "data_prep.teacher_features",
        "--teacher=synthetic",
        f"--weights={world}",
        f"--data_dir={tfds}",
        f"--builder={SYNTHETIC_BUILDER}",
        "--split=train",
        f"--out={out / 'features'}",
        "--records_per_shard=1",
        "--batch_size=1",
      ],
      partial("features/manifest.json"),
    ),  # fmt: skip
  }


TERMINATED = (
  "error: stopped by SIGTERM; partial output removed: run the same command again to go on"
)
INTERRUPTED = (
  "error: interrupted; partial output removed, the last periodic checkpoint (if any) kept"
)


STAGES = ("world", "world, Ctrl-C", "build", "voxelise", "features")


def _signal_once_ready(pipeline, out: pathlib.Path, stage: str) -> tuple[int, str]:
  """(exit status, stderr) of `stage` writing under `out`, signalled once its output appears."""
  command, ready = _stages(pipeline, out)[stage]
  # Ctrl-C reaches a command as it does from a terminal: an ignored SIGINT is inherited
  # (Python then keeps ignoring it), and this worker's disposition depends on what ran in it.
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    proc = subprocess.Popen(
      [sys.executable, *command],
      cwd=REPO,
      env=ENV,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
  finally:
    signal.signal(signal.SIGINT, inherited)
  deadline = time.time() + 300
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT if "Ctrl-C" in stage else signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


@pytest.mark.parametrize("stage", STAGES)
def test_a_stop_in_each_data_stage_is_one_line_and_leaves_no_partial_output(
  stage, pipeline, tmp_path
):
  # The feature store of the fixture's 4 scans is written in a fraction of a second: on a loaded
  # machine the stage can end before the signal arrives (status 0). Then it runs again, afresh;
  # a stage that ignored the signal would end with 0 every time and fail below.
  for attempt in range(3):
    out = tmp_path / f"attempt{attempt}"
    returncode, err = _signal_once_ready(pipeline, out, stage)
    if returncode != 0:
      break
  status, line = (130, INTERRUPTED) if "Ctrl-C" in stage else (143, TERMINATED)
  assert returncode == status, f"{stage}: {returncode}\n{err[-3000:]}"
  assert _only_line(err) == line
  # Nothing partial stays: no world being written, no TFDS build folder, no temporary file.
  assert not list(out.rglob(".world*.partial-*"))
  assert not (out / "world").exists() and not (out / "world_int").exists()
  assert not list(out.rglob("incomplete.*"))
  assert not list(out.rglob("*.tmp"))
  if stage in ("voxelise", "features"):  # resumable: what is written is checked and kept
    store = "buckets" if stage == "voxelise" else "features"
    manifest = json.loads((out / store / "manifest.json").read_text())
    assert not manifest["complete"], store
