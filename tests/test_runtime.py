"""What the loops share: the config kept in the workdir, and the history that survives restarts."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default, pretrain
from reldistill_jax import errors, metrics_writer, runtime, workdir_config


def _config(**fields):
  config = pretrain.get_config("loss=relational,teacher=synthetic,dataset=synthetic,runlocal")
  for key, value in fields.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def _changes(workdir) -> list[dict]:
  path = workdir / workdir_config.CONFIG_CHANGES_FILE
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_field_newer_than_the_run_is_no_change_at_its_old_behaviour(tmp_path):
  """A run started before `input.cameras_per_scan` existed restarts with it at 0 (whole scans,
  as it trained); another value changes the result and is refused."""
  workdir_config.record_config(_config(), tmp_path)
  recorded = json.loads((tmp_path / "config.json").read_text())
  del recorded["input"]["cameras_per_scan"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  workdir_config.record_config(_config(), tmp_path)
  assert _changes(tmp_path) == []
  with pytest.raises(errors.ConfigError, match=r"input.cameras_per_scan: '<absent>' -> 1"):
    workdir_config.record_config(_config(**{"input.cameras_per_scan": 1}), tmp_path)


def test_a_default_run_from_before_the_teachers_settings_restarts_with_its_teacher(tmp_path):
  """configs/default.py's `data.teacher` is absent from older runs, whose teacher was the
  default one: the same values are no change, others are refused."""
  from configs import default

  workdir_config.record_config(default.get_config("runlocal"), tmp_path)
  recorded = json.loads((tmp_path / "config.json").read_text())
  del recorded["data"]["teacher"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  workdir_config.record_config(default.get_config("runlocal"), tmp_path)
  assert _changes(tmp_path) == []
  weaker = default.get_config("runlocal")
  weaker.data.teacher.noise = 0.8
  with pytest.raises(errors.ConfigError, match=r"data.teacher.noise: '<absent>' -> 0.8"):
    workdir_config.record_config(weaker, tmp_path)


def test_a_restart_with_a_changed_config_is_refused_naming_each_field(tmp_path):
  workdir_config.record_config(_config(), tmp_path)
  started = json.loads((tmp_path / "config.json").read_text())
  assert started["loss"]["name"] == "relational" and started["input"]["augment"]["scale"] == [
    0.95,
    1.05,
  ]
  workdir_config.record_config(_config(), tmp_path)  # the same config: nothing to say
  assert _changes(tmp_path) == []

  changed = _config(**{"loss.name": "contrastive", "optimizer.lr": 1e-3})
  with pytest.raises(errors.ConfigError) as refused:
    workdir_config.record_config(changed, tmp_path)
  message = str(refused.value)
  assert "loss.name" in message and "optimizer.lr" in message and "--override_config" in message
  assert "'relational' -> 'contrastive'" in message
  assert json.loads((tmp_path / "config.json").read_text()) == started
  assert _changes(tmp_path) == []

  # --override_config accepts it and records it; the next restart compares with the new values.
  workdir_config.record_config(changed, tmp_path, override=True)
  (change,) = _changes(tmp_path)
  assert change["override"] and change["fields"]["loss.name"] == ["relational", "contrastive"]
  workdir_config.record_config(changed, tmp_path)
  with pytest.raises(errors.ConfigError, match="loss.name"):
    workdir_config.record_config(_config(), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text()) == started  # what it started with


def test_fields_that_only_extend_or_observe_a_run_may_change(tmp_path, caplog):
  workdir_config.record_config(_config(), tmp_path)
  caplog.set_level("INFO")
  extended = {"num_steps": 60, "log_every": 5, "checkpoint.every": 7, "checkpoint.keep": 1}
  workdir_config.record_config(_config(**extended), tmp_path)
  (change,) = _changes(tmp_path)
  assert not change["override"] and sorted(change["fields"]) == sorted(extended)
  assert "num_steps: 6 -> 60" in caplog.text


def test_the_default_refuses_extending_one_stage(tmp_path):
  """Extending pretraining alone would leave the few-shot stage trained on the old encoder."""
  config = default.get_config("runlocal")
  workdir_config.record_config(config, tmp_path)
  config.pretrain.log_every = 1
  workdir_config.record_config(config, tmp_path)
  config.pretrain.num_steps = 40
  with pytest.raises(errors.ConfigError, match="pretrain.num_steps"):
    workdir_config.record_config(config, tmp_path)


def test_history_survives_a_restart_up_to_the_restored_step(tmp_path):
  writer = metrics_writer.MetricWriter(tmp_path, 0, "pretrain")
  for step in (2, 4, 6):
    writer.write(step, {"loss": 1.0 / step, "loss/cross": 0.5, "step_time": 0.1}, 8)
  writer.close()
  # The run died after its checkpoint of step 4: steps 5 and 6 are run again.
  again = metrics_writer.MetricWriter(tmp_path, 4, "pretrain")
  assert [r["step"] for r in again.history] == [2, 4]
  again.write(6, {"loss": 0.2, "step_time": 0.1}, 8)
  again.close()
  lines = (tmp_path / metrics_writer.HISTORY_FILE).read_text().splitlines()
  assert [json.loads(line)["loss"] for line in lines] == [0.5, 0.25, 0.2]


def _run_with_checkpoints(workdir: pathlib.Path, steps: tuple[int, ...]) -> pathlib.Path:
  """A workdir holding config.json and orbax checkpoints of `steps` (params w = step)."""
  workdir_config.record_config(_config(), workdir)
  manager = runtime.checkpoint_manager(workdir, keep=len(steps))
  for step in steps:
    state = {"params": {"w": np.full(3, step, np.float32)}, "step": step}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  return workdir / "checkpoints"


def test_a_checkpoint_is_found_from_its_run_its_folder_or_one_step(tmp_path):
  checkpoints = _run_with_checkpoints(tmp_path / "run", (1, 2))
  w = lambda path: runtime.load_params(path)["w"].tolist()
  assert w(tmp_path / "run") == w(checkpoints) == [2.0] * 3  # the latest step
  assert w(checkpoints / "1") == [1.0] * 3  # that step
  assert runtime.find_checkpoint(str(checkpoints / "1")) == (checkpoints, 1)


def test_a_path_that_names_no_checkpoint_says_what_is_accepted(tmp_path):
  checkpoints = _run_with_checkpoints(tmp_path / "run", (2,))
  step_file = min(
    (p for p in (checkpoints / "2").rglob("*") if p.is_file()), key=lambda p: len(p.parts)
  )
  cases = [  # (given, what it is, the folder meant)
    (tmp_path / "run" / "config.json", "is a file", tmp_path / "run"),
    (step_file, "is a file", checkpoints / "2"),
    (checkpoints / "2" / "state", "holds no finished checkpoint", checkpoints / "2"),
    (tmp_path / "elsewhere", "does not exist", None),
  ]
  for given, what, meant in cases:
    with pytest.raises(errors.DataError) as raised:
      runtime.find_checkpoint(given, "config.checkpoint")
    message = str(raised.value)
    assert message.startswith(f"config.checkpoint: {given} {what}; give "), message
    assert runtime.CHECKPOINT_LAYOUTS in message
    assert message.endswith(f"(did you mean {meant}?)" if meant else "folder in it"), message


USE_CACHE = """
import sys, jax, jax.numpy as jnp
from reldistill_jax import runtime
runtime.use_compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.parametrize("chosen", [False, True])
def test_compiled_programs_go_to_the_cache_unless_one_is_chosen(tmp_path, chosen):
  """A fresh process (JAX reads the setting once): the program lands in the folder given,
  or in the one JAX_COMPILATION_CACHE_DIR chose before."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)  # a program of milliseconds
  if chosen:
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "chosen")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run(
    [sys.executable, "-c", USE_CACHE, str(tmp_path / "given")], env=env, capture_output=True,
    text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  used = tmp_path / ("chosen" if chosen else "given")
  assert proc.stdout.split() == [str(used)]
  assert any(p.name.startswith("jit_") for p in used.iterdir())
  assert not (tmp_path / ("given" if chosen else "chosen")).exists()
