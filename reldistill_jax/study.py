r"""The loss study on the synthetic world: every loss x seeds, against the teacher's ceiling.

  python -m reldistill_jax.study --workdir DIR [--preset quick|full] [--out FILE]
      [--model ptv3_base] [--losses relational,contrastive,similarity] [--seeds 0,1,2]
      [--pretrain_steps N] [--finetune_epochs N]

Each run is the embedded default (configs/default.py) with the loss, the seed
(pretraining and fine-tuning), the preset's pretraining steps and its zero-shot
curve (`curves.py`), in `<workdir>/<loss>_s<seed>`, all on one shared synthetic
world (`<workdir>/data`); finished runs are reused when the study is restarted.
First each loss gets its learning rate (and the contrastive loss its
temperature) from a small sweep on held-out training scenes (SLidR's
parametrize protocol: pretrain on `train_parametrize`, score zero-shot on
`train_verify`; `sweep`); then every loss runs with its own settings and the
same student, data, augmentations and steps. Presets (`PRESETS`): `quick` is
what the tests run (13 one-keyframe scenes, 2 seeds, 8 steps, a 2-point
sweep); `full` is the study (20 scenes of 8 keyframes, 5 seeds, 600 steps, a
sweep of 3 learning rates and 2 temperatures). The flags after `--preset`
override it.

Writes `--out` (default `<workdir>/loss_study.json`):
  sweep            per loss, every candidate's zero-shot mIoU on train_verify
                   and the settings chosen;
  runs             one row per run: loss, seed, steps, zeroshot_miou (every
                   point), zeroshot_miou_paired (the paired points),
                   fewshot_miou (1%), G, converged (`curves.convergence`),
                   gain_last_quarter, teacher_ceiling, final_loss;
  summary          per loss and metric: mean, std, 95% t interval, n
                   (`stats.summary`);
  teacher_ceiling  the teacher's own zero-shot mIoU at the paired points of the
                   validation scans (the same world for every run);
  tests            the paper's claims as one-sided paired t-tests across
                   seeds (`stats.paired_test`), whichever way they fall;
  gap_study        G against each mIoU over all runs, with n;
and `<workdir>/study.md` (the table), `<workdir>/plots/study_curves.png`
(zero-shot mIoU against steps per loss, with the ceiling) and
`study_bars.png` (each loss against the ceiling), `<workdir>/gap/` (the gap
study's report and scatter plot).
"""

import dataclasses
import datetime
import json
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from configs import common
from configs import default as default_config
from configs import gap as gap_config
from reldistill_jax import (
  cli,
  curves,
  evaluation_runs,
  files,
  hardware,
  pipeline,
  report,
  stats,
  train,
)

LOSSES = ("relational", "contrastive", "similarity")
METRICS = ("zeroshot_miou", "zeroshot_miou_paired", "fewshot_miou", "G")


@dataclasses.dataclass(frozen=True)
class Preset:
  """A study's size.

  Attributes:
    world: the argument of configs/default.py for the world and the training
      sizes ("runlocal": a 3-scene world and small batches; "": the default).
    scenes: scenes of the world instead of the world argument's (0: keep).
    samples_per_scene: keyframes per scene likewise (0: keep).
    losses: the losses compared.
    seeds: one run per loss and seed; runs with the same seed pair up.
    steps: pretraining steps of every run.
    eval_every: steps between two points of the zero-shot curve.
    epochs: epochs of 1% fine-tuning.
    sweep_steps: pretraining steps of each sweep run (0: no sweep; every loss
      keeps the default config's learning rate and temperature).
    sweep_lrs: learning rates tried for every loss.
    sweep_temperatures: temperatures tried for the contrastive loss.
  """

  world: str
  losses: tuple[str, ...]
  seeds: tuple[int, ...]
  steps: int
  eval_every: int
  epochs: int
  scenes: int = 0
  samples_per_scene: int = 0
  sweep_steps: int = 0
  sweep_lrs: tuple[float, ...] = ()
  sweep_temperatures: tuple[float, ...] = ()


