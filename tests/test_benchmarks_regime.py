"""benchmarks/regime.py: its settings, the runs it configures and what it reads of them."""

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "regime.py"


@pytest.fixture(scope="module")
def regime():
  spec = importlib.util.spec_from_file_location("regime_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_settings_are_typed_and_unknown_levers_named(regime):
  assert regime.parse_setting("wide:variant=tiny_wide,voxel_size=0.2,head_lr=0.1") == (
    "wide", {"variant": "tiny_wide", "voxel_size": 0.2, "head_lr": 0.1},
  )  # fmt: skip
  assert regime.parse_setting("study:") == ("study", {})
  with pytest.raises(ValueError, match=r"unknown lever 'width'; choose from"):
    regime.parse_setting("w:width=64")
  with pytest.raises(ValueError, match="start with a name"):
    regime.parse_setting(":variant=tiny")


def test_each_setting_has_its_data_and_from_scratch_runs(regime, tmp_path):
  config = regime.data_config(tmp_path, {"voxel_size": 0.15, "model": "minkunet14a"}, 0)
  assert config.data.root == str(tmp_path / "data_0.15m_5stages")  # a MinkUNet needs 5 stages
  assert config.data.world.scenes == 20 and config.data.voxel.voxel_size == 0.15
  paths = {f"buckets/{s}": tmp_path / s for s in ("train", "train_1pct", "val")}
  for fraction, split, subset in (("100pct", "train", "all_train_scans"),
                                  ("1pct", "train_1pct", "slidr_scene_1pct")):  # fmt: skip
    ft = regime.finetune_config(
      regime.data_config(tmp_path, {"variant": "tiny_wide"}, 13), paths,
      {"variant": "tiny_wide", "batch_size": 2.0, "clip_norm": 1.0}, fraction, 30, 50,
    )  # fmt: skip
    assert ft.optimizer.clip_norm == 1.0
    assert (ft.input.split, ft.subset, ft.input.buckets) == (split, subset, str(tmp_path / split))
    assert ft.checkpoint.init_from is None and ft.model.variant == "tiny_wide"
    assert (ft.num_epochs, ft.eval.every, ft.input.batch_size, ft.eval.batch_size) == (30, 50, 2, 2)


def test_a_teacher_setting_has_its_own_stores_and_the_same_world(regime, tmp_path):
  from reldistill_jax import pipeline

  study = regime.data_config(tmp_path, {}, 0)  # the study's own teacher
  assert dict(study.data.teacher) == {"confusion": 0.9, "noise": 0.8}
  default = regime.parse_setting("default:teacher_confusion=0.55,teacher_noise=0.35")[1]
  weak = regime.parse_setting("weak:teacher_confusion=1,teacher_noise=0.5")[1]
  paths = {
    name: pipeline.data_paths(regime.data_config(tmp_path, levers, 0), tmp_path)
    for name, levers in (("study", {}), ("default", default), ("weak", weak))
  }
  root = pathlib.Path(study.data.root)
  assert paths["default"]["features/val"] == root / "features" / "val"
  assert paths["weak"]["features/val"] == root / "teacher_confusion1_noise0.5" / "features" / "val"
  assert paths["study"]["features/val"].parent.parent.name == "teacher_confusion0.9_noise0.8"
  for name in paths:
    assert paths[name]["text"].parent == paths[name]["features/val"].parent.parent
    for key in ("world", "tfds", "buckets/train", "buckets/val"):  # one world, one voxelising
      assert paths[name][key] == paths["study"][key]


def test_a_finished_run_is_read_into_its_curve_and_step_time(regime, tmp_path):
  rows = [{"step": 10, "loss": 2.0, "step_time": 1.0, "compile_time": 9.0},
          {"step": 20, "loss": 1.5, "step_time": 3.0}, {"step": 20, "val_miou": 0.2},
          {"step": 30, "loss": 1.2, "step_time": 2.0}, {"step": 30, "val_miou": 0.25},
          {"step": 40, "loss": 1.1, "step_time": 2.5}, {"step": 40, "val_miou": 0.252}]  # fmt: skip
  (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  metrics = {"train_scans": 8, "fewshot": {"miou": 0.252, "per_class_iou": {"car": 0.5}}}
  (tmp_path / "metrics.json").write_text(json.dumps(metrics))
  summary = regime.run_summary(tmp_path, 40, None)
  assert summary["curve"] == [(20, 0.2), (30, 0.25), (40, 0.252)]
  assert summary["converged"] is True and summary["gain_last_quarter"] == pytest.approx(0.002)
  assert summary["seconds_per_step"] == 2.25  # the median of the step times, compilation apart
  assert summary["miou"] == 0.252 and summary["train_scans"] == 8
  assert summary["wall_seconds"] is None
