"""The loss study's tables and tests, from run rows (the runs themselves: notebook 03)."""

import dataclasses

import pytest

from reldistill_jax import errors, pipeline, runtime, study, study_report

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
    "preset": {"world": "", "seeds": (0, 1, 2), "steps": 600, "epochs": 40},
    "summary": summary,
    "teacher_ceiling": CEILING,
    "supervised_bound": 0.3,
    "tests": study.claims(rows, (0, 1, 2)),
    "ablations": study.ablation_tests(rows, (0, 1, 2)),
    "gap_study": {},
  }
  table = study_report.markdown(document)
  assert "ceiling): 57.00%" in table and "(the supervised bound): 30.00%" in table
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
  runtime.record_config(config, run)  # what run_default recorded
  (run / "metrics.json").write_text("{}")
  same = {"relational": {"chosen": {"lr": 1e-3}}}
  assert [r[:2] for r in study._runs(preset, tmp_path, "ptv3_base", same)] == [("relational", 0)]
  other = {"relational": {"chosen": {"lr": 4e-3}}}
  with pytest.raises(errors.ConfigError, match=r"pretrain\.optimizer\.lr: 0\.001 -> 0\.004"):
    list(study._runs(preset, tmp_path, "ptv3_base", other))
