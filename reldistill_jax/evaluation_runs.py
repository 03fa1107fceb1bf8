"""Evaluations of finished runs: zero-shot of a checkpoint, and the gap study.

run_zeroshot   `configs/zeroshot.py`: a pretraining checkpoint against the
               class text embeddings, on every point of the validation
               scans; workdir/metrics.json (`zeroshot/...`) and report.md.
run_gap        `configs/gap.py`: G against zero-shot and few-shot mIoU
               across run folders (PROTOCOLS.md section 4); the study, its
               table and scatter plot in workdir.
zero_shot_metrics  the zero-shot evaluation both `run_zeroshot` and
               `pipeline.run_default` use.
"""

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reldistill_jax import (
  classes,
  config_checks,
  errors,
  evaluate,
  feature_store,
  input_pipeline,
  records,
  report,
  runtime,
  serialization,
  workdir_config,
)

CLASS_NAMES = classes.NUSCENES_CLASSES  # the synthetic world uses them too


def zero_shot_metrics(
  config: ml_collections.ConfigDict,
  params: Any,
  val: records.ShardedReader,
  text: np.ndarray,
  batch_size: int,
  mesh: jax.sharding.Mesh | None,
  empty: str = "nan",
) -> dict:
  """Zero-shot segmentation of the student `config.model` on every point of `val`.

  Args:
    config: a config with `model` (`runtime.make_model`) and
      `input.intensity_scale` (the evaluation's).
    params: the student's parameters.
    val: the bucket store of the validation split.
    text: (C, D) class text embeddings of the nuScenes classes.
    batch_size: scans per step, one pack of batch_size / devices per device.
    mesh: a mesh with a `data` axis, or None for one device.
    empty: the empty-class convention, "nan" or "one".

  Returns:
    The metrics of `evaluate.zero_shot`.
  """
  model = runtime.make_model(config)
  transform = input_pipeline.Transform(0, config.input.intensity_scale)
  devices = mesh.shape["data"] if mesh is not None else 1
  budgets = runtime.pack_budgets(config, val, batch_size // devices, "evaluation")
  return evaluate.zero_shot(model, params, val, text, transform, budgets, mesh, CLASS_NAMES, empty)


def load_text_embeddings(path: str | pathlib.Path) -> np.ndarray:
  """(C, D) class text embeddings of a `data_prep.text_embeddings` file.

  Raises:
    ValueError: naming the file, when it holds another class list.
  """
  with np.load(path) as text_file:
    names = [str(n) for n in text_file["classes"]]
    if names != list(CLASS_NAMES):
      raise errors.DataError(
        f"{path}: text embeddings of classes {names}, not the nuScenes classes"
      )
    return text_file["embeddings"]


def _check_params(config: ml_collections.ConfigDict, params, val, checkpoint: str) -> None:
  """Fails when the checkpoint's student is not `config.model`'s, naming the field."""
  model = runtime.make_model(config)
  example = input_pipeline.example_batch(val, config.input, config.model.patch_size)
  abstract = jax.eval_shape(model.init, jax.random.key(0), example)
  flat = lambda tree: {
    jax.tree_util.keystr(path): tuple(jnp.shape(leaf))
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }
  loaded, wanted = flat(params), flat(abstract)
  differ = sorted(set(loaded) ^ set(wanted))
  differ += [k for k in wanted if k in loaded and loaded[k] != wanted[k]]
  if differ:
    raise errors.ConfigError(
      f"config.checkpoint: the student in {checkpoint} does not match config.model "
      f"(variant, out_dim, ...): {len(differ)} parameters differ, e.g. {differ[:3]}"
    )


def run_zeroshot(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, override_config: bool = False
) -> dict:
  """Zero-shot mIoU of `config.checkpoint`; writes metrics.json and report.md into workdir."""
  workdir = pathlib.Path(workdir)
  config_checks.validate(config)
  val = records.ShardedReader(
    config.input.val_buckets, {"bucket_version": serialization.BUCKET_VERSION}
  )
  input_pipeline.require_labels(val, "zero-shot evaluation", every=True)
  text = load_text_embeddings(config.text_embeddings)
  params = runtime.load_params(config.checkpoint, field="config.checkpoint")
  _check_params(config, params, val, config.checkpoint)
  workdir_config.record_config(config, workdir, override_config)
  mesh = runtime.make_mesh(config)
  zeroshot = zero_shot_metrics(
    config, params, val, text, config.eval.batch_size, mesh, config.eval.empty
  )
  metrics = {"zeroshot": zeroshot}
  lines = {"zero-shot mIoU": report.describe_miou(zeroshot)}
  if config.input.val_features:
    paired = paired_metrics(config, params, val, text, mesh)
    zeroshot["miou_paired"] = paired["zeroshot_paired"]["miou"]
    metrics["zeroshot_teacher"] = paired["zeroshot_teacher"]
    metrics["gap"] = {k: paired[k] for k in ("G", "cka", "pairs")}
    lines["on the paired points"] = (
      f"{100 * zeroshot['miou_paired']:.1f}% (the teacher there: "
      f"{100 * paired['zeroshot_teacher']['miou']:.1f}%, the ceiling)"
    )
  metrics["inputs"] = {
    "dataset": config.dataset,
    "checkpoint": str(config.checkpoint),
    "val_buckets": str(config.input.val_buckets),
    "val_features": config.input.val_features,
    "text_embeddings": str(config.text_embeddings),
  }
  report.write_report(workdir, metrics, title="reldistill-jax: zero-shot segmentation")
  report.print_results("zero-shot", lines, workdir)
  return metrics


def paired_metrics(config: ml_collections.ConfigDict, params, val, text, mesh) -> dict:
  """`evaluate.structural_gap` with both zero-shot scores, on `config.input.val_features`."""
  store = feature_store.FeatureStore(
    config.input.val_features, {"feature_dim": config.model.out_dim}
  )
  transform = input_pipeline.Transform(
    config.input.num_pairs, config.input.intensity_scale, grid=tuple(store.config["grid"])
  )
  devices = mesh.shape["data"] if mesh is not None else 1
  budgets = runtime.pack_budgets(config, val, config.eval.batch_size // devices, "evaluation")
  return evaluate.structural_gap(
    runtime.make_model(config), params, val, store, transform, budgets, mesh,
    config.eval.max_pairs, text_embeddings=text, class_names=CLASS_NAMES,
  )  # fmt: skip


# (row key, metrics.json path, required) of one run's row of the gap study.
GAP_KEYS = (
  ("G", ("gap", "G"), True),
  ("zeroshot_miou", ("zeroshot", "miou"), True),
  ("fewshot_miou", ("fewshot_1pct", "miou"), False),
)


def gap_row(run: str | pathlib.Path) -> dict:
  """{"name", "G", "zeroshot_miou", "fewshot_miou"} of a finished run's metrics.json.

  A value written as null (NaN) is kept as None; `gap_study` leaves it out.

  Raises:
    FileNotFoundError: the run folder holds no metrics.json.
    ValueError: naming the run folder and the missing key.
  """
  path = pathlib.Path(run) / "metrics.json"
  if not path.is_file():
    raise FileNotFoundError(f"{run}: no metrics.json (is it a finished run folder?)")
  metrics = json.loads(path.read_text())
  row = {"name": str(run)}
  for name, keys, required in GAP_KEYS:
    value = metrics
    for key in keys:
      if not isinstance(value, dict) or key not in value:
        if required:
          raise errors.DataError(f"{run}: metrics.json has no {'/'.join(keys)}")
        value = None
        break
      value = value[key]
    row[name] = value
  return row


def split_runs(runs: str) -> list[str]:
  """The run folders of a comma-separated `config.runs`."""
  folders = [run.strip() for run in runs.split(",") if run.strip()]
  if not folders:
    raise errors.ConfigError(f"config.runs={runs!r} names no run folder")
  return folders


def run_gap(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, override_config: bool = False
) -> dict:
  """The gap study of `config.runs`; returns it and writes metrics.json, report.md and the scatter plot."""
  config_checks.validate(config)
  rows = [gap_row(run) for run in split_runs(config.runs)]
  workdir_config.record_config(config, workdir, override_config)
  written = report.write_report(
    workdir, {"runs": rows}, gap_rows=rows, title="reldistill-jax: structural gap vs mIoU"
  )
  study = json.loads(written["metrics"].read_text())["gap_study"]
  results = {f"G vs {target}": _correlation(result) for target, result in study.items()}
  report.print_results(f"gap study of {len(rows)} runs", results, workdir)
  return {"runs": rows, "gap_study": study}


def _correlation(result: dict) -> str:
  if result["note"]:
    return f"no correlation ({result['note']})"
  return (
    f"Pearson r {result['pearson_r']:.2f} (p {result['pearson_p']:.2g}), Spearman rho "
    f"{result['spearman_rho']:.2f} (p {result['spearman_p']:.2g}), n {result['n']}"
  )
