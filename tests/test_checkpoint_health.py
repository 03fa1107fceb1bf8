"""A damaged newest checkpoint: the run resumes from the one before, and keeps it aside."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import PRETRAIN_ARG, PRETRAIN_OVERRIDES, pretrain_config, xla_flags

from reldistill_jax import checkpoint_health, errors, train, workdir_config


@pytest.fixture(scope="module")
def finished(small_training_data, tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4) and its final parameters."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  out = train.train_and_evaluate(pretrain_config(small_training_data), workdir)
  return workdir, out["state"]["params"]


def _chunk(step_dir):
  """The largest array file of a checkpoint."""
  chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(chunks, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  """Cuts the largest array file in half; (its path, the fault expected)."""
  chunk = _chunk(step_dir)
  data = chunk.read_bytes()
  chunk.write_bytes(data[: len(data) // 2])
  return chunk, f"{chunk} holds {len(data) // 2} bytes, {len(data)} when it was saved"


def _remove_metadata(step_dir):
  path = step_dir / "state" / "_METADATA"
  path.unlink()
  return path, f"{path} is missing"


def _remove_iterator(step_dir):
  path = step_dir / "data" / "process_0-of-1.json"
  path.unlink()
  return path, f"{step_dir / 'data'} holds no iterator file (process_<i>-of-<n>.json)"


DAMAGES = {
  "chunk cut in half": _truncate,
  "_METADATA deleted": _remove_metadata,
  "iterator file deleted": _remove_iterator,
}


def test_every_finished_checkpoint_records_its_file_sizes(finished):
  workdir, _ = finished
  for step in ("2", "4"):
    step_dir = workdir / "checkpoints" / step
    sizes = json.loads((step_dir / checkpoint_health.SIZES_FILE).read_text())
    assert sizes["state/_METADATA"] == (step_dir / "state" / "_METADATA").stat().st_size
    assert "data/process_0-of-1.json" in sizes and len(sizes) > 5
    assert checkpoint_health.fault(step_dir) is None


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside(
  small_training_data, finished, tmp_path, caplog, damage
):
  source, params = finished
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  step_dir = workdir / "checkpoints" / "4"
  damaged_file, expected = DAMAGES[damage](step_dir)
  assert checkpoint_health.fault(step_dir) == expected
  with caplog.at_level(logging.INFO):
    resumed = train.train_and_evaluate(pretrain_config(small_training_data), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  aside = workdir / "checkpoints" / "damaged" / "4"
  assert (
    warnings[0]
    == f"checkpoint step 4 is damaged: {expected}; moved to {aside}, resuming from step 2"
  )
  assert "pretrain: steps 2 to 4 on 1 device(s)" in caplog.text
  # Kept aside, not deleted; the rerun saved a whole step 4 again.
  kept = aside / damaged_file.relative_to(step_dir)
  assert kept.is_file() == (damage == "chunk cut in half")
  assert (aside / checkpoint_health.SIZES_FILE).is_file()
  assert checkpoint_health.fault(workdir / "checkpoints" / "4") is None
  for x, y in zip(
    jax.tree.leaves(params), jax.tree.leaves(resumed["state"]["params"]), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_whole_checkpoint_stops_in_one_line_and_moves_nothing(
  small_training_data, finished, tmp_path
):
  source, _ = finished
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  _, cut = _truncate(workdir / "checkpoints" / "4")
  _, missing = _remove_metadata(workdir / "checkpoints" / "2")
  args = [f"--config.input.{k}={small_training_data[k]}" for k in ("buckets", "features")]
  args += [f"--config.{k}={v}" for k, v in PRETRAIN_OVERRIDES.items()]
  proc = subprocess.run(
    [sys.executable, "-m", "reldistill_jax.main", f"--config=configs/pretrain.py:{PRETRAIN_ARG}",
     *args, f"--workdir={workdir}"],
    capture_output=True, text=True, timeout=300,
    env={**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"},
  )  # fmt: skip
  assert proc.returncode == errors.UserError.exit_status, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {workdir / 'checkpoints'}: no checkpoint can be restored (")
  assert f"(step 4: {cut}; step 2: {missing}); put back a copy" in last
  assert "Traceback" not in proc.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  assert workdir_config.CONFIG_FILE in {p.name for p in workdir.iterdir()}


def test_the_iterator_position_is_the_one_every_saving_process_agrees_on(tmp_path):
  """What lets a checkpoint of P processes resume on any number (test_multiprocess runs it)."""
  for i in range(2):
    (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 4}))
  assert checkpoint_health.iterator_state(tmp_path) == ({"next_index": 4}, 2)
  (tmp_path / "process_1-of-2.json").write_text(json.dumps({"next_index": 5}))
  with pytest.raises(errors.DataError, match=r"stopped at different positions .*with 2 processes"):
    checkpoint_health.iterator_state(tmp_path)
  (tmp_path / "process_1-of-2.json").unlink()
  with pytest.raises(errors.DataError, match=r"process_1-of-2.json is missing"):
    checkpoint_health.iterator_state(tmp_path)