PRESETS = {
  # 13 scenes of one keyframe: the smallest world with a held-out training scene.
  "quick": Preset(
    "runlocal", LOSSES, (0, 1), steps=8, eval_every=4, epochs=4, scenes=13,
    samples_per_scene=1, sweep_steps=4, sweep_lrs=(1e-3, 2e-3), sweep_temperatures=(0.07,),
  ),
  "full": Preset(
    "", LOSSES, (0, 1, 2, 3, 4), steps=600, eval_every=50, epochs=40, scenes=20,
    sweep_steps=150, sweep_lrs=(1e-3, 2e-3, 4e-3), sweep_temperatures=(0.07, 0.2),
  ),
}  # fmt: skip

# The claims of the paper, as (claim, metric, better loss, other loss).
CLAIMS = (
  ("relational > contrastive on zero-shot mIoU", "zeroshot_miou", "relational", "contrastive"),
  (
    "relational > similarity on 1% few-shot mIoU, in distribution",
    "fewshot_miou",
    "relational",
    "similarity",
  ),
)
OOD_CLAIM = "relational > similarity on 1% few-shot mIoU, out of distribution"
OOD_NOTE = (
  "not run: there is no synthetic out-of-distribution target yet (a second world with "
  "another sensor)"
)


def run_config(
  preset: Preset, workdir: pathlib.Path, loss: str, seed: int, model: str, settings=None
):
  """The configs/default.py config of one run of the study, with the loss's `settings`
  ({"lr": ..., "temperature": ...}, from the sweep)."""
  arg = ",".join(a for a in (preset.world, f"model={model}") if a)
  config = default_config.get_config(arg)
  config.data.root = str(workdir / "data")
  config.data.world.scenes = preset.scenes or config.data.world.scenes
  config.data.world.samples_per_scene = (
    preset.samples_per_scene or config.data.world.samples_per_scene
  )
  config.data.parametrize = bool(preset.sweep_steps)
  pre, ft = config.pretrain, config.finetune
  pre.loss.name = loss
  pre.seed = ft.seed = seed
  pre.num_steps = preset.steps
  pre.eval.every = preset.eval_every
  pre.checkpoint.every = max(preset.eval_every, pre.checkpoint.every)
  for key, value in (settings or {}).items():
    (pre.optimizer if key == "lr" else pre.loss)[key] = value
  ft.num_epochs = preset.epochs
  return config


def candidates(preset: Preset, loss: str) -> list[dict]:
  """The settings the sweep tries for `loss`."""
  temperatures = preset.sweep_temperatures if loss == "contrastive" else ()
  if not temperatures:
    return [{"lr": lr} for lr in preset.sweep_lrs]
  return [{"lr": lr, "temperature": t} for lr in preset.sweep_lrs for t in temperatures]


def sweep(preset: Preset, workdir: pathlib.Path, model: str) -> dict:
  """Per loss, the settings whose student scores best zero-shot on held-out training scenes.

  SLidR's parametrize protocol on the synthetic world: each candidate
  pretrains on `train_parametrize` for `sweep_steps` (seed 0) and is scored by
  its zero-shot mIoU on `train_verify`; the validation scans are not seen.

  Returns:
    {loss: {"chosen": settings, "trials": [{"settings", "verify_zeroshot_miou", "run"}]}};
    {} without a sweep.
  """
  if not preset.sweep_steps:
    return {}
  paths = pipeline.prepare_synthetic_data(run_config(preset, workdir, LOSSES[0], 0, model), workdir)
  results = {}
  for loss in preset.losses:
    trials = []
    for settings in candidates(preset, loss):
      run = workdir / "sweep" / (loss + "".join(f"_{k}{v:g}" for k, v in settings.items()))
      pre = run_config(preset, workdir, loss, 0, model, settings).pretrain
      pre.input.buckets = str(paths["buckets/train_parametrize"])
      pre.input.features = str(paths["features/train_parametrize"])
      pre.eval.val_buckets = str(paths["buckets/train_verify"])
      pre.eval.val_features = str(paths["features/train_verify"])
      pre.eval.text_embeddings = str(paths["text"])
      pre.num_steps = pre.eval.every = preset.sweep_steps
      pre.checkpoint.every = preset.sweep_steps
      history = train.train_and_evaluate(pre, run)["history"]
      score = curves.curve(history)[-1][1]
      trials.append({"settings": settings, "verify_zeroshot_miou": score, "run": str(run)})
    best = max(trials, key=lambda t: np.nan_to_num(t["verify_zeroshot_miou"], nan=-1.0))
    results[loss] = {"chosen": best["settings"], "trials": trials}
  return results


