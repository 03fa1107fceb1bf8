"""The loss study's tables and tests, from run rows (the runs themselves: notebook 03)."""

import dataclasses
import json

import pytest

from reldistill_jax import (
  curves,
  errors,
  pipeline,
  study,
  study_records,
  study_report,
  workdir_config,
)

CEILING = 0.57


def _rows():
  """Three losses x three seeds; relational beats contrastive by 2 points on every seed."""
  rows = []
  for seed, shift in enumerate((0.0, 0.01, -0.01)):
    for loss, zeroshot, fewshot in (
      ("relational", 0.20, 0.30), ("contrastive", 0.18, 0.31), ("similarity", 0.10, 0.25),
      ("relational_squared", 0.19, 0.30),
    ):  # fmt: skip
      rows.append({
        "loss": loss, "seed": seed, "steps": 600, "zeroshot_miou": zeroshot + shift,
        "zeroshot_miou_paired": zeroshot + shift + 0.01, "fewshot_miou": fewshot + 2 * shift,
        "fewshot_ood_miou": fewshot - 0.1 + (0.01 * seed if loss == "similarity" else 0.0),
        "G": 0.2, "converged": seed != 2, "gain_last_quarter": 0.001,
        "teacher_ceiling": CEILING, "final_loss": 1.0, "run": f"/r/{loss}_s{seed}",
        "zeroshot_classes": 2 if loss == "similarity" else 5 + seed, "teacher_classes": 14,
      })  # fmt: skip
  return rows


def test_claims_are_paired_tests_across_seeds():
  tests = study.claims(_rows(), (0, 1, 2))
  zeroshot, fewshot, ood = tests
  assert zeroshot["metric"] == "zeroshot_miou" and zeroshot["n"] == 3
  # The same 2-point lead on every seed: no variance, so no p-value, and the test says why.
  assert zeroshot["mean_difference"] == pytest.approx(0.02) and zeroshot["p_value"] is None
  assert fewshot["n"] == 3 and fewshot["p_value"] is None  # 5 points on every seed
  # Out of distribution: relational leads similarity by 5, 4 and 3 points.
  assert ood["metric"] == "fewshot_ood_miou" and ood["n"] == 3
  assert ood["mean_difference"] == pytest.approx(0.04) and ood["p_value"] < 0.05
  # The ablation is paired with the relational loss: 1 point below it on every seed.
  (ablation,) = study.ablation_tests(_rows(), (0, 1, 2))
  assert ablation["claim"] == "relational > relational_squared on zero-shot mIoU"
  assert ablation["mean_difference"] == pytest.approx(0.01) and ablation["n"] == 3


def test_claims_with_noise_give_a_p_value_and_a_verdict():
  rows = _rows()
  for row, noise in zip(
    [r for r in rows if r["loss"] == "contrastive"], (0.004, -0.003, 0.001), strict=True
  ):
    row["zeroshot_miou"] += noise
  zeroshot = study.claims(rows, (0, 1, 2))[0]
  assert 0 < zeroshot["p_value"] < 0.05 and zeroshot["holds"] is True
  assert zeroshot["ci95_difference"][0] < 0.02 < zeroshot["ci95_difference"][1]


