r"""The loss study on the synthetic world: every loss x seeds, against the teacher's ceiling.

  python -m reldistill_jax.study --workdir DIR [--preset quick|full] [--out FILE]
      [--model ptv3_base] [--configs relational,contrastive,...] [--seeds 0,1,2]
      [--pretrain_steps N] [--finetune_epochs N] [--records DIR]

A configuration (`CONFIGS`) is a loss, or an ablation of the relational loss
(one term or option changed). Each run is the embedded default
(configs/default.py) with the configuration, the seed (pretraining and
fine-tuning), the preset's student, batch, pretraining steps and zero-shot
curve (`curves.py`), in `<workdir>/<configuration>_s<seed>`, all on one shared
synthetic world (`<workdir>/data`); finished runs (and finished stages of a
run) are reused when the study is restarted. First each loss gets its learning
rate (and the contrastive loss its temperature) from a small sweep on held-out
training scenes (SLidR's parametrize protocol: pretrain on
`train_parametrize`, score zero-shot on `train_verify`; `sweep`); the
ablations take the relational loss's settings. Then every configuration runs
with the same student, data, augmentations and steps. The out-of-distribution
target (`ood_config`) is a second world of another layout seen through another
sensor, a 64-beam lidar without cameras, the synthetic stand-in for
SemanticKITTI: each pretrained student is also fine-tuned on its 1% and
scored on its validation scans. Presets (`PRESETS`): `quick` is what the tests
run; `full` is the study. The flags after `--preset` override it.

`--records DIR` keeps what the study reads of every finished unit (a sweep
trial, the two from-scratch baselines, a run with its OOD fine-tuning: their
`study_records.RECORD_FILES`, a few kB each, no checkpoints) in DIR, in the
workdir's layout.
A study restarted on another machine, in a fresh workdir at the same path,
copies them back first and reuses those units, their configs checked as a
restart's are: a study longer than one machine's lease finishes over several.

Writes `--out` (default `<workdir>/loss_study.json`):
  sweep            per loss, every candidate's zero-shot mIoU on train_verify
                   and the settings chosen;
  runs             one row per run: loss (the configuration), seed, steps,
                   zeroshot_miou (every point), zeroshot_miou_paired (the
                   paired points), fewshot_miou (1%), fewshot_ood_miou (1% of
                   the OOD world), G, converged (`curves.convergence`),
                   gain_last_quarter, teacher_ceiling, final_loss,
                   zeroshot_classes and teacher_classes (how many classes
                   each reaches an IoU of at least 1% on, zero-shot:
                   `recognised_classes`);
  summary          per configuration and metric: mean, std, 95% t interval, n
                   (`stats.summary`);
  teacher_ceiling  the teacher's own zero-shot mIoU at the paired points of the
                   validation scans (the same world for every run);
  teacher_classes  how many classes the teacher recognises there;
  recognised_iou   the IoU from which a class counts as recognised;
  supervised_bound the same student fine-tuned from scratch on every labelled
                   training scan, mIoU on every validation point (what its
                   input and size allow with all labels), per class, and
                   whether its validation curve converged (`curves.convergence`);
  from_scratch_1pct  the same student fine-tuned from scratch on the 1% subset
                   with the few-shot recipe: the baseline each pretraining's
                   `fewshot_miou` is to beat, and per class;
  regime           the settings that place the study (world, voxels, teacher,
                   pretraining crop, student, batch, steps, epochs);
  tests            the paper's claims as one-sided paired t-tests across
                   seeds (`stats.paired_test`), whichever way they fall;
  ablations        the relational loss against each of its ablations, the same
                   tests on zero-shot mIoU;
  gap_study        G against each mIoU over all runs, with n;
and `<workdir>/study.md` (the table), `<workdir>/plots/study_curves.png`
(zero-shot mIoU against steps per configuration, with the ceiling) and
`study_bars.png` (each against the ceiling), `<workdir>/gap/` (the gap
study's report and scatter plot). The runs keep their compiled programs in
`<workdir>/xla_cache` (`runtime.use_compilation_cache`), so each compiles what
the first one did in a fraction of the time.
"""

import copy
import dataclasses
import datetime
import json
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from configs import common
from configs import default as default_config
from configs import gap as gap_config
from reldistill_jax import (
  cli,
  curves,
  evaluation_runs,
  files,
  finetune,
  hardware,
  metrics_writer,
  pipeline,
  report,
  runtime,
  stats,
  study_records,
  study_report,
  train,
  workdir_config,
  workdir_lock,
)