def run_row(run: pathlib.Path, loss: str, seed: int) -> dict:
  """The study's row of a finished run, from its metrics.json."""
  metrics = json.loads((run / "metrics.json").read_text())
  pre = metrics["pretrain"]
  return {
    "loss": loss,
    "seed": seed,
    "steps": pre["steps"],
    "zeroshot_miou": metrics["zeroshot"]["miou"],
    "zeroshot_miou_paired": metrics["zeroshot"]["miou_paired"],
    "fewshot_miou": metrics["fewshot_1pct"]["miou"],
    "G": metrics["gap"]["G"],
    "converged": pre["convergence"]["converged"],
    "gain_last_quarter": pre["convergence"]["gain_last_quarter"],
    "teacher_ceiling": metrics["zeroshot_teacher"]["miou"],
    "final_loss": pre["final_loss"],
    "run": str(run),
  }


def claims(rows: Sequence[dict], seeds: Sequence[int]) -> list[dict]:
  """The paired tests of `CLAIMS` (runs paired by seed), and the OOD claim's note."""
  value = {(r["loss"], r["seed"], m): r[m] for r in rows for m in METRICS}
  tests = []
  for claim, metric, better, other in CLAIMS:
    a = [value.get((better, s, metric)) for s in seeds]
    b = [value.get((other, s, metric)) for s in seeds]
    tests.append(stats.paired_test(a, b, claim) | {"metric": metric})
  tests.append({"claim": OOD_CLAIM, "n": 0, "p_value": None, "holds": None, "note": OOD_NOTE})
  return tests


def summarise(rows: Sequence[dict], losses: Sequence[str]) -> dict:
  """{loss: {metric: stats.summary, "converged": "k of n"}}."""
  summary = {}
  for loss in losses:
    mine = [r for r in rows if r["loss"] == loss]
    summary[loss] = {m: stats.summary([r[m] for r in mine]) for m in METRICS}
    summary[loss]["converged"] = f"{sum(r['converged'] is True for r in mine)} of {len(mine)}"
  return summary


def run_study(
  workdir: str | pathlib.Path, preset: Preset, model: str = "ptv3_base", out=None
) -> dict:
  """Runs every (loss, seed) of `preset` and writes the study (module docstring)."""
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  swept = sweep(preset, workdir, model)
  rows, histories = [], {}
  for loss in preset.losses:
    settings = swept.get(loss, {}).get("chosen")
    for seed in preset.seeds:
      run = workdir / f"{loss}_s{seed}"
      if not (run / "metrics.json").is_file():
        pipeline.run_default(run_config(preset, workdir, loss, seed, model, settings), run)
      rows.append(run_row(run, loss, seed))
      histories[(loss, seed)] = json.loads((run / "metrics.json").read_text())["pretrain"]["curve"]
  ceilings = {r["teacher_ceiling"] for r in rows}
  if len(ceilings) != 1:
    raise ValueError(f"the runs of one world give different teacher ceilings: {sorted(ceilings)}")
  gap = gap_config.get_config()
  gap.runs = ",".join(r["run"] for r in rows)
  gap_rows = evaluation_runs.run_gap(gap, workdir / "gap")["gap_study"]
  study = {
    "preset": dataclasses.asdict(preset),
    "model": model,
    "runs": rows,
    "sweep": swept,
    "summary": summarise(rows, preset.losses),
    "teacher_ceiling": ceilings.pop(),
    "tests": claims(rows, preset.seeds),
    "gap_study": gap_rows,
    "machine": hardware.machine(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["python -m reldistill_jax.study", *sys.argv[1:]]),
    "wall_seconds_this_invocation": time.perf_counter() - start,
  }
  out = pathlib.Path(out or workdir / "loss_study.json")
  files.atomic_write(out, json.dumps(report.to_jsonable(study), indent=2))
  files.atomic_write(workdir / "study.md", markdown(study))
  plot_curves(histories, study["teacher_ceiling"], workdir / "plots" / "study_curves.png")
  plot_bars(study, workdir / "plots" / "study_bars.png")
  return study


