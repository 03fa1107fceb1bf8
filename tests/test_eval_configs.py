"""The zeroshot and gap kinds: a checkpoint's zero-shot mIoU, the gap study across runs."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags
from scipy import stats

from configs import gap as gap_config
from configs import pretrain
from configs import zeroshot as zeroshot_config
from data_prep import text_embeddings
from reldistill_jax import (
  classes,
  config_checks,
  evaluate,
  evaluation_runs,
  input_pipeline,
  packing,
  records,
  runtime,
  teachers,
  train,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = {"variant": "tiny", "out_dim": 512, "patch_size": 128, "num_curves": 4, "dtype": "float32"}


@pytest.fixture(scope="module")
def pretrained(pipeline, small_training_data, tmp_path_factory) -> dict[str, pathlib.Path]:
  """A 2-step pretraining run, small val buckets and the synthetic teacher's text embeddings."""
  tmp = tmp_path_factory.mktemp("zeroshot")
  config = pretrain.get_config("loss=relational,teacher=synthetic,dataset=synthetic,runlocal")
  config.input.buckets = str(small_training_data["buckets"])
  config.input.features = str(small_training_data["features"])
  config.input.num_pairs = 256
  config.model.patch_size = 128
  config.mesh.data = 1
  config.num_steps = 2
  config.checkpoint.every = 2
  teacher = teachers.load("synthetic", pipeline["world"])
  text = text_embeddings.write_text_embeddings(teacher, "nuscenes", tmp / "text.npz")
  # The zero-shot curve at every step.
  config.eval.every = 1
  config.eval.val_buckets = str(small_training_data["val_buckets"])
  config.eval.val_features = str(small_training_data["val_features"])
  config.eval.text_embeddings = str(text)
  config.eval.batch_size = 2
  train.train_and_evaluate(config, tmp / "pretrain")
  return {
    "run": tmp / "pretrain",
    "checkpoint": tmp / "pretrain" / "checkpoints",
    "val": small_training_data["val_buckets"],
    "val_features": small_training_data["val_features"],
    "text": text,
  }


def _zeroshot_config(pretrained):
  config = zeroshot_config.get_config("dataset=synthetic,runlocal")
  config.checkpoint = str(pretrained["checkpoint"])
  config.input.val_buckets = str(pretrained["val"])
  config.text_embeddings = str(pretrained["text"])
  config.model.update(MODEL)
  config.mesh.data = 1
  return config


def test_zeroshot_scores_the_checkpoint(pretrained, tmp_path):
  config = _zeroshot_config(pretrained)
  evaluation_runs.run_zeroshot(config, tmp_path)
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  zeroshot = metrics["zeroshot"]
  assert zeroshot["num_scans"] == 2  # the world's one validation scene, 2 keyframes
  assert zeroshot["empty_class_convention"] == "nan"
  assert set(zeroshot["per_class_iou"]) == set(classes.NUSCENES_CLASSES)
  assert metrics["inputs"]["checkpoint"] == str(pretrained["checkpoint"])
  assert "zeroshot" in (tmp_path / "report.md").read_text()

  # The same numbers as evaluate.zero_shot on the checkpoint's parameters.
  val = records.ShardedReader(str(pretrained["val"]))
  with np.load(pretrained["text"]) as f:
    text = f["embeddings"]
  # One scan per pack here: a scan's predictions do not depend on its pack.
  transform = input_pipeline.Transform(0, config.input.intensity_scale)
  budgets = packing.fit_budgets(val.sizes[:, :2], 1, 128)
  direct = evaluate.zero_shot(
    runtime.make_model(config), runtime.load_params(pretrained["checkpoint"]), val, text,
    transform, budgets, None, classes.NUSCENES_CLASSES,
  )  # fmt: skip
  assert 0.0 < zeroshot["miou"] <= 1.0
  np.testing.assert_allclose(zeroshot["miou"], direct["miou"], rtol=1e-6)
  np.testing.assert_allclose(zeroshot["accuracy"], direct["accuracy"], rtol=1e-6)