def test_summary_and_markdown():
  rows = _rows()
  summary = study.summarise(rows, (*study.LOSSES, "relational_squared"))
  assert summary["relational"]["zeroshot_miou"]["mean"] == pytest.approx(0.20)
  assert summary["relational"]["zeroshot_miou"]["n"] == 3
  assert summary["similarity"]["converged"] == "2 of 3"
  document = {
    "preset": {"world": "", "scenes": 20, "seeds": (0, 1, 2), "steps": 600, "epochs": 40},
    "summary": summary,
    "teacher_ceiling": CEILING,
    "teacher_classes": 14,
    "recognised_iou": study.RECOGNISED_IOU,
    "supervised_bound": 0.3,
    "from_scratch_1pct": 0.12,
    "tests": study.claims(rows, (0, 1, 2)),
    "ablations": study.ablation_tests(rows, (0, 1, 2)),
    "gap_study": {
      "zeroshot_miou": {
        "n": 35,
        "pearson_r": 0.159,
        "pearson_p": 0.36,
        "spearman_rho": -0.394,
        "spearman_p": 0.0192,
      },
      "fewshot_miou": {
        "n": 2,
        "pearson_r": None,
        "spearman_rho": None,
        "note": "fewer than 3 runs",
      },
    },
  }
  table = study_report.markdown(document)
  assert table.startswith("Synthetic world (configs/default.py, 20 scenes), 3 seeds")
  assert (
    "- G against zeroshot_miou: Pearson r = 0.159 (p = 0.36), Spearman rho = -0.394 "
    "(p = 0.0192), n = 35." in table
  )
  assert "- G against fewshot_miou: fewer than 3 runs." in table
  assert "ceiling): 57.00% (14 classes recognised)" in table
  assert "(the supervised bound): 30.00%" in table and "IoU of at least 1% on" in table
  assert "From scratch on the 1% subset: 12.00%." in table
  # Classes recognised: relational 5, 6 and 7 over the seeds, similarity 2 on each.
  assert summary["relational"]["zeroshot_classes"]["mean"] == pytest.approx(6.0)
  assert "| 0.200 +- 0.000 [0.200, 0.200] | 6.0 | 2 of 3 |" in table
  assert "| 2.0 | 2 of 3 |" in table
  # relational on the paired points: 21% of a 57% ceiling.
  assert "| relational | 20.00 +- 1.00 [" in table and "| 37% |" in table
  assert "no test (the differences are all equal" in table
  assert "| relational_squared | 19.00 +- 1.00 [" in table
  assert "- relational > relational_squared on zero-shot mIoU: no test" in table