LOSSES = ("relational", "contrastive", "similarity")
# name -> (loss, settings of `config.pretrain.loss` beyond the default's). The
# ablations change one thing of the relational loss each.
CONFIGS = {
  "relational": ("relational", {}),
  "contrastive": ("contrastive", {}),
  "similarity": ("similarity", {}),
  "relational_cross_only": ("relational", {"w_intra": 0.0}),
  "relational_intra_only": ("relational", {"w_cross": 0.0}),
  "relational_no_diagonal": ("relational", {"diagonal": False}),
  "relational_squared": ("relational", {"distance": "squared"}),
}
ABLATIONS = tuple(name for name in CONFIGS if name not in LOSSES)
METRICS = (
  "zeroshot_miou", "zeroshot_miou_paired", "fewshot_miou", "fewshot_ood_miou", "G",
  "zeroshot_classes",
)  # fmt: skip
# A class counts as recognised zero-shot from this IoU on: a student that
# separates only the dominant classes shows it where its mIoU alone does not.
RECOGNISED_IOU = 0.01
# The out-of-distribution world: another layout, a 64-beam lidar, no cameras.
OOD_WORLD = {"seed": 1, "sensor": "hdl64", "cameras": False}


@dataclasses.dataclass(frozen=True)
class Preset:
  """A study's size.

  Attributes:
    world: the argument of configs/default.py for the world and the training
      sizes ("runlocal": a 3-scene world and small batches; "": the default).
    configs: the configurations compared (`CONFIGS` names).
    seeds: one run per configuration and seed; runs with the same seed pair up.
    steps: pretraining steps of every run.
    eval_every: steps between two points of the zero-shot curve.
    epochs: epochs of 1% fine-tuning (in and out of distribution).
    scenes: scenes of the world instead of the world argument's (0: keep).
    samples_per_scene: keyframes per scene likewise (0: keep).
    variant: the attention student's variant (`point_encoder.VARIANTS`; "":
      the world argument's); a MinkUNet keeps its own.
    batch_size: scans per pretraining step (0: the world argument's).
    sweep_steps: pretraining steps of each sweep run (0: no sweep; every loss
      keeps the default config's learning rate and temperature).
    sweep_lrs: learning rates tried for every loss.
    sweep_temperatures: temperatures tried for the contrastive loss.
    ood_scenes: scenes of the out-of-distribution world (0: no OOD target).
    ood_samples_per_scene: its keyframes per scene.
    supervised_epochs: epochs of the supervised bound (0: none), the
      student trained from scratch on every labelled training scan.
    teacher: the synthetic teacher's imperfection, (name, value) pairs over
      `config.data.teacher` (empty: the default teacher).
    cameras_per_scan: pretraining on the frustum of that many cameras a scan
      (`config.input.cameras_per_scan`; 0: whole scans).
  """

  world: str
  configs: tuple[str, ...]
  seeds: tuple[int, ...]
  steps: int
  eval_every: int
  epochs: int
  scenes: int = 0
  samples_per_scene: int = 0
  variant: str = ""
  batch_size: int = 0
  sweep_steps: int = 0
  sweep_lrs: tuple[float, ...] = ()
  sweep_temperatures: tuple[float, ...] = ()
  ood_scenes: int = 0
  ood_samples_per_scene: int = 0
  supervised_epochs: int = 0
  teacher: tuple[tuple[str, float], ...] = ()
  cameras_per_scan: int = 0