def test_pretraining_writes_the_zero_shot_curve(pretrained):
  history = [json.loads(line) for line in (pretrained["run"] / "history.jsonl").open()]
  evals = [r for r in history if "eval/zeroshot_miou" in r]
  assert [r["step"] for r in evals] == [1, 2]
  for r in evals:
    assert 0.0 <= r["eval/zeroshot_miou_paired"] <= r["eval/teacher_miou"] <= 1.0
    assert r["eval/G"] > 0
  # The teacher's ceiling does not depend on the student.
  assert evals[0]["eval/teacher_miou"] == evals[1]["eval/teacher_miou"]


def test_zeroshot_with_the_teacher_store_gives_the_ceiling(pretrained, tmp_path):
  config = _zeroshot_config(pretrained)
  config.input.val_features = str(pretrained["val_features"])
  config.input.num_pairs = 256  # the run's, so the pairs are the same
  metrics = evaluation_runs.run_zeroshot(config, tmp_path)
  history = [json.loads(line) for line in (pretrained["run"] / "history.jsonl").open()]
  last = [r for r in history if "eval/zeroshot_miou" in r][-1]
  # The same checkpoint, validation scans and pairs as the run's last evaluation.
  assert metrics["zeroshot"]["miou"] == pytest.approx(last["eval/zeroshot_miou"], abs=1e-6)
  assert metrics["zeroshot"]["miou_paired"] == pytest.approx(
    last["eval/zeroshot_miou_paired"], abs=1e-6
  )
  assert metrics["zeroshot_teacher"]["miou"] == pytest.approx(last["eval/teacher_miou"], abs=1e-6)
  written = json.loads((tmp_path / "metrics.json").read_text())
  assert written["zeroshot_teacher"]["miou"] == metrics["zeroshot_teacher"]["miou"]
  assert "| zeroshot_teacher |" in (tmp_path / "report.md").read_text()


def test_capacity_probe_of_the_run(pretrained, tmp_path):
  """benchmarks/capacity.py on the run: a linear probe of its frozen 16-channel decoder."""
  out = tmp_path / "capacity.json"
  proc = subprocess.run(
    [sys.executable, "benchmarks/capacity.py", f"--out={out}", f"--run={pretrained['run'].parent}",
     "--max_pairs=400"],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  (result,) = json.loads(out.read_text())["results"]
  assert result["decoder_channels"] == 16 and result["pairs"] == {"train": 400, "val": 400}
  assert result["rank95_student"] <= 16 < result["rank95_teacher"]
  for key in ("miou_student", "miou_probe", "miou_teacher"):
    assert 0.0 <= result[key] <= 1.0, key
  # Two steps in, a linear head fitted on the decoder already beats the student's own.
  assert result["cosine_probe"] > result["cosine_student"]
  assert result["miou_teacher"] > result["miou_student"]


def test_zeroshot_refuses_another_student(pretrained, tmp_path):
  config = _zeroshot_config(pretrained)
  config.model.out_dim = 256
  with pytest.raises(ValueError, match="does not match config.model"):
    evaluation_runs.run_zeroshot(config, tmp_path)
  assert not (tmp_path / "metrics.json").exists()


def test_zeroshot_given_a_checkpoint_file_names_the_layouts_through_main(pretrained, tmp_path):
  run = pretrained["checkpoint"].parent
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "reldistill_jax.main"]
  cmd += ["--config=configs/zeroshot.py:dataset=synthetic,runlocal"]
  cmd += [f"--config.model.{k}={v}" for k, v in MODEL.items()]
  cmd += [
    f"--config.checkpoint={run / 'config.json'}", f"--config.input.val_buckets={pretrained['val']}",
    f"--config.text_embeddings={pretrained['text']}", "--config.mesh.data=1",
    f"--workdir={tmp_path / 'zeroshot'}",
  ]  # fmt: skip
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.rstrip().splitlines()[-1] == (
    f"error: config.checkpoint: {run / 'config.json'} is a file; give a run's workdir (holding "
    "checkpoints/), its checkpoints/ folder, or one checkpoints/<step> folder in it "
    f"(did you mean {run}?)"
  )
  assert not (tmp_path / "zeroshot").exists()
  # The run folder it suggests, and a step folder in it, hold the same student.
  step = max(int(p.name) for p in pretrained["checkpoint"].iterdir() if p.name.isdigit())
  latest = jax.tree.leaves(runtime.load_params(pretrained["checkpoint"]))
  for other in (run, pretrained["checkpoint"] / str(step)):
    for a, b in zip(jax.tree.leaves(runtime.load_params(other)), latest, strict=True):
      np.testing.assert_array_equal(a, b)


