"""User errors through the entry points: one line naming the field, file or split, exit status 2.

Each case runs the real command in a subprocess and checks its status, that
stderr ends in one `error:` line naming what is wrong, that no traceback is
printed, and that nothing was written.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import (
  PRETRAIN_OVERRIDES,
  SYNTHETIC_BUILDER,
  RunsInGroups,
  pretrain_config,
  xla_flags,
)

from reldistill_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = (
  "--config=configs/pretrain.py:loss=relational,teacher=synthetic,dataset=synthetic,runlocal"
)


# `conftest.pretrain_config` as flags (patch size and mesh are `_pretrain`'s own).
COMMON = [
  f"--config.{k}={v}"
  for k, v in PRETRAIN_OVERRIDES.items()
  if k not in ("model.patch_size", "mesh.data")
]


def _env() -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
    timeout=timeout,
  )  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess, *named: str, status: int = 2) -> str:
  assert proc.returncode == status, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
  for text in named:
    assert text in errors[0], errors[0]
  return errors[0]


def _pretrain(data, workdir, *overrides: str) -> list[str]:
  return [
    "reldistill_jax.main", PRETRAIN, f"--workdir={workdir}",
    f"--config.input.buckets={data['buckets']}", f"--config.input.features={data['features']}",
    "--config.model.patch_size=128", "--config.mesh.data=1",
    *overrides,
  ]  # fmt: skip


BAD_VALUES = [
  ("--config.optimizer.lrr=1e-3", ("--config.optimizer.lrr", "optimizer.lr?")),
  ("--config.input.batch_size=0", ("config.input.batch_size=0", ">= 1")),
  ("--config.input.batch_size=abc", ("--config.input.batch_size=abc",)),
  ("--config.loss.name=hinge", ("config.loss.name='hinge'", "relational")),
  ("--config.input.pack_size=3", ("config.input.batch_size=2", "multiple of input.pack_size")),
  ("--config.input.buckets=/nonexistent/buckets", ("/nonexistent/buckets",)),
  (
    "--config.checkpoint.init_from=/nonexistent/run",
    ("config.checkpoint.init_from: /nonexistent/run does not exist", "checkpoints/<step>"),
  ),
  (
    "--config.checkpoint.resume=/nonexistent/run",
    ("config.checkpoint.resume: /nonexistent/run does not exist", "a run's workdir"),
  ),
]


@pytest.fixture(scope="module")
def bad_value_runs(small_training_data, tmp_path_factory) -> tuple[RunsInGroups, dict]:
  """(override -> its run, override -> its workdir): the runs started a few at once (each
  is mostly imports)."""
  root = tmp_path_factory.mktemp("bad_values")
  workdirs = {override: root / str(i) / "run" for i, (override, _) in enumerate(BAD_VALUES)}
  runs = RunsInGroups(
    {o: ["-m", *_pretrain(small_training_data, w, o)] for o, w in workdirs.items()}, REPO, _env()
  )
  return runs, workdirs


@pytest.mark.parametrize("override, named", BAD_VALUES)
def test_bad_config_values_are_one_line(bad_value_runs, override, named):
  runs, workdirs = bad_value_runs
  proc, workdir = runs[override], workdirs[override]
  _one_line_error(proc, *named)
  assert not workdir.exists()  # checked before the workdir is created


def test_a_damaged_shard_is_named_and_a_rerun_repairs_it(pipeline, tmp_path):
  out = tmp_path / "buckets"
  voxelise = [
    "data_prep.voxelise", f"--data_dir={pipeline['tfds']}", f"--builder={SYNTHETIC_BUILDER}",
    "--split=val", f"--out={out}", "--voxel_size=0.4", "--num_stages=2",
    "--records_per_shard=1", "--workers=1",
  ]  # fmt: skip
  assert _run(voxelise).returncode == 0
  shard = sorted(out.glob("*.array_record"))[1]
  intact = shard.read_bytes()
  shard.write_bytes(intact[: len(intact) // 2])  # truncated
  error = _one_line_error(_run(["data_prep.voxelise", f"--out={out}", "--verify"]), shard.name)
  assert "1 of 2 listed shards are damaged" in error
  # The writing command, run again, rewrites that shard (and says so) and nothing else.
  again = _run(voxelise)
  assert again.returncode == 0 and f"shard {shard.name}" in again.stderr, again.stderr
  assert "rewriting it" in again.stderr and shard.read_bytes() == intact
  assert _run(["data_prep.voxelise", f"--out={out}", "--verify"]).returncode == 0


def test_an_empty_split_is_named(pipeline, tmp_path):
  args = [
    "data_prep.voxelise", f"--data_dir={pipeline['tfds']}", f"--builder={SYNTHETIC_BUILDER}",
    "--split=train[:0]", f"--out={tmp_path / 'out'}",
  ]  # fmt: skip
  _one_line_error(_run(args), "split 'train[:0]' holds no records")
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def one_step_run(small_training_data, tmp_path_factory) -> pathlib.Path:
  """The workdir of a finished one-step run, in this process, with the config the entry
  point builds from `_pretrain`'s flags and `--config.num_steps=1`."""
  config = pretrain_config(small_training_data, num_steps=1)
  workdir = tmp_path_factory.mktemp("one_step") / "run"
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.parametrize("verbose", [False, True])
def test_a_changed_config_is_refused_through_the_entry_point(
  one_step_run, small_training_data, tmp_path, verbose
):
  workdir = tmp_path / "run"
  shutil.copytree(one_step_run, workdir)
  before = sorted(p.name for p in workdir.rglob("*"))
  changed = "--config.loss.name=contrastive"
  args = _pretrain(small_training_data, workdir, *COMMON, "--config.num_steps=1", changed)
  proc = _run([*args, *(["--verbose"] if verbose else [])])
  if verbose:  # the same error with its traceback
    assert proc.returncode == 2 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert "loss.name: 'relational' -> 'contrastive'" in proc.stderr
  else:
    _one_line_error(proc, "loss.name: 'relational' -> 'contrastive'", "--override_config")
  assert sorted(p.name for p in workdir.rglob("*")) == before


