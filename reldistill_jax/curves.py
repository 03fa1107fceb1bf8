"""Evaluation during pretraining, and when a run counts as converged.

`make_evaluator(config, model, mesh)` gives the function the training loop
calls every `config.eval.every` steps (`runtime.run_loop`): on the validation
buckets `config.eval.val_buckets`, with the teacher store of the same scans
and the class text embeddings, it measures

  eval/zeroshot_miou         the student's zero-shot mIoU on every point;
  eval/zeroshot_miou_paired  the same on the points paired with a pixel;
  eval/teacher_miou          the teacher's own features at those points,
                             classified by the same text embeddings: the
                             ceiling of what distillation can reach there;
  eval/G                     the structural gap on those pairs;

which go to TensorBoard and `history.jsonl` beside the training scalars.

`convergence(history)` reads a run's curve: a run has converged when its
zero-shot mIoU gained less than `tolerance` (0.5 points) over the last quarter
of its steps, i.e. between the last evaluation at or before 75% of the steps
and the final one. A curve with fewer than two evaluations cannot say.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from reldistill_jax import (
  classes,
  errors,
  evaluate,
  evaluation_runs,
  feature_store,
  input_pipeline,
  records,
  runtime,
  serialization,
)

KEY = "eval/zeroshot_miou"


def make_evaluator(
  config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh
) -> Callable[[Any], dict[str, float]] | None:
  """The curve evaluation of a pretraining config, or None when `eval.every` is 0.

  Raises:
    errors.ConfigError: `eval.every` set without the validation inputs.
    errors.DataError (and subclasses): inputs that do not fit the run, named.
  """
  ev = config.eval
  if not ev.every:
    return None
  fields = ("val_buckets", "val_features", "text_embeddings")
  missing = [f"config.eval.{f}" for f in fields if not ev[f]]
  if missing:
    raise errors.ConfigError(
      f"config.eval.every={ev.every} needs {', '.join(missing)} (or set config.eval.every=0)"
    )
  val = records.ShardedReader(ev.val_buckets, {"bucket_version": serialization.BUCKET_VERSION})
  input_pipeline.require_labels(val, "the zero-shot curves", every=True)
  store = feature_store.FeatureStore(
    ev.val_features,
    {"teacher": config.teacher, "dense": config.dense, "feature_dim": config.model.out_dim},
  )
  text = evaluation_runs.load_text_embeddings(ev.text_embeddings)
  names = classes.NUSCENES_CLASSES
  scale = config.input.intensity_scale
  plain = input_pipeline.Transform(0, scale)
  with_pairs = input_pipeline.Transform(
    config.input.num_pairs, scale, grid=tuple(store.config["grid"])
  )
  budgets = runtime.pack_budgets(config, val, ev.batch_size // mesh.shape["data"], "evaluation")

  def evaluate_fn(params) -> dict[str, float]:
    zeroshot = evaluate.zero_shot(model, params, val, text, plain, budgets, mesh, names)
    paired = evaluate.structural_gap(
      model, params, val, store, with_pairs, budgets, mesh, ev.max_pairs,
      text_embeddings=text, class_names=names,
    )  # fmt: skip
    return {
      KEY: zeroshot["miou"],
      "eval/zeroshot_miou_paired": paired["zeroshot_paired"]["miou"],
      "eval/teacher_miou": paired["zeroshot_teacher"]["miou"],
      "eval/G": paired["G"],
    }

  return evaluate_fn


def curve(history: Sequence[Mapping], key: str = KEY) -> list[tuple[int, float]]:
  """(step, value) of every record of `history` holding `key`, in step order."""
  return sorted((int(r["step"]), float(r[key])) for r in history if key in r)


def convergence(
  history: Sequence[Mapping], num_steps: int, key: str = KEY, tolerance: float = 0.005
) -> dict[str, Any]:
  """Whether the curve `key` of a run flattened over its last quarter (module docstring).

  Args:
    history: the run's logged records (`runtime.run_loop`).
    num_steps: the run's length.
    key: the curve (a fraction, e.g. mIoU in [0, 1]).
    tolerance: the largest gain over the last quarter of a converged run
      (0.005: half a point of mIoU).

  Returns:
    {"converged": bool or None (fewer than two evaluations), "gain_last_quarter":
     final minus the value at the last evaluation at or before 75% of the
     steps (None likewise), "final": the last value, "evaluations": count}.
  """
  points = curve(history, key)
  result = {"converged": None, "gain_last_quarter": None, "evaluations": len(points)}
  result["final"] = points[-1][1] if points else None
  before = [value for step, value in points if step <= 0.75 * num_steps]
  if len(points) < 2 or not before:
    return result
  gain = points[-1][1] - before[-1]
  if not np.isfinite(gain):
    return result
  return result | {"converged": bool(gain < tolerance), "gain_last_quarter": float(gain)}