RUNS = {  # name: (G, zero-shot mIoU, 1% few-shot mIoU)
  "relational": (0.12, 0.31, 0.42),
  "contrastive": (0.25, 0.22, 0.40),
  "similarity": (0.19, 0.18, 0.33),
}


def _write_runs(root: pathlib.Path) -> list[pathlib.Path]:
  folders = []
  for name, (g, zs, fs) in RUNS.items():
    folder = root / name
    folder.mkdir(parents=True)
    metrics = {"zeroshot": {"miou": zs}, "fewshot_1pct": {"miou": fs}, "gap": {"G": g, "cka": 0.5}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    folders.append(folder)
  return folders


def test_gap_kind_through_main(tmp_path):
  runs = ",".join(str(f) for f in _write_runs(tmp_path / "runs"))
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "reldistill_jax.main", "--config=configs/gap.py"]
  cmd += [f"--config.runs={runs}", f"--workdir={tmp_path / 'study'}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]

  metrics = json.loads((tmp_path / "study" / "metrics.json").read_text())
  assert [r["name"] for r in metrics["runs"]] == [str(tmp_path / "runs" / n) for n in RUNS]
  g = [v[0] for v in RUNS.values()]
  for target, column in (("zeroshot_miou", 1), ("fewshot_miou", 2)):
    y = [v[column] for v in RUNS.values()]
    result = metrics["gap_study"][target]
    assert result["n"] == 3 and result["note"] is None
    pearson, spearman = stats.pearsonr(g, y), stats.spearmanr(g, y)
    np.testing.assert_allclose(result["pearson_r"], pearson.statistic, rtol=1e-9)
    np.testing.assert_allclose(result["pearson_p"], pearson.pvalue, rtol=1e-9)
    np.testing.assert_allclose(result["spearman_rho"], spearman.statistic, rtol=1e-9)
    np.testing.assert_allclose(result["spearman_p"], spearman.pvalue, rtol=1e-9)
  assert (tmp_path / "study" / "plots" / "gap_vs_miou.png").is_file()
  assert "Structural gap vs mIoU" in (tmp_path / "study" / "report.md").read_text()


def test_gap_rows_and_their_errors(tmp_path):
  first, second, third = _write_runs(tmp_path)
  (second / "metrics.json").write_text(json.dumps({"zeroshot": {"miou": 0.2}, "gap": {"G": 0.1}}))
  assert evaluation_runs.gap_row(second) == {
    "name": str(second), "G": 0.1, "zeroshot_miou": 0.2, "fewshot_miou": None,
  }  # fmt: skip
  (third / "metrics.json").write_text(json.dumps({"zeroshot": {"miou": 0.2}, "gap": {}}))
  config = gap_config.get_config()
  config.runs = f"{first}, {third}"
  with pytest.raises(ValueError, match=f"{third}: metrics.json has no gap/G"):
    evaluation_runs.run_gap(config, tmp_path / "study")
  (first / "metrics.json").unlink()
  with pytest.raises(FileNotFoundError, match=f"{first}: no metrics.json"):
    evaluation_runs.gap_row(first)
  assert not (tmp_path / "study").exists()


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="dataset=kitti"):
    zeroshot_config.get_config("dataset=kitti")
  with pytest.raises(ValueError, match="unknown config argument 'loss'"):
    gap_config.get_config("loss=relational")
  with pytest.raises(ValueError, match="config.checkpoint is not set"):
    config_checks.validate(zeroshot_config.get_config())
  config = gap_config.get_config()
  with pytest.raises(ValueError, match="config.runs is not set"):
    config_checks.validate(config)
  config.runs = " , "
  with pytest.raises(ValueError, match="names no run folder"):
    evaluation_runs.split_runs(config.runs)
