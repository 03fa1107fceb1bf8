"""Few-shot fine-tuning and linear probing of the pretrained student.

PROTOCOLS.md section 5. A new linear head (Dense to the C classes) reads the
student's `aux["backbone"]` (the decoder output before its projection head);
the loss is cross-entropy plus the Lovasz-softmax loss on the labelled voxels
of the batch; SGD with momentum, weight decay and a cosine schedule, with one
learning rate for the head and another for the encoder (SLidR's 1% recipe:
2.0 and 0.02). `mode="linear"` freezes the encoder entirely: its updates are
zero (`optax.set_to_zero`) and no gradient is taken through it; LayerNorm has
no running statistics, so nothing else needs freezing. After
`config.num_epochs` epochs of the training subset the model is scored on every
point of the validation store (`evaluate.segmentation`).

Read top to bottom like `train.py` (both build on `runtime.py`): checks ->
mesh and data -> model and optimizer (shape first, then initialised
replicated) -> update step -> restore -> loop -> evaluation and report.

The train state is a plain pytree {"params": {"encoder": the student's
variables, "head": the head's}, "opt_state", "step"}; checkpoints also hold
the grain iterator state. Restore order: the workdir's latest checkpoint, else
`config.checkpoint.resume`, else a fresh state whose encoder is the student of
`config.checkpoint.init_from` (a pretraining checkpoint folder) or, unset, a
random one (the "from scratch" baseline).
"""

import functools
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reldistill_jax import (
  config_checks,
  distributed,
  errors,
  evaluate,
  input_pipeline,
  records,
  report,
  runtime,
  scalr_finetune,
  serialization,
  workdir_config,
)

# ----------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------


def lovasz_grad(fg_sorted: jax.Array, valid_sorted: jax.Array) -> jax.Array:
  """Gradient of the Lovasz extension of the Jaccard loss at sorted errors.

  With the errors of one class sorted in decreasing order, the Lovasz
  extension is sum_i e_(i) (J(i) - J(i - 1)), J(i) = 1 - |F \\ E_i| / |F u E_i|
  the Jaccard loss of the set E_i of the i largest errors and F the
  foreground; the increments come from cumulative sums of the sorted
  foreground indicator (Berman et al. 2018, Alg. 1).

  Args:
    fg_sorted: (N, C) int32 foreground indicator (1 where the voxel is of the
      class), each column in the order of decreasing error.
    valid_sorted: (N, C) int32 validity in the same order; invalid rows sort
      last and leave every cumulative sum unchanged.

  Returns:
    (N, C) float32 increments J(i) - J(i - 1); zero on invalid rows.
  """
  gts = jnp.sum(fg_sorted, axis=0)  # (C,) foreground size
  intersection = gts - jnp.cumsum(fg_sorted, axis=0)  # foreground not yet among the errors
  union = gts + jnp.cumsum((1 - fg_sorted) * valid_sorted, axis=0)
  # union >= 1 wherever it is used (a present class, or a valid row).
  jaccard = 1.0 - intersection.astype(jnp.float32) / jnp.maximum(union, 1).astype(jnp.float32)
  increments = jnp.concatenate([jaccard[:1], jnp.diff(jaccard, axis=0)], axis=0)
  return increments * valid_sorted


