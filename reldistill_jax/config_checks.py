"""Config values checked before any work: `validate(config)` raises one `ConfigError` naming the field.

Every run function (`train.train_and_evaluate`, `finetune.finetune_and_evaluate`,
`pipeline.run_default`, `evaluation_runs.run_zeroshot` / `run_gap`) calls it
first, before it reads data or creates its workdir. The rules are a table by
field path; a field a config does not have is not checked. The embedded default
nests a pretraining and a fine-tuning config (`pretrain.*`, `finetune.*`),
checked with their own rules.
"""

import importlib
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from reldistill_jax import errors, losses, sharded_losses
from reldistill_jax.evaluators import segmentation

LOSSES = ("relational", "contrastive", "similarity")
OPTIMIZERS = ("adamw", "sgd")
DTYPES = ("float32", "bfloat16", "float16")
MODES = ("finetune", "linear")
# Fields that must be set, per config kind.
REQUIRED = {
  "pretrain": ("input.buckets", "input.features"),
  "finetune": ("input.buckets", "input.val_buckets"),
  "zeroshot": ("checkpoint", "input.val_buckets", "text_embeddings"),
  "gap": ("runs",),
}


def _int(low: int) -> Callable[[Any], str | None]:
  def check(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      return f"must be an integer >= {low}"
    return None

  return check


def _float(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
  def check(value):
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
      return "must be a finite number"
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
      return f"must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return None

  return check


def _choice(options: tuple[str, ...]):
  return lambda value: None if value in options else f"must be one of {', '.join(options)}"


def _scale(value) -> str | None:
  if (
    len(value) != 2
    or any(not isinstance(v, int | float) or v <= 0 for v in value)
    or value[0] > value[1]
  ):
    return "must be two positive numbers (low, high) with low <= high"
  return None


POSITIVE, NON_NEGATIVE = _int(1), _int(0)
RULES: dict[str, Callable[[Any], str | None]] = {
  "seed": NON_NEGATIVE,
  "num_steps": POSITIVE,
  "num_epochs": POSITIVE,
  "log_every": POSITIVE,
  "num_classes": POSITIVE,
  "input.batch_size": POSITIVE,
  "input.pack_size": POSITIVE,
  "input.pack_bins": POSITIVE,
  "input.num_threads": NON_NEGATIVE,
  "input.prefetch": NON_NEGATIVE,
  "input.intensity_scale": _float(0, low_open=True),
  "input.augment.scale": _scale,
  "model.out_dim": POSITIVE,
  "model.patch_size": POSITIVE,
  "model.num_curves": POSITIVE,
  "model.dtype": _choice(DTYPES),
  "loss.name": _choice(LOSSES),
  "loss.w_cross": _float(0),
  "loss.w_intra": _float(0),
  "loss.temperature": _float(0, low_open=True),
  "loss.similarity": _choice(("cosine", "l2")),
  "loss.distance": _choice(losses.RELATIONAL_DISTANCES),
  "loss.implementation": _choice(sharded_losses.IMPLEMENTATIONS),
  "loss.lovasz_weight": _float(0),
  "optimizer.name": _choice(OPTIMIZERS),
  "optimizer.lr": _float(0, low_open=True),
  "optimizer.head_lr": _float(0),
  "optimizer.encoder_lr": _float(0),
  "optimizer.weight_decay": _float(0),
  "optimizer.momentum": _float(0, 1, high_open=True),
  "optimizer.dampening": _float(0, 1, high_open=True),
  "model.bn_momentum": _float(0, 1, low_open=True),
  "model.norm": _choice(("batch", "layer")),
  "model.drop_path": _float(0, 1, high_open=True),
  "data.voxel.knn": NON_NEGATIVE,
  "input.cameras_per_scan": NON_NEGATIVE,
  "input.augment.flip_one": _float(0, 1),
  "optimizer.warmup_steps": NON_NEGATIVE,
  "optimizer.warmup_epochs": NON_NEGATIVE,
  "optimizer.layer_decay": _float(0, 1, low_open=True),
  "head": _choice(("linear", "batchnorm_zero")),
  "optimizer.clip_norm": _float(0),
  "mode": _choice(MODES),
  "eval.batch_size": POSITIVE,
  "eval.every": NON_NEGATIVE,
  "eval.max_pairs": POSITIVE,
  "eval.empty": _choice(tuple(segmentation.EMPTY_CONVENTIONS)),
  "checkpoint.every": POSITIVE,
  "checkpoint.keep": POSITIVE,
  "data.teacher.confusion": _float(0, 1),
  "data.teacher.noise": _float(0),
  "data.world.scenes": POSITIVE,
  "data.world.samples_per_scene": POSITIVE,
  "data.workers": POSITIVE,
}


def _get(config: ml_collections.ConfigDict, field: str):
  """The value of a dotted field, or `KeyError` when the config has no such field."""
  value = config
  for part in field.split("."):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      raise KeyError(field)
    value = value[part]
  return value


def _has(config: ml_collections.ConfigDict, field: str) -> bool:
  try:
    _get(config, field)
  except KeyError:
    return False
  return True


def _fail(prefix: str, field: str, value, reason: str) -> None:
  raise errors.ConfigError(
    f"config.{prefix}{field}={value!r} {reason} (set --config.{prefix}{field}=...)"
  )


def validate(config: ml_collections.ConfigDict, prefix: str = "", required: bool = True) -> None:
  """Checks every field of `config` that `RULES` names, and the relations between fields.

  Args:
    config: a run config (any kind).
    prefix: the dotted path of `config` inside a larger one, for the messages.
    required: check that the fields `REQUIRED` names are set (the embedded
      default sets those of its stages itself).

  Raises:
    errors.ConfigError: naming the first field at fault and what it must be.
  """
  kind = config.get("kind")
  for field in REQUIRED.get(kind, ()) if required else ():
    if _get(config, field) is None:
      raise errors.ConfigError(
        f"config.{prefix}{field} is not set (pass --config.{prefix}{field}=...)"
      )
  for field, rule in RULES.items():
    if _has(config, field):
      value = _get(config, field)
      reason = rule(value)
      if reason:
        _fail(prefix, field, value, reason)
  _check_relations(config, prefix)
  if kind == "default":
    _check_voxel(config)
    validate(config.pretrain, "pretrain.", required=False)
    validate(config.finetune, "finetune.", required=False)


def _check_relations(config: ml_collections.ConfigDict, prefix: str) -> None:
  if _has(config, "model.name"):
    _check_model(config, prefix)
  if _has(config, "loss.w_cross") and config.loss.w_cross == config.loss.w_intra == 0:
    _fail(prefix, "loss.w_cross", 0, "and loss.w_intra are both 0: the loss would be 0")
  if _has(config, "class_names") and len(config.class_names) != config.num_classes:
    _fail(prefix, "num_classes", config.num_classes, f"but {len(config.class_names)} class_names")
  if _has(config, "mesh.data"):
    _check_devices(config, prefix)


def _check_model(config: ml_collections.ConfigDict, prefix: str) -> None:
  name = config.model.name
  try:
    module = importlib.import_module(f"reldistill_jax.models.{name}")
  except ModuleNotFoundError:
    module = None
  if module is None or not hasattr(module, "from_config"):
    _fail(
      prefix, "model.name", name, "is not a student: choose point_encoder, minkunet or waffleiron"
    )
  variants = getattr(module, "VARIANTS", None)
  if variants is not None and config.model.variant not in variants:
    _fail(prefix, "model.variant", config.model.variant, f"must be one of {', '.join(variants)}")


def _check_devices(config: ml_collections.ConfigDict, prefix: str) -> None:
  """The mesh size against the devices, and the packs and batches against the mesh."""
  devices = jax.device_count()
  data = config.mesh.data
  if data != -1 and not 1 <= data <= devices:
    _fail(prefix, "mesh.data", data, f"must be -1 (all devices) or 1 .. {devices}")
  data = devices if data == -1 else data
  if _has(config, "input.pack_size"):
    batch, pack = config.input.batch_size, config.input.pack_size
    if batch % pack:
      _fail(prefix, "input.batch_size", batch, f"must be a multiple of input.pack_size {pack}")
    if (batch // pack) % data:
      _fail(
        prefix, "input.pack_size", pack,
        f"gives {batch // pack} packs a step, not a multiple of the {data} devices of the data "
        f"axis (set input.pack_size to input.batch_size / {data} or a divisor of it)",
      )  # fmt: skip
  # Pretraining evaluates only for its curves; every other run evaluates at its end.
  evaluates = config.get("kind") != "pretrain" or config.eval.every
  if _has(config, "eval.batch_size") and evaluates and config.eval.batch_size % data:
    _fail(
      prefix, "eval.batch_size", config.eval.batch_size,
      f"must be a multiple of the {data} devices of the data axis",
    )  # fmt: skip


def _check_voxel(config: ml_collections.ConfigDict) -> None:
  from reldistill_jax import serialization

  vox = config.data.voxel
  try:
    serialization.check_bucket_config(serialization.CURVES, vox.num_stages)
  except ValueError as e:
    raise errors.ConfigError(f"config.data.voxel: {e}") from None
  if vox.voxel_size <= 0:
    _fail("", "data.voxel.voxel_size", vox.voxel_size, "must be > 0")
