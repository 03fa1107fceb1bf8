"""The pretraining loop: distil a frozen 2D teacher into the 3D student.

Read top to bottom: checks -> mesh -> data -> model and optimizer (shape
first, then initialised sharded) -> update step -> restore -> loop. The
teacher never enters the train state: its features come from the offline
feature store. What the loops share (mesh, model, checkpoints, the loop
itself, the config kept in the workdir) is in `runtime.py`.

The train state is a plain pytree {"params", "opt_state", "step"}; a
checkpoint also holds the grain iterator state, so a resumed run sees exactly
the batches an uninterrupted one would. Restore order: the workdir's latest
checkpoint, else `config.checkpoint.resume` (`runtime.find_checkpoint`), else
`config.checkpoint.init_from` (encoder parameters only).
"""

import functools
import pathlib
from typing import Any

import jax
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reldistill_jax import (
  config_checks,
  curves,
  distributed,
  feature_store,
  input_pipeline,
  pairs,
  records,
  runtime,
  serialization,
  sharded_losses,
  workdir_config,
)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
  """Optimizer and learning-rate schedule of `config.optimizer` (PROTOCOLS.md section 6)."""
  opt = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, opt.lr, min(opt.warmup_steps, max(config.num_steps - 1, 1)), max(config.num_steps, 2)
  )
  if opt.name == "adamw":
    core = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=runtime.weight_decay_mask)
  elif opt.name == "sgd":
    core = runtime.sgd(schedule, opt.momentum, opt.get("dampening", 0.0), opt.weight_decay)
  else:
    raise ValueError(f"config.optimizer.name: unknown optimizer {opt.name!r}")
  tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), core) if opt.clip_norm else core
  return tx, schedule


def make_loss(config: ml_collections.ConfigDict, mesh):
  """loss(k, q, mask) -> dict of means, sharded over the mesh."""
  cfg = config.loss
  if cfg.name == "relational":
    return functools.partial(
      sharded_losses.relational_loss,
      w_cross=cfg.w_cross,
      w_intra=cfg.w_intra,
      diagonal=cfg.diagonal,
      distance=cfg.distance,
      mesh=mesh,
      implementation=cfg.implementation,
    )
  if cfg.name == "contrastive":
    return functools.partial(
      sharded_losses.contrastive_loss, temperature=cfg.temperature, mesh=mesh
    )
  if cfg.name == "similarity":
    return functools.partial(sharded_losses.similarity_loss, variant=cfg.similarity, mesh=mesh)
  raise ValueError(f"config.loss.name: unknown loss {cfg.name!r}")


def open_data(config: ml_collections.ConfigDict, data_sharding):
  """This process's packed training batches (`input_pipeline.process_dataset`) and the stores.

  Args:
    config: the run's config.
    data_sharding: the batch sharding: the packs of a step split over its `data` axis.

  Returns:
    (dataset, buckets, store, budgets).
  """
  inp = config.input
  buckets = records.ShardedReader(inp.buckets, {"bucket_version": serialization.BUCKET_VERSION})
  store = feature_store.FeatureStore(
    inp.features,
    {"teacher": config.teacher, "dense": config.dense, "feature_dim": config.model.out_dim},
  )
  crop = inp.get("cameras_per_scan", 0)
  budgets = runtime.pack_budgets(config, buckets, inp.pack_size, cameras_per_scan=crop)
  transform = input_pipeline.Transform(
    inp.num_pairs,
    inp.intensity_scale,
    grid=tuple(store.config["grid"]),
    augment=input_pipeline.Augment.from_config(inp.augment),
    cameras_per_scan=crop,
  )
  # This process's block of every step's packs: the rows its devices hold.
  packs = inp.batch_size // inp.pack_size
  index, count = distributed.batch_slice(data_sharding, packs)
  ds = input_pipeline.process_dataset(
    buckets, store, transform, budgets, inp, config.seed, index, count, packs // count
  )
  return ds, buckets, store, budgets