def lovasz_softmax(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """The Lovasz-softmax loss, averaged over the classes present (Berman et al. 2018).

  Per class c, the errors |[y_i = c] - p_ic| of the valid rows are sorted in
  decreasing order and dotted with `lovasz_grad` of the sorted foreground,
  which is held constant (the reference's subgradient). Classes without a
  valid row of their own are left out of the mean, as the reference's
  `classes="present"`; with no valid row at all the loss is 0.

  Args:
    probs: (N, C) class probabilities.
    labels: (N,) int class index 0..C-1 of every row (any value where masked).
    mask: (N,) bool, the rows that count (labelled voxels).

  Returns:
    The scalar loss in [0, 1].
  """
  n, c = probs.shape
  valid = mask.astype(jnp.int32)[:, None]  # (N, 1)
  fg = (labels[:, None] == jnp.arange(c)[None, :]).astype(jnp.int32) * valid  # (N, C)
  probs = probs.astype(jnp.float32)
  errors = jnp.where(fg > 0, 1.0 - probs, probs)  # (N, C), in [0, 1]
  # Masked rows sort after every valid one; the permutation carries no gradient.
  keys = jax.lax.stop_gradient(jnp.where(valid > 0, errors, -1.0))
  order = jnp.argsort(keys, axis=0, descending=True)  # (N, C)
  errors_sorted = jnp.take_along_axis(errors, order, axis=0)
  fg_sorted = jnp.take_along_axis(fg, order, axis=0)
  valid_sorted = jnp.take_along_axis(jnp.broadcast_to(valid, (n, c)), order, axis=0)
  per_class = jnp.sum(errors_sorted * lovasz_grad(fg_sorted, valid_sorted), axis=0)  # (C,)
  present = jnp.sum(fg, axis=0) > 0
  return jnp.sum(jnp.where(present, per_class, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def segmentation_loss(
  logits: jax.Array, labels: jax.Array, lovasz_weight: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy + Lovasz-softmax over the labelled voxels of a batch.

  Args:
    logits: (B, T0, C) class scores; column c - 1 is training id c.
    labels: (B, T0) training ids, 0 = ignore (and padding).
    lovasz_weight: weight of the Lovasz term.

  Returns:
    (loss, parts): parts {"ce", "lovasz", "accuracy", "voxels"} over the
    labelled voxels (the batch is one set, as the reference's per_image=False).
  """
  c = logits.shape[-1]
  logits = logits.reshape(-1, c).astype(jnp.float32)  # (B * T0, C)
  labels = labels.reshape(-1)
  mask = labels > 0
  target = jnp.maximum(labels - 1, 0)
  count = jnp.sum(mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
  ce = jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(count, 1)
  lovasz = lovasz_softmax(jax.nn.softmax(logits), target, mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == target) & mask)
  parts = {
    "ce": ce,
    "lovasz": lovasz,
    "accuracy": correct / jnp.maximum(count, 1),
    "voxels": count,
  }
  return ce + lovasz_weight * lovasz, parts


# ----------------------------------------------------------------------------
# Model and optimizer.
# ----------------------------------------------------------------------------


def make_head(config: ml_collections.ConfigDict) -> nn.Module:
  """The new head: Dense from the backbone channels to the C classes (float32), or with
  `config.head="batchnorm_zero"` ScaLR's BatchNorm and zero-initialised linear layer."""
  if config.get("head", "linear") == "batchnorm_zero":
    return scalr_finetune.BatchNormZeroHead(config.num_classes)
  return nn.Dense(config.num_classes, name="head")


def _head_inputs(head: nn.Module, backbone: jax.Array, batch) -> Any:
  return (backbone, batch["s0/mask"]) if getattr(head, "takes_mask", False) else backbone


def init_params(encoder: nn.Module, head: nn.Module, example: dict, rng: jax.Array) -> dict:
  """{"encoder": the student's variables, "head": the head's}, both at random."""
  encoder_rng, head_rng = jax.random.split(rng)
  encoder_params = encoder.init(encoder_rng, example)
  backbone = jax.eval_shape(lambda p: encoder.apply(p, example)[1]["backbone"], encoder_params)
  zeros = jnp.zeros(backbone.shape, backbone.dtype)
  head_params = head.init(head_rng, _head_inputs(head, zeros, example))
  return {"encoder": encoder_params, "head": head_params}


def logits_fn(
  encoder: nn.Module,
  head: nn.Module,
  params: dict,
  batch,
  frozen: bool = False,
  train: bool = False,
  rng: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """((B, T0, C) float32 class scores of a batch, the params after it).

  `frozen` stops gradients into the encoder and keeps its BatchNorm layers on
  their running statistics; `train` otherwise normalises them by the batch and
  updates the statistics (`runtime.encode`), as SLidR fine-tunes; `rng` drives the
  encoder's stochastic layers then (WaffleIron's drop path).
  """
  encoder_params = jax.lax.stop_gradient(params["encoder"]) if frozen else params["encoder"]
  (_, aux), encoder_params = runtime.encode(
    encoder, encoder_params, batch, train and not frozen, rng
  )
  # (B, T0, backbone) -> (B, T0, C); a head's BatchNorm trains in a linear probe too.
  inputs = _head_inputs(head, aux["backbone"], batch)
  logits, head_params = runtime.encode(head, params["head"], inputs, train)
  return logits, {**params, "encoder": encoder_params, "head": head_params}


def _labels(params: dict) -> dict:
  """The label tree of `optax.multi_transform`: "encoder" or "head" for every leaf."""
  return {part: jax.tree.map(lambda _, part=part: part, tree) for part, tree in params.items()}


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int, encoder: nn.Module):
  """SGD with momentum, weight decay and cosine decay, one learning rate per part; or, with
  `config.optimizer.name="adamw"` (a WaffleIron), ScaLR's AdamW with layer-wise decay
  (`scalr_finetune`; the encoder's schedule shown is its last layer's).

  Returns:
    (tx, schedules): the transform over {"encoder", "head"} parameters, and
    {"head": schedule, "encoder": schedule} (the encoder's is 0 for a linear
    probe, whose encoder updates are exactly zero).
  """
  opt = config.optimizer

  def sgd(lr):
    schedule = optax.cosine_decay_schedule(lr, max(num_steps, 1))
    tx = runtime.sgd(schedule, opt.momentum, opt.get("dampening", 0.0), opt.weight_decay)
    return tx, schedule

  if opt.get("name", "sgd") == "adamw":
    depth, _, _, grids = encoder.sizes()
    warmup = round(num_steps * opt.warmup_epochs / config.num_epochs)
    head_tx, head_schedule = scalr_finetune.make_optimizer(
      opt, num_steps, warmup, depth, len(grids)
    )
    encoder_tx, encoder_schedule = head_tx, lambda step: head_schedule(step) * opt.layer_decay
  else:
    head_tx, head_schedule = sgd(opt.head_lr)
    encoder_tx, encoder_schedule = sgd(opt.encoder_lr)
  if config.mode == "linear":
    encoder_tx, encoder_schedule = optax.set_to_zero(), optax.constant_schedule(0.0)
  tx = optax.multi_transform({"encoder": encoder_tx, "head": head_tx}, _labels)
  if opt.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
  return tx, {"head": head_schedule, "encoder": encoder_schedule}


def update_step(state, batch, *, encoder, head, tx, schedules, frozen, lovasz_weight, seed):
  """One optimizer step; returns the new state and its measurements. The step's dropout key
  is the run's seed folded with the step, so a resumed run draws what it would have."""
  trainable, statistics = runtime.split_statistics(state["params"])
  rng = jax.random.fold_in(jax.random.key(seed), state["step"])

  def objective(params):
    logits, after = logits_fn(
      encoder, head, runtime.merge(params, statistics), batch, frozen, train=True, rng=rng
    )
    loss, parts = segmentation_loss(logits, batch["labels"], lovasz_weight)
    return loss, (parts, after)

  (loss, (parts, after)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, state["opt_state"], trainable)
  trainable = optax.apply_updates(trainable, updates)
  params = runtime.merge(trainable, runtime.split_statistics(after)[1])
  measurements = {
    "loss": loss,
    "loss/ce": parts["ce"],
    "loss/lovasz": parts["lovasz"],
    "train_accuracy": parts["accuracy"],
    "labelled_voxels": parts["voxels"],
    "grad_norm": optax.tree.norm(grads),
    "param_norm": optax.tree.norm(trainable),
    "update_norm": optax.tree.norm(updates),
    "head_update_norm": optax.tree.norm(updates["head"]),
    "learning_rate": schedules["head"](state["step"]),
    "learning_rate/encoder": schedules["encoder"](state["step"]),
  }
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, measurements


def load_encoder(checkpoints: str | pathlib.Path, abstract_encoder, sharding):
  """The pretrained student of a checkpoint folder, checked against the config's.

  Raises:
    ValueError: the checkpoint's parameters differ in names or shapes (another
      `config.model` variant, `out_dim`, ...).
  """
  flat = lambda tree: {
    jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }
  loaded = flat(runtime.load_params(checkpoints, field="config.checkpoint.init_from"))
  wanted = flat(abstract_encoder)
  differ = sorted(set(loaded) ^ set(wanted))
  differ += [k for k in wanted if k in loaded and tuple(loaded[k].shape) != wanted[k].shape]
  if differ:
    raise errors.ConfigError(
      f"config.checkpoint.init_from: the student in {checkpoints} does not match config.model "
      f"(variant, out_dim, ...): {len(differ)} parameters differ, e.g. {differ[:3]}"
    )
  leaves = [jnp.asarray(loaded[k], wanted[k].dtype) for k in wanted]
  return jax.device_put(jax.tree.unflatten(jax.tree.structure(abstract_encoder), leaves), sharding)


def _steps(config: ml_collections.ConfigDict, num_scans: int) -> int:
  """`config.num_epochs` passes over the training subset, in steps (at least 1)."""
  return max(1, config.num_epochs * num_scans // config.input.batch_size)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def open_data(config: ml_collections.ConfigDict, data_sharding):
  """The labelled training subset and the validation store, checked; this process's packs.

  The stores are named by their builder split, so a store of another subset is
  refused; both must hold labels.

  Returns:
    (iterator, buckets, val_buckets).
  """
  inp = config.input
  version = {"bucket_version": serialization.BUCKET_VERSION}
  buckets = records.ShardedReader(inp.buckets, version | {"split": inp.split})
  val_buckets = records.ShardedReader(inp.val_buckets, version | {"split": inp.val_split})
  for store, role in ((buckets, "fine-tuning"), (val_buckets, "evaluation")):
    input_pipeline.require_labels(store, role, every=store is val_buckets)
  budgets = runtime.pack_budgets(config, buckets, inp.pack_size)
  augment = input_pipeline.Augment.from_config(inp.augment)
  transform = input_pipeline.Transform(0, inp.intensity_scale, augment=augment)
  packs = inp.batch_size // inp.pack_size
  index, count = distributed.batch_slice(data_sharding, packs)
  ds = input_pipeline.process_dataset(
    buckets, None, transform, budgets, inp, config.seed, index, count, packs // count
  )
  return iter(ds), buckets, val_buckets


def evaluate_on(config, encoder, head, params, val_buckets, mesh) -> dict:
  """Segmentation metrics of the fine-tuned model on every point of the validation store."""

  def predict(params, batch):
    logits, _ = logits_fn(encoder, head, params, batch)
    return (jnp.argmax(logits, axis=-1) + 1).astype(jnp.int32)  # (B, T0) ids 1..C

  transform = input_pipeline.Transform(0, config.input.intensity_scale)
  pack_size = config.eval.batch_size // mesh.shape["data"]
  budgets = runtime.pack_budgets(config, val_buckets, pack_size, "evaluation")
  return evaluate.segmentation(
    predict, params, val_buckets, transform, budgets, mesh,
    tuple(config.class_names), config.eval.empty,
  )  # fmt: skip


def finetune_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, override_config: bool = False
) -> dict[str, Any]:
  """Fine-tunes (or linearly probes) the student of `config` in `workdir` and scores it.

  Args:
    config: a `configs/finetune.py` config.
    workdir: the run's folder (`workdir_config.record_config` keeps its config there).
    override_config: accept a restart whose config differs from the workdir's.

  Returns:
    {"state", "measurements" (the last logged), "history" (every logged
    step), "num_steps", "metrics": `evaluate.segmentation` on the validation
    store}. The metrics are also written to `workdir/metrics.json` and
    `workdir/report.md`.

  Raises:
    errors.Preempted: SIGTERM stopped the run after it saved a checkpoint.
  """
  workdir = pathlib.Path(workdir)
  config_checks.validate(config)

  # Mesh and data.
  mesh = runtime.make_mesh(config)
  data_sharding = NamedSharding(mesh, P("data"))
  iterator, buckets, val_buckets = open_data(config, data_sharding)
  runtime.check_restore_paths(config, workdir)
  workdir_config.record_config(
    config, workdir, override_config
  )  # only once the inputs are known good
  num_steps = _steps(config, len(buckets))

  # Model and optimizer, shape first, then initialised already replicated.
  encoder, head = runtime.make_model(config), make_head(config)
  tx, schedules = make_optimizer(config, num_steps, encoder)
  example = input_pipeline.example_batch(buckets, config.input, config.model.patch_size)

  abstract, state_sharding, abstract_sharded, make_state = runtime.sharded_state(
    lambda rng: init_params(encoder, head, example, rng), tx, config.seed, mesh
  )
  step_fn = jax.jit(
    functools.partial(
      update_step, encoder=encoder, head=head, tx=tx, schedules=schedules,
      frozen=config.mode == "linear", lovasz_weight=config.loss.lovasz_weight,
      seed=config.seed,
    ),
    in_shardings=(state_sharding, data_sharding),
    out_shardings=(state_sharding, NamedSharding(mesh, P())),
    donate_argnums=(0,),
  )  # fmt: skip

  # Restore: the workdir's latest, else resume, else a fresh head on the
  # init_from encoder (or a random one).
  manager = runtime.checkpoint_manager(workdir, config.checkpoint.keep)
  state = runtime.restore_checkpoint(manager, config.checkpoint.resume, abstract_sharded, iterator)
  if state is None:
    state = make_state()
    if config.checkpoint.init_from:
      state["params"]["encoder"] = load_encoder(
        config.checkpoint.init_from,
        abstract["params"]["encoder"],
        state_sharding["params"]["encoder"],
      )
  start = int(state["step"])
  logging.info(
    "%s: steps %d to %d (%d epochs of %d scans, subset %s); encoder from %s",
    config.mode, start, num_steps, config.num_epochs, len(buckets), config.subset,
    config.checkpoint.init_from or "random init",
  )  # fmt: skip

  # Loop, with the validation curve every config.eval.every steps; its last point is the
  # final evaluation.
  evaluated = {}

  def curve_point(params) -> dict:
    evaluated["metrics"] = evaluate_on(config, encoder, head, params, val_buckets, mesh)
    return {"val_miou": evaluated["metrics"]["miou"]}

  state, measurements, history = runtime.run_loop(
    state, step_fn, iterator, data_sharding, manager, workdir,
    start=start, num_steps=num_steps, log_every=config.log_every,
    checkpoint_every=config.checkpoint.every, name=config.mode,
    evaluate_fn=curve_point if config.eval.every else None, eval_every=config.eval.every,
  )  # fmt: skip

  # Evaluation on every point of the validation store, and the report.
  metrics = evaluated.get("metrics") or evaluate_on(
    config, encoder, head, state["params"], val_buckets, mesh
  )
  logging.info("%s on %s: %s", config.mode, val_buckets.path, report.describe_miou(metrics))
  if jax.process_index() == 0:
    run = {"num_steps": num_steps, "train_scans": len(buckets)}
    _write_report(config, workdir, metrics, run | {"final_train_loss": measurements.get("loss")},
                  history)  # fmt: skip
  return {
    "state": state,
    "measurements": measurements,
    "history": history,
    "num_steps": num_steps,
    "metrics": metrics,
  }


def _write_report(config, workdir: pathlib.Path, metrics: dict, run: dict, history) -> None:
  """metrics.json and report.md of a fine-tuning (or linear probing) run."""
  name = "fewshot" if config.mode == "finetune" else "linear_probe"
  summary = {
    name: metrics,
    "subset": config.subset,
    "label_fraction": config.label_fraction,
    "mode": config.mode,
    "init_from": config.checkpoint.init_from or "random init",
    **run,
  }
  report.write_report(workdir, summary, history=history, title=f"{name} ({config.subset})")