def test_sweep_candidates_and_their_settings(tmp_path):
  preset = study.PRESETS["full"]
  lrs = [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
  assert study.candidates(preset, "relational") == [{"lr": lr} for lr in lrs]
  assert study.candidates(preset, "contrastive") == [
    {"lr": lr, "temperature": t} for lr in lrs for t in (0.07, 0.2)
  ]
  config = study.run_config(
    preset, tmp_path, "contrastive", 3, "ptv3_base", {"lr": 4e-3, "temperature": 0.2}
  )
  pre = config.pretrain
  assert (pre.loss.name, pre.seed, config.finetune.seed) == ("contrastive", 3, 3)
  assert (pre.optimizer.lr, pre.loss.temperature) == (4e-3, 0.2)
  assert (pre.num_steps, pre.eval.every, config.finetune.num_epochs) == (400, 100, 20)
  assert pre.input.batch_size == pre.input.pack_size == 2
  assert (config.data.world.scenes, config.data.world.samples_per_scene) == (20, 8)
  assert config.data.parametrize and config.data.root == str(tmp_path / "data")
  # Without settings every loss keeps the default config's.
  plain = study.run_config(preset, tmp_path, "relational", 0, "ptv3_base")
  assert plain.pretrain.optimizer.lr == 2e-3
  # The regime: a less perfect teacher, with stores of its own; one camera a pretraining scan,
  # whole scans to fine-tune and evaluate.
  assert dict(config.data.teacher) == {"confusion": 0.9, "noise": 0.8}
  features = pipeline.data_paths(config, tmp_path)["features/train"]
  assert features == tmp_path / "data" / "teacher_confusion0.9_noise0.8" / "features" / "train"
  assert pre.input.cameras_per_scan == 1 and not config.finetune.input.get("cameras_per_scan")
  regime = study.regime(preset, tmp_path, "ptv3_base")
  assert regime["teacher"] == {"confusion": 0.9, "noise": 0.8} and regime["cameras_per_scan"] == 1
  assert regime["supervised_epochs"] == 60
  quick = study.run_config(study.PRESETS["quick"], tmp_path, "relational", 0, "ptv3_base")
  assert pipeline.teacher_folder(quick) == "" and quick.pretrain.input.cameras_per_scan == 0


def test_ablations_change_one_option_of_the_relational_loss(tmp_path):
  preset = study.PRESETS["full"]
  assert set(study.ABLATIONS) < set(preset.configs)
  base = study.run_config(preset, tmp_path, "relational", 0, "ptv3_base").pretrain.loss
  for name, (key, value) in {
    "relational_cross_only": ("w_intra", 0.0),
    "relational_intra_only": ("w_cross", 0.0),
    "relational_no_diagonal": ("diagonal", False),
    "relational_squared": ("distance", "squared"),
  }.items():
    loss = study.run_config(preset, tmp_path, name, 0, "ptv3_base", {"lr": 1e-3}).pretrain.loss
    differ = {k for k in base if loss[k] != base[k]}
    assert loss.name == "relational" and loss[key] == value and differ == {key}, name
  # The ablations take the relational loss's swept settings: only the three losses are swept.
  assert study.swept_losses(preset) == list(study.LOSSES)


def test_the_ood_world_is_another_layout_and_sensor_without_cameras(tmp_path):
  preset = study.PRESETS["quick"]
  ood = study.ood_config(preset, tmp_path, "ptv3_base")
  main = study.run_config(preset, tmp_path, "relational", 0, "ptv3_base")
  assert ood.data.root == str(tmp_path / "ood_data") != main.data.root
  assert (ood.data.world.sensor, ood.data.world.cameras) == ("hdl64", False)
  assert (main.data.world.sensor, main.data.world.cameras) == ("hdl32", True)
  assert ood.data.world.seed != main.data.world.seed
  assert ood.data.world.scenes == preset.ood_scenes and not ood.data.parametrize
  assert ood.data.voxel.to_dict() == main.data.voxel.to_dict()  # the same voxels and stages


def test_a_finished_run_of_other_settings_is_refused_not_reused(tmp_path):
  """A rerun after the sweep chose another learning rate must not reuse the old run."""
  preset = dataclasses.replace(
    study.PRESETS["quick"], configs=("relational",), seeds=(0,), ood_scenes=0
  )
  run = tmp_path / "relational_s0"
  config = study.run_config(preset, tmp_path, "relational", 0, "ptv3_base", {"lr": 1e-3})
  pipeline.complete_stages(config, run)
  workdir_config.record_config(config, run)  # what run_default recorded
  (run / "metrics.json").write_text("{}")
  same = {"relational": {"chosen": {"lr": 1e-3}}}
  assert [r[:2] for r in study._runs(preset, tmp_path, "ptv3_base", same)] == [("relational", 0)]
  other = {"relational": {"chosen": {"lr": 4e-3}}}
  with pytest.raises(errors.ConfigError, match=r"pretrain\.optimizer\.lr: 0\.001 -> 0\.004"):
    list(study._runs(preset, tmp_path, "ptv3_base", other))


def test_a_run_row_reads_the_run_and_counts_the_classes_it_recognises(tmp_path):
  """The row of a finished run, from its metrics.json and its OOD fine-tuning's."""
  iou = {"car": 0.35, "bus": 0.0099, "manmade": 0.81, "trailer": None, "terrain": 0.01}
  teacher = {"car": 0.6, "bus": 0.2, "manmade": 0.9, "trailer": None, "terrain": 0.005}
  metrics = {
    "zeroshot": {"miou": 0.14, "miou_paired": 0.15, "per_class_iou": iou},
    "zeroshot_teacher": {"miou": 0.61, "per_class_iou": teacher},
    "fewshot_1pct": {"miou": 0.16},
    "gap": {"G": 0.2},
    "pretrain": {
      "steps": 400, "final_loss": 0.53,
      "convergence": {"converged": True, "gain_last_quarter": 0.0002},
    },
  }  # fmt: skip
  run = tmp_path / "relational_s3"
  (run / "fewshot_ood").mkdir(parents=True)
  (run / "metrics.json").write_text(json.dumps(metrics))
  row = study.run_row(run, "relational", 3)
  assert row["fewshot_ood_miou"] is None  # not fine-tuned out of distribution yet
  (run / "fewshot_ood" / "metrics.json").write_text(json.dumps({"fewshot": {"miou": 0.12}}))
  row = study.run_row(run, "relational", 3)
  assert row == {
    "loss": "relational", "seed": 3, "steps": 400, "zeroshot_miou": 0.14,
    "zeroshot_miou_paired": 0.15, "fewshot_miou": 0.16, "fewshot_ood_miou": 0.12, "G": 0.2,
    "converged": True, "gain_last_quarter": 0.0002, "teacher_ceiling": 0.61, "final_loss": 0.53,
    # car, manmade and terrain reach 1%; bus stops just short; trailer has no points.
    "zeroshot_classes": 3, "teacher_classes": 3, "run": str(run),
  }  # fmt: skip


def _finished_trial(tmp_path, steps: int):
  """A sweep trial of the quick preset in tmp_path/sweep/t, its history logged to `steps`."""
  preset = study.PRESETS["quick"]
  pre = study.run_config(preset, tmp_path, "relational", 0, "ptv3_base", {"lr": 2e-3}).pretrain
  pre.num_steps = pre.eval.every = preset.sweep_steps
  run = tmp_path / "sweep" / "t"
  workdir_config.record_config(pre, run)
  history = [{"step": s, "loss": 1.0 / s} for s in range(1, steps + 1)]
  history[-1][curves.KEY] = 0.1
  (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
  return pre, run, history


def test_a_sweep_trial_is_reused_from_its_history_once_its_last_evaluation_is_logged(tmp_path):
  steps = study.PRESETS["quick"].sweep_steps
  pre, run, history = _finished_trial(tmp_path, steps)
  assert study._trial_history(pre, run) == history  # no checkpoint needed
  (run / "history.jsonl").write_text(json.dumps(history[0] | {curves.KEY: 0.1}) + "\n")
  assert study._trial_history(pre, run) is None  # stopped before its last step
  _finished_trial(tmp_path, steps)
  pre.optimizer.lr = 4e-3  # the sweep's candidates changed
  with pytest.raises(errors.ConfigError, match=r"optimizer\.lr: 0\.002 -> 0\.004"):
    study._trial_history(pre, run)


def test_records_keep_the_small_files_of_a_unit_and_restore_what_a_workdir_lacks(tmp_path):
  workdir, records = tmp_path / "study", tmp_path / "records"
  _, run, _ = _finished_trial(workdir, 4)
  (run / "checkpoints" / "4").mkdir(parents=True)
  (run / "checkpoints" / "4" / "manifest.ocdbt").write_bytes(b"\0" * 64)
  (run / "fewshot_ood").mkdir()
  (run / "fewshot_ood" / "metrics.json").write_text('{"fewshot": {"miou": 0.12}}')
  study_records.keep_records(workdir, run, records)
  kept = sorted(str(p.relative_to(records)) for p in records.rglob("*") if p.is_file())
  assert kept == [
    "sweep/t/config.json", "sweep/t/fewshot_ood/metrics.json", "sweep/t/history.jsonl"
  ]  # fmt: skip
  stamps = {p: p.stat().st_mtime_ns for p in records.rglob("*") if p.is_file()}
  study_records.keep_records(
    workdir, run, records
  )  # the same contents again: nothing refused or rewritten
  assert {p: p.stat().st_mtime_ns for p in records.rglob("*") if p.is_file()} == stamps
  fresh = tmp_path / "fresh"
  assert study_records.restore_records(records, fresh) == 3
  for name in kept:
    assert (fresh / name).read_bytes() == (workdir / name).read_bytes()
  assert study_records.restore_records(records, fresh) == 0  # nothing lacking, nothing overwritten
  assert study_records.restore_records(None, fresh) == 0
  (run / "history.jsonl").write_text("{}\n")  # the unit run again, differently
  with pytest.raises(errors.DataError, match=r"records/sweep/t/history\.jsonl differs from"):
    study_records.keep_records(workdir, run, records)
  assert (records / "sweep/t/history.jsonl").read_bytes() == (
    fresh / "sweep/t/history.jsonl"
  ).read_bytes()