def update_step(state, batch, *, model, tx, loss_fn, schedule):
  """One optimizer step; returns the new state and its measurements."""
  trainable, statistics = runtime.split_statistics(state["params"])

  def objective(params):
    (features, _), variables = runtime.encode(
      model, runtime.merge(params, statistics), batch, train=True
    )
    k, q, mask = pairs.batch_pairs(features, batch)
    out = loss_fn(k, q, mask)
    return out["loss"], (out, mask.sum(), variables)

  (_, (parts, num_pairs, variables)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, state["opt_state"], trainable)
  trainable = optax.apply_updates(trainable, updates)
  measurements = {
    **{f"loss/{k}" if k != "loss" else "loss": v for k, v in parts.items()},
    "grad_norm": optax.tree.norm(grads),
    "param_norm": optax.tree.norm(trainable),
    "update_norm": optax.tree.norm(updates),
    "learning_rate": schedule(state["step"]),
    "pairs": num_pairs,
  }
  params = runtime.merge(trainable, runtime.split_statistics(variables)[1])
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, measurements


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, override_config: bool = False
) -> dict[str, Any]:
  """Pretrains the student of `config` in `workdir`.

  Args:
    config: a `configs/pretrain.py` config.
    workdir: the run's folder (`workdir_config.record_config` keeps its config there).
    override_config: accept a restart whose config differs from the workdir's.

  Returns:
    {"state", "measurements" (the last logged step), "model", "history"}.

  Raises:
    errors.Preempted: SIGTERM stopped the run after it saved a checkpoint.
  """
  workdir = pathlib.Path(workdir)
  config_checks.validate(config)

  # Mesh.
  mesh = runtime.make_mesh(config)
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))

  # Data: this process's packs of every step, one per device.
  iterator_ds, buckets, _, _ = open_data(config, data_sharding)
  iterator = iter(iterator_ds)
  model = runtime.make_model(config)
  evaluate_fn = curves.make_evaluator(config, model, mesh)
  runtime.check_restore_paths(config, workdir)
  workdir_config.record_config(
    config, workdir, override_config
  )  # only once the inputs are known good

  # Model and optimizer, shape first, then initialised already replicated.
  tx, schedule = make_optimizer(config)
  example = input_pipeline.example_batch(buckets, config.input, config.model.patch_size)

  _, state_sharding, abstract_sharded, make_state = runtime.sharded_state(
    lambda rng: model.init(rng, example), tx, config.seed, mesh
  )
  loss_fn = make_loss(config, mesh)
  step_fn = jax.jit(
    functools.partial(update_step, model=model, tx=tx, loss_fn=loss_fn, schedule=schedule),
    in_shardings=(state_sharding, data_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )

  # Restore: the workdir's latest, else resume, else init_from (encoder only).
  manager = runtime.checkpoint_manager(workdir, config.checkpoint.keep)
  state = runtime.restore_checkpoint(manager, config.checkpoint.resume, abstract_sharded, iterator)
  if state is None:
    state = make_state()
    if config.checkpoint.init_from:
      # Read straight onto this run's mesh: any device count, any number of processes.
      state["params"] = runtime.load_params(
        config.checkpoint.init_from, replicated, field="config.checkpoint.init_from"
      )
  start = int(state["step"])
  logging.info("pretrain: steps %d to %d on %d device(s)", start, config.num_steps, mesh.size)

  # Loop, with the zero-shot curves every config.eval.every steps.
  state, measurements, history = runtime.run_loop(
    state, step_fn, iterator, data_sharding, manager, workdir,
    start=start, num_steps=config.num_steps, log_every=config.log_every,
    checkpoint_every=config.checkpoint.every, name="pretrain",
    evaluate_fn=evaluate_fn, eval_every=config.eval.every,
  )  # fmt: skip
  return {"state": state, "measurements": measurements, "model": model, "history": history}