PRESETS = {
  # 13 scenes of one keyframe: the smallest world with a held-out training scene; the
  # three losses and one ablation, a sweep of the contrastive temperature only; 2 scans a
  # step, as the full study.
  "quick": Preset(
    "runlocal", (*LOSSES, "relational_squared"), (0, 1), steps=8, eval_every=4, epochs=2,
    scenes=13, samples_per_scene=1, batch_size=2, sweep_steps=4, sweep_lrs=(2e-3,),
    sweep_temperatures=(0.07, 0.2), ood_scenes=3, ood_samples_per_scene=1, supervised_epochs=2,
  ),
  # The study on 2 CPU cores: the tiny student (a wider one costs 5x a step), 2 scans a step;
  # learning rates over a factor of 32; an OOD world of 15 scenes holds 3 of them (12 scans) out.
  # Its regime (BENCHMARKS.md): a teacher whose ceiling (32%) is under the student's bound
  # (35%, 60 epochs, flat once the rate reaches 0), and ScaLR's one camera a scan, 2.7x cheaper
  # a pretraining step.
  "full": Preset(
    "", tuple(CONFIGS), (0, 1, 2, 3, 4), steps=400, eval_every=100, epochs=20, scenes=20,
    batch_size=2, sweep_steps=100, sweep_lrs=(5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    sweep_temperatures=(0.07, 0.2), ood_scenes=15, ood_samples_per_scene=4, supervised_epochs=60,
    teacher=(("confusion", 0.9), ("noise", 0.8)), cameras_per_scan=1,
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
  (
    "relational > similarity on 1% few-shot mIoU, out of distribution",
    "fewshot_ood_miou",
    "relational",
    "similarity",
  ),
)


def run_config(
  preset: Preset, workdir: pathlib.Path, name: str, seed: int, model: str, settings=None
):
  """The configs/default.py config of one run of the study: configuration `name`, with
  the loss's `settings` ({"lr": ..., "temperature": ...}, from the sweep)."""
  arg = ",".join(a for a in (preset.world, f"model={model}") if a)
  config = default_config.get_config(arg)
  config.data.root = str(workdir / "data")
  config.data.world.scenes = preset.scenes or config.data.world.scenes
  config.data.world.samples_per_scene = (
    preset.samples_per_scene or config.data.world.samples_per_scene
  )
  config.data.parametrize = bool(preset.sweep_steps)
  config.data.teacher.update(dict(preset.teacher))
  pre, ft = config.pretrain, config.finetune
  pre.input.cameras_per_scan = preset.cameras_per_scan
  loss, options = CONFIGS[name]
  pre.loss.name = loss
  for key, value in options.items():
    pre.loss[key] = value
  pre.seed = ft.seed = seed
  pre.num_steps = preset.steps
  pre.eval.every = preset.eval_every
  pre.checkpoint.every = max(preset.eval_every, pre.checkpoint.every)
  if preset.variant and pre.model.name == "point_encoder":
    pre.model.variant = ft.model.variant = preset.variant
  if preset.batch_size:
    pre.input.batch_size = pre.input.pack_size = preset.batch_size
  for key, value in (settings or {}).items():
    (pre.optimizer if key == "lr" else pre.loss)[key] = value
  ft.num_epochs = preset.epochs
  return config


def ood_config(preset: Preset, workdir: pathlib.Path, model: str):
  """The configs/default.py config of the out-of-distribution world (`OOD_WORLD`)."""
  config = run_config(preset, workdir, LOSSES[0], 0, model)
  config.data.root = str(workdir / "ood_data")
  config.data.parametrize = False
  config.data.world.scenes = preset.ood_scenes
  config.data.world.samples_per_scene = preset.ood_samples_per_scene
  config.data.world.update(OOD_WORLD)
  return config


def candidates(preset: Preset, loss: str) -> list[dict]:
  """The settings the sweep tries for `loss`."""
  temperatures = preset.sweep_temperatures if loss == "contrastive" else ()
  if not temperatures:
    return [{"lr": lr} for lr in preset.sweep_lrs]
  return [{"lr": lr, "temperature": t} for lr in preset.sweep_lrs for t in temperatures]


def swept_losses(preset: Preset) -> list[str]:
  """The losses of the preset's configurations, in `LOSSES` order."""
  used = {CONFIGS[name][0] for name in preset.configs}
  return [loss for loss in LOSSES if loss in used]


def sweep(preset: Preset, workdir: pathlib.Path, model: str, records=None) -> dict:
  """Per loss, the settings whose student scores best zero-shot on held-out training scenes.

  SLidR's parametrize protocol on the synthetic world: each candidate
  pretrains on `train_parametrize` for `sweep_steps` (seed 0) and is scored by
  its zero-shot mIoU on `train_verify`; the validation scans are not seen.
  A trial whose history holds its last evaluation is reused (`_trial_history`).

  Returns:
    {loss: {"chosen": settings, "trials": [{"settings", "verify_zeroshot_miou", "run"}]}};
    {} without a sweep.
  """
  if not preset.sweep_steps:
    return {}
  paths = pipeline.prepare_synthetic_data(run_config(preset, workdir, LOSSES[0], 0, model), workdir)
  results = {}
  for loss in swept_losses(preset):
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
      history = _trial_history(pre, run)
      if history is None:
        history = train.train_and_evaluate(pre, run)["history"]
      study_records.keep_records(workdir, run, records)
      score = curves.curve(history)[-1][1]
      trials.append({"settings": settings, "verify_zeroshot_miou": score, "run": str(run)})
    best = max(trials, key=lambda t: np.nan_to_num(t["verify_zeroshot_miou"], nan=-1.0))
    results[loss] = {"chosen": best["settings"], "trials": trials}
  return results


def _trial_history(pre, run: pathlib.Path) -> list[dict] | None:
  """The history of a finished sweep trial of `pre` in `run` (its last evaluation logged),
  reusable without its checkpoints; None if it has not finished.

  Raises:
    errors.ConfigError: it was run with another config (`workdir_config.record_config`).
  """
  path = run / metrics_writer.HISTORY_FILE
  if not path.is_file():
    return None
  history = [json.loads(line) for line in path.read_text().splitlines() if line]
  if not any(r["step"] == pre.num_steps and curves.KEY in r for r in history):
    return None
  workdir_config.record_config(pre, run)
  return history


def _finished(config, folder: pathlib.Path) -> bool:
  """Whether `folder` holds a finished run (its metrics.json) of `config`.

  Raises:
    errors.ConfigError: it was run with another config (`workdir_config.record_config`).
  """
  if not (folder / "metrics.json").is_file():
    return False
  workdir_config.record_config(config, folder)
  return True


def fewshot_ood(config, ood_paths: dict, run: pathlib.Path) -> dict:
  """Fine-tunes the run's pretrained student on the OOD world's 1% (unless finished)
  and scores its validation scans (the run's own few-shot recipe); returns those
  metrics."""
  ft = copy.deepcopy(config.finetune)
  ft.input.buckets = str(ood_paths["buckets/train_1pct"])
  ft.input.val_buckets = str(ood_paths["buckets/val"])
  ft.checkpoint.init_from = str((run / "pretrain" / "checkpoints").absolute())
  out = run / "fewshot_ood"
  if not _finished(ft, out):
    finetune.finetune_and_evaluate(ft, out)
  return json.loads((out / "metrics.json").read_text())["fewshot"]


def from_scratch(
  preset: Preset, workdir: pathlib.Path, model: str, split: str, records=None
) -> dict | None:
  """The study's student fine-tuned from random initialisation (seed 0, the few-shot recipe)
  on a labelled split, scored on the validation scans: on `train` for `supervised_epochs`,
  the supervised bound (what its input and size allow with every label); on `train_1pct`
  for the preset's few-shot epochs, the baseline that pretraining must beat. None without
  `supervised_epochs`."""
  if not preset.supervised_epochs:
    return None
  config = run_config(preset, workdir, LOSSES[0], 0, model)
  paths = pipeline.prepare_synthetic_data(config, workdir)
  ft = copy.deepcopy(config.finetune)
  ft.input.buckets = str(paths[f"buckets/{split}"])
  ft.input.val_buckets = str(paths["buckets/val"])
  ft.checkpoint.init_from = None
  if split == "train":
    ft.input.split, ft.subset, ft.label_fraction = "train", "all_train_scans", 1.0
    ft.num_epochs, run = preset.supervised_epochs, workdir / "supervised"
    ft.eval.every = preset.eval_every  # its curve: converged by the study's rule?
  else:
    run = workdir / "from_scratch_1pct"
  if not _finished(ft, run):
    finetune.finetune_and_evaluate(ft, run)
  study_records.keep_records(workdir, run, records)
  metrics = json.loads((run / "metrics.json").read_text())
  history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
  num_steps = metrics["num_steps"]
  return metrics["fewshot"] | {"convergence": curves.convergence(history, num_steps, "val_miou")}


def regime(preset: Preset, workdir: pathlib.Path, model: str) -> dict:
  """The settings that place the study: its world, voxels, student and batch."""
  config = run_config(preset, workdir, LOSSES[0], 0, model)
  world, pre = config.data.world, config.pretrain
  return {
    "world": {"scenes": world.scenes, "samples_per_scene": world.samples_per_scene,
              "sensor": world.sensor, "seed": world.seed},
    "voxel_size": config.data.voxel.voxel_size,
    "teacher": pipeline.teacher_imperfection(config),
    "cameras_per_scan": pre.input.cameras_per_scan,
    "student": {"name": pre.model.name, "variant": pre.model.variant},
    "batch_size": pre.input.batch_size,
    "pretrain_steps": pre.num_steps,
    "finetune_epochs": config.finetune.num_epochs,
    "supervised_epochs": preset.supervised_epochs,
  }  # fmt: skip


def recognised_classes(per_class_iou: dict) -> int:
  """How many classes reach an IoU of `RECOGNISED_IOU` (classes without points: None)."""
  return sum(iou is not None and iou >= RECOGNISED_IOU for iou in per_class_iou.values())


def run_row(run: pathlib.Path, name: str, seed: int) -> dict:
  """The study's row of a finished run, from its metrics.json (and fewshot_ood/'s)."""
  metrics = json.loads((run / "metrics.json").read_text())
  ood = run / "fewshot_ood" / "metrics.json"
  pre = metrics["pretrain"]
  return {
    "loss": name,
    "seed": seed,
    "steps": pre["steps"],
    "zeroshot_miou": metrics["zeroshot"]["miou"],
    "zeroshot_miou_paired": metrics["zeroshot"]["miou_paired"],
    "fewshot_miou": metrics["fewshot_1pct"]["miou"],
    "fewshot_ood_miou": json.loads(ood.read_text())["fewshot"]["miou"] if ood.is_file() else None,
    "G": metrics["gap"]["G"],
    "converged": pre["convergence"]["converged"],
    "gain_last_quarter": pre["convergence"]["gain_last_quarter"],
    "teacher_ceiling": metrics["zeroshot_teacher"]["miou"],
    "final_loss": pre["final_loss"],
    "zeroshot_classes": recognised_classes(metrics["zeroshot"]["per_class_iou"]),
    "teacher_classes": recognised_classes(metrics["zeroshot_teacher"]["per_class_iou"]),
    "run": str(run),
  }


def _paired(rows, seeds, claim: str, metric: str, better: str, other: str) -> dict:
  value = {(r["loss"], r["seed"]): r[metric] for r in rows}
  a = [value.get((better, s)) for s in seeds]
  b = [value.get((other, s)) for s in seeds]
  return stats.paired_test(a, b, claim) | {"metric": metric}


def claims(rows: Sequence[dict], seeds: Sequence[int]) -> list[dict]:
  """The paired tests of `CLAIMS` (runs paired by seed)."""
  return [_paired(rows, seeds, *claim) for claim in CLAIMS]


def ablation_tests(rows: Sequence[dict], seeds: Sequence[int]) -> list[dict]:
  """The relational loss against each ablation in `rows`, on zero-shot mIoU, paired by seed."""
  present = {r["loss"] for r in rows}
  return [
    _paired(rows, seeds, f"relational > {name} on zero-shot mIoU", "zeroshot_miou",
            "relational", name)
    for name in ABLATIONS if name in present and "relational" in present
  ]  # fmt: skip


def summarise(rows: Sequence[dict], names: Sequence[str]) -> dict:
  """{configuration: {metric: stats.summary, "converged": "k of n"}}."""
  summary = {}
  for name in names:
    mine = [r for r in rows if r["loss"] == name]
    summary[name] = {m: stats.summary([r[m] for r in mine]) for m in METRICS}
    summary[name]["converged"] = f"{sum(r['converged'] is True for r in mine)} of {len(mine)}"
  return summary


def _runs(preset: Preset, workdir: pathlib.Path, model: str, swept: dict, records=None):
  """Runs (or reuses) every configuration x seed, keeping its records; yields (name, seed,
  run folder)."""
  ood_paths = None
  if preset.ood_scenes:
    ood = ood_config(preset, workdir, model)
    ood_paths = pipeline.prepare_synthetic_data(ood, workdir)
  for name in preset.configs:
    settings = swept.get(CONFIGS[name][0], {}).get("chosen")
    for seed in preset.seeds:
      run = workdir / f"{name}_s{seed}"
      config = run_config(preset, workdir, name, seed, model, settings)
      pipeline.complete_stages(config, run)  # as run_default records it
      if not _finished(config, run):
        pipeline.run_default(config, run)
      if ood_paths:
        fewshot_ood(config, ood_paths, run)
      study_records.keep_records(workdir, run, records)
      yield name, seed, run


def run_study(
  workdir: str | pathlib.Path, preset: Preset, model: str = "ptv3_base", out=None, records=None
) -> dict:
  """Runs every (configuration, seed) of `preset` and writes the study (module docstring);
  `records`: the folder of `--records`, or None."""
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  runtime.use_compilation_cache(workdir / "xla_cache")  # its runs compile the same programs
  restored = study_records.restore_records(records, workdir)
  if restored:
    logging.info("study: %d record file(s) restored from %s", restored, records)
  swept = sweep(preset, workdir, model, records)
  supervised = from_scratch(preset, workdir, model, "train", records)
  scratch_1pct = from_scratch(preset, workdir, model, "train_1pct", records)
  rows, histories = [], {}
  for name, seed, run in _runs(preset, workdir, model, swept, records):
    rows.append(run_row(run, name, seed))
    histories[(name, seed)] = json.loads((run / "metrics.json").read_text())["pretrain"]["curve"]
  ceilings = {(r["teacher_ceiling"], r["teacher_classes"]) for r in rows}
  if len(ceilings) != 1:
    raise ValueError(f"the runs of one world give different teacher ceilings: {sorted(ceilings)}")
  ceiling, teacher_classes = ceilings.pop()
  gap = gap_config.get_config()
  gap.runs = ",".join(r["run"] for r in rows)
  gap_rows = evaluation_runs.run_gap(gap, workdir / "gap")["gap_study"]
  study = {
    "preset": dataclasses.asdict(preset),
    "model": model,
    "runs": rows,
    "sweep": swept,
    "summary": summarise(rows, preset.configs),
    "teacher_ceiling": ceiling,
    "teacher_classes": teacher_classes,
    "recognised_iou": RECOGNISED_IOU,
    "supervised_bound": None if supervised is None else supervised["miou"],
    "supervised_bound_per_class": None if supervised is None else supervised["per_class_iou"],
    "supervised_bound_convergence": None if supervised is None else supervised["convergence"],
    "from_scratch_1pct": None if scratch_1pct is None else scratch_1pct["miou"],
    "from_scratch_1pct_per_class": None if scratch_1pct is None else scratch_1pct["per_class_iou"],
    "regime": regime(preset, workdir, model),
    "tests": claims(rows, preset.seeds),
    "ablations": ablation_tests(rows, preset.seeds),
    "gap_study": gap_rows,
    "machine": hardware.machine(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["python -m reldistill_jax.study", *sys.argv[1:]]),
    "wall_seconds_this_invocation": time.perf_counter() - start,
  }
  out = pathlib.Path(out or workdir / "loss_study.json")
  files.atomic_write(out, json.dumps(report.to_jsonable(study), indent=2))
  files.atomic_write(workdir / "study.md", study_report.markdown(study))
  plots = workdir / "plots"
  study_report.plot_curves(histories, study["teacher_ceiling"], plots / "study_curves.png")
  study_report.plot_bars(study, plots / "study_bars.png")
  return study


_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the study.")
_PRESET = flags.DEFINE_enum("preset", "full", list(PRESETS), "The study's size (PRESETS).")
_OUT = flags.DEFINE_string("out", None, "The study's JSON (default <workdir>/loss_study.json).")
_MODEL = flags.DEFINE_enum(
  "model", "ptv3_base", list(common.MODELS),
  "The student (configs/default.py model=; ptv3 runs the preset's variant).",
)  # fmt: skip
_CONFIGS = flags.DEFINE_list(
  "configs", None, f"Override the preset's configurations ({', '.join(CONFIGS)})."
)
_SEEDS = flags.DEFINE_list("seeds", None, "Override the preset's seeds.")
_RECORDS = flags.DEFINE_string(
  "records", None, "Keep the finished units' records here, and reuse those kept (docstring)."
)
_STEPS = flags.DEFINE_integer("pretrain_steps", None, "Override the preset's steps.")
_EPOCHS = flags.DEFINE_integer("finetune_epochs", None, "Override the preset's epochs.")


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  unknown = sorted(set(_CONFIGS.value or ()) - set(CONFIGS))
  if unknown:
    raise app.UsageError(
      f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}"
    )
  preset = PRESETS[_PRESET.value]
  overrides = {
    "configs": tuple(_CONFIGS.value) if _CONFIGS.value else None,
    "seeds": tuple(int(s) for s in _SEEDS.value) if _SEEDS.value else None,
    "steps": _STEPS.value,
    "epochs": _EPOCHS.value,
  }
  preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  cli.keep_library_log(workdir / "run.log")
  with workdir_lock.hold(workdir):  # one study per workdir
    study = run_study(_WORKDIR.value, preset, _MODEL.value, _OUT.value, _RECORDS.value)
  print(study_report.markdown(study))


if __name__ == "__main__":
  cli.run(main)
