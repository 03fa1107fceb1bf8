"""The pretraining loop on a small synthetic world: steps, devices, resume."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import (
  PRETRAIN_ARG,
  PRETRAIN_OVERRIDES,
  SYNTHETIC_BUILDER,
  pretrain_config,
  random_pairs,
  xla_flags,
)

from configs import default, pretrain
from data_prep import teacher_features
from data_prep.builders import data_source
from reldistill_jax import config_checks, errors, losses, records, runtime, teachers, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_training_runs_and_writes_its_outputs(small_training_data, tmp_path):
  out = train.train_and_evaluate(pretrain_config(small_training_data), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["loss"]["name"] == "relational"
  m = out["measurements"]
  for key in ("loss", "loss/cross", "loss/intra", "grad_norm", "param_norm", "update_norm"):
    assert np.isfinite(m[key]) and m[key] >= 0, key
  assert m["pairs"] == 2 * 256  # every scan has more than 256 pairs
  assert m["learning_rate"] > 0 and m["step_time"] > 0
  assert int(out["state"]["step"]) == 4
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
    "2",
    "4",
  ]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  # A restart with another loss is refused before any step, naming the field.
  with pytest.raises(errors.ConfigError, match=r"loss.name: 'relational' -> 'contrastive'"):
    train.train_and_evaluate(
      pretrain_config(small_training_data, **{"loss.name": "contrastive"}), tmp_path
    )
  # A finished run restarted for nothing keeps its last measurements.
  again = train.train_and_evaluate(pretrain_config(small_training_data), tmp_path)
  assert again["measurements"]["loss"] == m["loss"] and len(again["history"]) == 4


# Two whole training runs, each compiled for its mesh (half a minute); the default suite checks the
# sharded losses on 8 devices against 1 (test_sharded_losses) and the packs (test_point_encoder).
@pytest.mark.slow
def test_eight_devices_give_the_one_device_loss(small_training_data, tmp_path):
  losses = {}
  for devices in (1, 8):
    # Eight packs of one scan: one per device, or all eight on one.
    overrides = {"mesh.data": devices, "input.batch_size": 8, "input.pack_size": 1}
    config = pretrain_config(small_training_data, num_steps=1, **overrides)
    losses[devices] = train.train_and_evaluate(config, tmp_path / str(devices))["measurements"]
  for key in ("loss", "loss/cross", "loss/intra", "grad_norm"):
    np.testing.assert_allclose(losses[8][key], losses[1][key], rtol=1e-5, err_msg=key)


def _main(config_args: list[str], workdir: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  cmd = [
    sys.executable,
    "-m",
    "reldistill_jax.main",
    f"--config=configs/pretrain.py:{PRETRAIN_ARG}",
  ]
  cmd += config_args + [f"--workdir={workdir}"]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_from_an_earlier_checkpoint_is_exact(small_training_data, tmp_path, caplog):
  """A run whose newest checkpoint is gone (killed after step 2's save) resumes from step 2:
  the same parameters, bit for bit, as an uninterrupted run (the restored optimizer and
  iterator states included). The slow twin below kills a real process."""
  full = train.train_and_evaluate(pretrain_config(small_training_data), tmp_path / "full")
  shutil.copytree(tmp_path / "full", tmp_path / "cut")  # the same run, then killed
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")
  with caplog.at_level(logging.INFO):
    resumed = train.train_and_evaluate(pretrain_config(small_training_data), tmp_path / "cut")
  assert "pretrain: steps 2 to 4 on 1 device(s)" in caplog.text  # restored, not restarted
  assert [r["step"] for r in resumed["history"] if "loss" in r] == [1, 2, 3, 4]
  a, b = full["state"]["params"], resumed["state"]["params"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Three processes (about 25 s); the default suite resumes in process, above.
@pytest.mark.slow
def test_resume_after_sigkill_is_exact(small_training_data, tmp_path):
  args = [f"--config.input.buckets={small_training_data['buckets']}"]
  args += [f"--config.input.features={small_training_data['features']}"]
  args += [f"--config.{k}={v}" for k, v in PRETRAIN_OVERRIDES.items()]
  # The uninterrupted run and the one to kill are independent: they run at once.
  full = _main(args, tmp_path / "full")
  killed = _main(args, tmp_path / "killed")
  checkpoint = tmp_path / "killed" / "checkpoints" / "2"
  deadline = time.time() + 300
  while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert checkpoint.exists(), killed.stderr.read().decode()[-3000:]
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / "killed" / "checkpoints" / "4").exists()
  _, err = full.communicate(timeout=300)
  assert full.returncode == 0, err.decode()[-3000:]

  resumed = _main(args, tmp_path / "killed")
  assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]
  a = runtime.load_params(tmp_path / "full" / "checkpoints")
  b = runtime.load_params(tmp_path / "killed" / "checkpoints")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="loss=hinge"):
    pretrain.get_config("loss=hinge")
  with pytest.raises(ValueError, match="unknown config argument 'lr'"):
    pretrain.get_config("lr=3")


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("distance", ["l1", "squared"])
def test_relational_options_reach_the_loss(diagonal, distance):
  """config.loss.diagonal and config.loss.distance reach the loss of `train.make_loss`."""
  k, q, m = random_pairs(40, 8, seed=1)
  config = pretrain.get_config(PRETRAIN_ARG)
  assert (config.loss.diagonal, config.loss.distance) == (True, "l1")  # the paper's loss
  config.loss.diagonal, config.loss.distance = diagonal, distance
  out = train.make_loss(config, None)(k, q, m)
  ref = losses.relational_loss(k, q, m, diagonal=diagonal, distance=distance)
  for part in ref:
    np.testing.assert_allclose(out[part], ref[part], rtol=1e-5, err_msg=part)
  if (diagonal, distance) != (True, "l1"):
    assert not np.isclose(out["loss"], losses.relational_loss(k, q, m)["loss"], rtol=1e-2)


def test_bad_relational_distance_is_refused_in_one_line():
  config = default.get_config("runlocal")
  config.pretrain.loss.distance = "l3"
  with pytest.raises(errors.ConfigError) as refused:
    config_checks.validate(config)
  assert str(refused.value) == (
    "config.pretrain.loss.distance='l3' must be one of l1, squared "
    "(set --config.pretrain.loss.distance=...)"
  )
  config = pretrain.get_config(PRETRAIN_ARG)
  config.loss.distance = "L1"
  with pytest.raises(errors.ConfigError, match=r"^config.loss.distance='L1' must be one of l1, sq"):
    config_checks.validate(config, required=False)


def test_bad_inputs_fail_before_training(small_training_data, pipeline, tmp_path):
  # A feature store written by another teacher.
  config = pretrain_config(small_training_data)
  config.teacher = "clip_vitb16"
  with pytest.raises(records.ConfigMismatchError, match="teacher"):
    train.train_and_evaluate(config, tmp_path / "a")
  # A feature store of the same teacher under another dense rule.
  config = pretrain_config(small_training_data)
  config.dense = "naclip"
  with pytest.raises(
    records.ConfigMismatchError, match="dense: stored 'class_prototypes', wanted 'naclip'"
  ):
    train.train_and_evaluate(config, tmp_path / "a2")
  # A feature store of another builder split than the buckets'.
  teacher = teachers.load("synthetic", pipeline["world"])
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "val")
  teacher_features.write_store(teacher, source, str(tmp_path / "val"), SYNTHETIC_BUILDER, "val")
  config = pretrain_config(small_training_data)
  config.input.features = str(tmp_path / "val")
  with pytest.raises(ValueError, match="holds split 'train' but the feature store"):
    train.train_and_evaluate(config, tmp_path / "b")
  assert not (tmp_path / "b" / "checkpoints").exists()


def test_non_finite_loss_names_the_step_and_samples():
  with pytest.raises(errors.Diverged, match=r"at step 7; batch samples: \['tok-a', 'tok-b'\]"):
    runtime.check_finite({"loss": np.float32("nan")}, 7, np.array([b"tok-a", b"tok-b"], object))
  runtime.check_finite({"loss": np.float32(1.5)}, 7, np.array([b"tok-a"], object))


def test_sigterm_saves_and_exits_143(small_training_data, tmp_path):
  args = [f"--config.input.buckets={small_training_data['buckets']}"]
  args += [f"--config.input.features={small_training_data['features']}"]
  args += [
    f"--config.{k}={v}"
    for k, v in {**PRETRAIN_OVERRIDES, "num_steps": 1000, "checkpoint.every": 1000}.items()
  ]
  proc = _main(args, tmp_path)
  deadline = time.time() + 300
  for line in proc.stderr:  # absl logs to stderr
    if b"step 1/1000" in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  # A distinct non-zero status, so that a scheduler restarts the job.
  assert proc.returncode == errors.Preempted.exit_status == 143, err.decode()[-3000:]
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 1000
  last = err.decode().strip().splitlines()[-1]
  assert (
    last
    == f"error: stopped by SIGTERM after saving step {steps[0]}; run the same command again to resume"
  )
  assert "Traceback" not in err.decode()