def test_a_corrupt_store_met_in_training_is_one_line(small_training_data, tmp_path):
  data = dict(small_training_data, buckets=tmp_path / "buckets")
  shutil.copytree(small_training_data["buckets"], data["buckets"])
  shard = sorted(data["buckets"].glob("*.array_record"))[0]
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
  shard.write_bytes(bytes(raw))
  proc = _run(_pretrain(data, tmp_path / "run", *COMMON))
  _one_line_error(proc, shard.name, "rerun the command that writes the store")


BUILDER_ERRORS = [
  # A builder with several configs, named without one: the configs built there and the known ones.
  ("nuscenes_lidarseg", (
    "--builder nuscenes_lidarseg: this builder has several configs and none is named",
    "e.g. --builder nuscenes_lidarseg/v1.0-synthetic", ": v1.0-synthetic; known: v1.0-mini, ",
    "v1.0-trainval",
  )),
  # A config not built there: the ones that are, and the command that builds it.
  ("nuscenes_lidarseg/v1.0-mini", (
    "no built dataset 'nuscenes_lidarseg/v1.0-mini'",
    "built there: nuscenes_lidarseg/v1.0-synthetic",
    "data_prep.build nuscenes_lidarseg", "--config v1.0-mini",
  )),
  ("semantic_kitti/v1.0-mini", ("semantic_kitti has no configs; pass --builder semantic_kitti",)),
  ("nuscenes-lidarseg", ("unknown builder 'nuscenes-lidarseg'", "nuscenes_lidarseg, semantic_kitti")),
]  # fmt: skip


@pytest.mark.parametrize("builder, named", BUILDER_ERRORS)
def test_voxelise_names_the_builder_configs(pipeline, tmp_path, builder, named):
  args = [
    "data_prep.voxelise", f"--data_dir={pipeline['tfds']}", f"--builder={builder}",
    "--split=train", f"--out={tmp_path / 'out'}",
  ]  # fmt: skip
  _one_line_error(_run(args), *named)
  assert not (tmp_path / "out").exists()


def test_teacher_features_names_the_builder_configs(pipeline, tmp_path):
  args = [
    "data_prep.teacher_features", "--teacher=synthetic", f"--weights={pipeline['world']}",
    f"--data_dir={pipeline['tfds']}", "--builder=nuscenes_lidarseg", "--split=train",
    f"--out={tmp_path / 'out'}",
  ]  # fmt: skip
  _one_line_error(_run(args), *BUILDER_ERRORS[0][1])
  assert not (tmp_path / "out").exists()
