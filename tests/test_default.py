"""The embedded default, at runlocal size, through the entry point."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


# Two runs of every stage through the entry point, about a minute: the default suite tests each
# stage on its own (test_pipeline_synthetic, test_train, test_finetune, test_evaluate, test_report).
@pytest.mark.slow
def test_default_runlocal_writes_the_report(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "reldistill_jax.main", "--config=configs/default.py:runlocal"]
  proc = subprocess.run(
    [*cmd, f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert str(tmp_path / "report.md") in proc.stdout and "zero-shot mIoU" in proc.stdout
  # A quiet console: no library INFO chatter (orbax logs a dozen lines per checkpoint).
  assert "orbax" not in proc.stderr and "jax_array_handlers" not in proc.stderr
  assert "Downloading" not in proc.stdout + proc.stderr  # an offline build says so
  assert proc.stderr.count("\n") < 40, proc.stderr  # tqdm redraws with \r, in place
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  for key in ("zeroshot", "zeroshot_at_init", "fewshot_1pct"):
    assert 0.0 <= metrics[key]["miou"] <= 1.0, key
  assert metrics["fewshot_1pct"]["subset"] == "slidr_scene_1pct"
  assert metrics["gap"]["G"] > 0 and metrics["gap"]["pairs"] > 0
  # The teacher's ceiling and the student on the same paired points, and the zero-shot curve.
  assert 0.0 <= metrics["zeroshot"]["miou_paired"] <= metrics["zeroshot_teacher"]["miou"] <= 1.0
  curve = metrics["pretrain"]["curve"]
  assert [step for step, _ in curve["eval/zeroshot_miou"]] == [2, 4]
  assert curve["eval/zeroshot_miou"][-1][1] == metrics["zeroshot"]["miou"]
  assert curve["eval/teacher_miou"][-1][1] == metrics["zeroshot_teacher"]["miou"]
  assert metrics["pretrain"]["convergence"]["evaluations"] == 2
  assert isinstance(metrics["pretrain"]["convergence"]["converged"], bool)
  report = (tmp_path / "report.md").read_text()
  assert "| zeroshot_teacher |" in report and "zeroshot/miou_paired" in report
  for plot in ("training_curves.png", "per_class_iou.png", "bev.png"):
    assert (tmp_path / "plots" / plot).is_file() and f"plots/{plot}" in report
  # A second run in the same workdir reuses the data and the checkpoints.
  again = subprocess.run(
    [*cmd, f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert again.returncode == 0, again.stderr[-3000:]
  rerun = json.loads((tmp_path / "metrics.json").read_text())
  assert rerun["zeroshot"] == metrics["zeroshot"]
  # Every metric survives the rerun, whose training loops have nothing left to run.
  assert rerun == metrics and rerun["pretrain"]["final_loss"] is not None
  fewshot = json.loads((tmp_path / "fewshot" / "metrics.json").read_text())
  assert fewshot["final_train_loss"] is not None
