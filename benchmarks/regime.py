r"""The study's regime: what its student learns from labels alone, against steps.

  python benchmarks/regime.py --workdir W --out benchmarks/results/study_regime.json \
      [--setting NAME:key=value,key=value ...] [--fractions 100pct,1pct] \
      [--epochs 100] [--eval_every 50] [--world_scenes 20]

Each `--setting` is a lever of the loss study's student and data, applied to
the study's `full` preset config (`study.run_config`: its world, student and
fine-tuning recipe):
  variant=tiny|tiny_wide|small   the attention student (point_encoder.VARIANTS)
  model=minkunet14a|...          another student (configs/common.py MODELS)
  voxel_size=0.3                 the voxel grid (each size and stage count has
                                 its own data, `W/data_<size>m_<stages>stages`)
  head_lr=0.2, encoder_lr=0.02   the fine-tuning rates
  clip_norm=1                    gradient clipping (0: none, the recipe's)
  batch_size=4                   scans per step
  teacher_confusion=0.8          the synthetic teacher's imperfection
  teacher_noise=0.5              (`config.data.teacher`; its own feature stores)
Default setting: `study:` (the study's own student and data). With
`--fractions=` nothing is trained: the teacher's ceiling only.

For every setting and fraction (`100pct`: every labelled training scan, the
supervised bound; `1pct`: the world's 1% subset, the from-scratch baseline of
few-shot fine-tuning) it fine-tunes the student from random initialisation for
`--epochs` epochs with the validation mIoU every `--eval_every` steps
(`config.eval.every`), in `W/<setting>_<fraction>`; a finished run is reused.
Per run it writes the curve (step, val mIoU), whether it converged
(`curves.convergence`: at most half a point gained over the last quarter), the
final per-class IoU, the median s/step (compilation apart: `runtime.run_loop`)
and the wall time (null for a run finished before this invocation). Per data it also writes the
teacher's ceiling (its zero-shot mIoU at every paired point of the validation
scans). An existing `--out` keeps
the results of other settings (a setting measured again replaces its own), each with its
machine, date and command, so the measurements of several sessions gather in one file.
Prints a table.
"""

import datetime
import json
import pathlib
import sys
import time

# The repository root first: `data_prep` the package, not benchmarks/data_prep.py.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from reldistill_jax import (  # noqa: E402
  classes,
  cli,
  curves,
  evaluation_runs,
  feature_store,
  files,
  finetune,
  hardware,
  input_pipeline,
  pairs,
  pipeline,
  records,
  study,
)
from reldistill_jax.evaluators import segmentation, zeroshot  # noqa: E402

# --workdir (the data and the runs) and --out (the JSON) are the study's own flags.
_SETTINGS = flags.DEFINE_multi_string("setting", ["study:"], "NAME:key=value,... (docstring).")
_FRACTIONS = flags.DEFINE_list("fractions", ["100pct", "1pct"], "Label fractions to train on.")
_EPOCHS = flags.DEFINE_integer("epochs", 100, "Fine-tuning epochs of every run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Steps between two validation points.")
_SCENES = flags.DEFINE_integer("world_scenes", 0, "Scenes of the world (0: the study's).")

LEVERS = (
  "variant", "model", "voxel_size", "head_lr", "encoder_lr", "clip_norm", "batch_size",
  "teacher_confusion", "teacher_noise",
)  # fmt: skip


def parse_setting(text: str) -> tuple[str, dict]:
  """'wide:variant=tiny_wide,voxel_size=0.2' -> ('wide', {...}); values typed.

  Raises:
    ValueError: naming an unknown lever or a setting without a name.
  """
  name, _, rest = text.partition(":")
  if not name:
    raise ValueError(f"--setting {text!r}: start with a name, as in wide:variant=tiny_wide")
  values = {}
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    if key not in LEVERS:
      raise ValueError(f"--setting {text!r}: unknown lever {key!r}; choose from {LEVERS}")
    values[key] = value if key in ("variant", "model") else float(value)
  return name, values


def data_config(workdir: pathlib.Path, values: dict, scenes: int):
  """The study's default config with the data levers of a setting applied."""
  preset = study.PRESETS["full"]
  config = study.run_config(preset, workdir, "relational", 0, values.get("model", "ptv3_base"))
  voxel = values.get("voxel_size", config.data.voxel.voxel_size)
  config.data.voxel.voxel_size = voxel
  config.data.root = str(workdir / f"data_{voxel:g}m_{config.data.voxel.num_stages}stages")
  config.data.world.scenes = scenes or config.data.world.scenes
  for key in ("confusion", "noise"):
    if f"teacher_{key}" in values:
      config.data.teacher[key] = values[f"teacher_{key}"]
  return config


def finetune_config(config, paths: dict, values: dict, fraction: str, epochs: int, every: int):
  """The from-scratch fine-tuning of a setting on `fraction` of the labels."""
  ft = config.finetune
  split = "train" if fraction == "100pct" else "train_1pct"
  ft.input.buckets = str(paths[f"buckets/{split}"])
  ft.input.val_buckets = str(paths["buckets/val"])
  ft.input.split = split
  ft.subset = "all_train_scans" if fraction == "100pct" else "slidr_scene_1pct"
  ft.label_fraction = 1.0 if fraction == "100pct" else 0.01
  ft.checkpoint.init_from = None
  if "variant" in values and ft.model.name == "point_encoder":
    ft.model.variant = values["variant"]
  if "batch_size" in values:
    ft.input.batch_size = ft.input.pack_size = ft.eval.batch_size = int(values["batch_size"])
  for key in ("head_lr", "encoder_lr", "clip_norm"):
    if key in values:
      ft.optimizer[key] = values[key]
  ft.num_epochs = epochs
  ft.eval.every = every
  ft.log_every = min(ft.log_every, every)
  ft.checkpoint.every = max(ft.checkpoint.every, every)
  return ft