def _cell(s: dict, scale: float) -> str:
  if s["mean"] is None:
    return "n/a"
  if s["ci95"] is None:
    return f"{scale * s['mean']:.2f}"
  low, high = (scale * v for v in s["ci95"])
  return f"{scale * s['mean']:.2f} +- {scale * s['std']:.2f} [{low:.2f}, {high:.2f}]"


def _world(preset: dict) -> str:
  """The world and sizes of a preset, in words."""
  size = f"configs/default.py:{preset['world']}" if preset["world"] else "configs/default.py"
  if preset.get("scenes"):
    keyframes = preset.get("samples_per_scene") or "default"
    size += f", {preset['scenes']} scenes of {keyframes} keyframe(s)"
  return size


def _settings(settings: dict) -> str:
  return ", ".join(f"{k} {v:g}" for k, v in settings.items())


def markdown(study: dict) -> str:
  """The study's table (mean +- std [95% t interval]) and its tests."""
  preset = study["preset"]
  ceiling = 100 * study["teacher_ceiling"]
  lines = [
    f"Synthetic world ({_world(preset)}), {len(preset['seeds'])} seeds per loss, "
    f"{preset['steps']} pretraining steps, {preset['epochs']} epochs of 1% fine-tuning; "
    "mean +- std [95% t interval]. Teacher's zero-shot mIoU at the paired points (the "
    f"ceiling): {ceiling:.2f}%.",
    "",
    "| loss | zero-shot mIoU (%) | on the paired points (%) | share of the ceiling | "
    "1% few-shot mIoU (%) | G | converged |",
    "|---|---|---|---|---|---|---|",
  ]
  for loss, s in study["summary"].items():
    paired = s["zeroshot_miou_paired"]["mean"]
    share = "n/a" if paired is None else f"{100 * paired / study['teacher_ceiling']:.0f}%"
    lines.append(
      f"| {loss} | {_cell(s['zeroshot_miou'], 100)} | {_cell(s['zeroshot_miou_paired'], 100)} | "
      f"{share} | {_cell(s['fewshot_miou'], 100)} | {_cell(s['G'], 1)} | {s['converged']} |"
    )
  lines.append("")
  for loss, result in study.get("sweep", {}).items():
    tried = ", ".join(
      f"{_settings(t['settings'])}: {100 * t['verify_zeroshot_miou']:.2f}%"
      for t in result["trials"]
    )
    lines.append(f"- {loss}: {_settings(result['chosen'])} chosen on train_verify ({tried}).")
  for test in study["tests"]:
    if test["p_value"] is None:
      lines.append(f"- {test['claim']}: no test ({test['note']}).")
      continue
    low, high = (100 * v for v in test["ci95_difference"])
    verdict = "holds" if test["holds"] else "not supported"
    lines.append(
      f"- {test['claim']}: {verdict} (paired t-test over {test['n']} seeds, one-sided p = "
      f"{test['p_value']:.3g}; mean difference {100 * test['mean_difference']:.2f} points, "
      f"95% interval [{low:.2f}, {high:.2f}])."
    )
  for target, result in study["gap_study"].items():
    rho = result["spearman_rho"]
    lines.append(
      f"- G against {target}: Spearman rho = {rho:.3f} (p = {result['spearman_p']:.3g}), "
      f"n = {result['n']}."
      if np.isfinite(rho)
      else f"- G against {target}: {result['note']}."
    )
  return "\n".join(lines) + "\n"