def teacher_ceiling(config, paths: dict) -> dict:
  """The teacher's zero-shot mIoU at every paired point of the validation scans (the study
  scores a uniform sample of `input.num_pairs` a scan: `evaluate.structural_gap`)."""
  buckets = records.ShardedReader(paths["buckets/val"])
  store = feature_store.FeatureStore(paths["features/val"])
  source = input_pipeline.JoinedSource(buckets, store)
  # Every pair of every scan (a transform without a generator takes the first P pairs, so P
  # is the store's largest pair count).
  transform = input_pipeline.Transform(
    int(buckets.sizes[:, buckets.config["num_stages"]].max()),
    config.pretrain.input.intensity_scale,
    grid=tuple(store.config["grid"]),
  )
  text = evaluation_runs.load_text_embeddings(paths["text"])
  names = classes.NUSCENES_CLASSES
  confusion = np.zeros((len(names) + 1,) * 2, np.int64)
  for index in range(len(source)):
    example = transform(source[index])
    mask = example["pairs_mask"]
    q = pairs.sample_teacher(
      example["teacher"][None, None], example["pairs_camera"][None], example["pairs_grid"][None]
    )[0]
    labels = example["labels"][example["pairs_voxel"]]
    predicted = zeroshot.zero_shot_predict(np.asarray(q)[mask], text)
    confusion += segmentation.confusion_matrix(predicted, labels[mask], len(names))
  metrics = segmentation.segmentation_metrics(confusion, names)
  return {"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"]}


def run_summary(run: pathlib.Path, num_steps: int, seconds: float | None) -> dict:
  """The curve, convergence, final metrics and step time of a finished run."""
  history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
  metrics = json.loads((run / "metrics.json").read_text())
  times = [r["step_time"] for r in history if "step_time" in r]
  return {
    "num_steps": num_steps,
    "train_scans": metrics["train_scans"],
    "curve": curves.curve(history, "val_miou"),
    **curves.convergence(history, num_steps, key="val_miou"),
    "miou": metrics["fewshot"]["miou"],
    "per_class_iou": metrics["fewshot"]["per_class_iou"],
    "seconds_per_step": float(np.median(times)) if times else None,
    "wall_seconds": seconds,
  }


def measure(workdir: pathlib.Path, text: str, fractions, epochs: int, every: int, scenes: int):
  """Every fraction of one setting (module docstring)."""
  name, values = parse_setting(text)
  config = data_config(workdir, values, scenes)
  paths = pipeline.prepare_synthetic_data(config, workdir)
  out = {"name": name, "levers": values, "voxel_size": config.data.voxel.voxel_size,
         "teacher": pipeline.teacher_imperfection(config),
         "teacher_ceiling": teacher_ceiling(config, paths), "runs": {}}  # fmt: skip
  for fraction in fractions:
    ft = finetune_config(config, paths, values, fraction, epochs, every)
    out["model"] = ft.model.to_dict()
    run = workdir / f"{name}_{fraction}"
    finished = (run / "metrics.json").is_file()  # then only evaluated again
    t0 = time.perf_counter()
    result = finetune.finetune_and_evaluate(ft, run)
    seconds = None if finished else time.perf_counter() - t0
    out["runs"][fraction] = run_summary(run, result["num_steps"], seconds)
  return out


def main(argv):
  del argv
  workdir, out = flags.FLAGS.workdir, flags.FLAGS.out
  if not workdir or not out:
    raise app.UsageError("--workdir and --out are required")
  for text in _SETTINGS.value:
    parse_setting(text)  # every setting checked before the first run
  workdir = pathlib.Path(workdir)
  results = [
    measure(workdir, text, _FRACTIONS.value, _EPOCHS.value, _EVAL_EVERY.value, _SCENES.value)
    for text in _SETTINGS.value
  ]
  for r in results:
    r["machine"] = hardware.machine()
    r["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    r["command"] = " ".join(["benchmarks/regime.py", *sys.argv[1:]])
  path = pathlib.Path(out)
  earlier = json.loads(path.read_text()) if path.is_file() else {"results": []}
  for r in earlier["results"]:  # a file of one setting kept its provenance at the top
    r.update({k: earlier[k] for k in ("machine", "date", "command") if k in earlier} | r)
  earlier = earlier["results"]
  kept = [r for r in earlier if r["name"] not in {n["name"] for n in results}]
  report = {
    "benchmark": "the study's regime: its student from scratch, mIoU against steps",
    "results": kept + results,
  }
  files.atomic_write(path, json.dumps(report, indent=2))
  print("| setting | ceiling | fraction | steps | s/step | final mIoU | converged |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    if not r["runs"]:  # the teacher's ceiling only
      print(f"| {r['name']} | {100 * r['teacher_ceiling']['miou']:.1f} | - | - | - | - | - |")
    for fraction, run in r["runs"].items():
      print(
        f"| {r['name']} | {100 * r['teacher_ceiling']['miou']:.1f} | {fraction} | "
        f"{run['num_steps']} | {run['seconds_per_step'] or 0:.2f} | {100 * run['miou']:.1f} | "
        f"{run['converged']} |"
      )


if __name__ == "__main__":
  cli.run(main)