def plot_curves(histories: dict, ceiling: float, path) -> pathlib.Path:
  """Zero-shot mIoU against steps, one line per loss (mean over seeds, seeds faint)."""
  fig = report.figure(7.0, 4.2)
  ax = fig.subplots()
  losses = list(dict.fromkeys(loss for loss, _ in histories))
  for i, loss in enumerate(losses):
    colour = f"C{i}"
    runs = [np.array(c[curves.KEY], float) for (name, _), c in histories.items() if name == loss]
    for r in runs:
      ax.plot(r[:, 0], 100 * r[:, 1], color=colour, alpha=0.25, lw=0.8)
    if all(len(r) == len(runs[0]) for r in runs):
      ax.plot(runs[0][:, 0], 100 * np.mean([r[:, 1] for r in runs], 0), color=colour, label=loss)
  ax.axhline(100 * ceiling, color="k", ls="--", lw=1, label="teacher (ceiling, paired points)")
  ax.set(xlabel="pretraining step", ylabel="zero-shot mIoU (%)", title="Zero-shot mIoU per loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return report.save_figure(fig, path)


def plot_bars(study: dict, path) -> pathlib.Path:
  """Zero-shot mIoU on the paired points per loss (mean and 95% interval) against the ceiling."""
  fig = report.figure(6.0, 4.0)
  ax = fig.subplots()
  names = list(study["summary"])
  means = [100 * (study["summary"][n]["zeroshot_miou_paired"]["mean"] or 0) for n in names]
  errors = [
    [m - 100 * ci[0], 100 * ci[1] - m] if (ci := study["summary"][n]["zeroshot_miou_paired"]["ci95"])
    else [0, 0]
    for m, n in zip(means, names, strict=True)
  ]  # fmt: skip
  ax.bar(
    names, means, yerr=np.array(errors).T, capsize=4, color=[f"C{i}" for i in range(len(names))]
  )
  ax.axhline(100 * study["teacher_ceiling"], color="k", ls="--", lw=1, label="teacher (ceiling)")
  ax.set(ylabel="zero-shot mIoU on the paired points (%)", title="Students against the ceiling")
  ax.legend(fontsize=8)
  return report.save_figure(fig, path)


_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the study.")
_PRESET = flags.DEFINE_enum("preset", "full", list(PRESETS), "The study's size (PRESETS).")
_OUT = flags.DEFINE_string("out", None, "The study's JSON (default <workdir>/loss_study.json).")
_MODEL = flags.DEFINE_enum(
  "model", "ptv3_base", list(common.MODELS),
  "The student (configs/default.py model=; ptv3 runs its tiny variant).",
)  # fmt: skip
_LOSSES = flags.DEFINE_list("losses", None, "Override the preset's losses.")
_SEEDS = flags.DEFINE_list("seeds", None, "Override the preset's seeds.")
_STEPS = flags.DEFINE_integer("pretrain_steps", None, "Override the preset's steps.")
_EPOCHS = flags.DEFINE_integer("finetune_epochs", None, "Override the preset's epochs.")


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  preset = PRESETS[_PRESET.value]
  overrides = {
    "losses": tuple(_LOSSES.value) if _LOSSES.value else None,
    "seeds": tuple(int(s) for s in _SEEDS.value) if _SEEDS.value else None,
    "steps": _STEPS.value,
    "epochs": _EPOCHS.value,
  }
  preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
  study = run_study(_WORKDIR.value, preset, _MODEL.value, _OUT.value)
  print(markdown(study))


if __name__ == "__main__":
  cli.run(main)
