"""The pretraining loop: distil a frozen 2D teacher into the 3D student.

Read top to bottom: mesh -> data -> model and optimizer (shape first, then
initialised sharded) -> update step -> restore -> loop. The teacher never
enters the train state: its features come from the offline feature store.

The train state is a plain pytree {"params", "opt_state", "step"}; a
checkpoint also holds the grain iterator state, so a resumed run sees exactly
the batches an uninterrupted one would. Restore order: the workdir's latest
checkpoint, else `config.checkpoint.resume` (a checkpoint folder), else
`config.checkpoint.init_from` (encoder parameters only).
"""

import functools
import importlib
import pathlib
import signal
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reldistill_jax import (
  distributed,
  feature_store,
  input_pipeline,
  pairs,
  records,
  serialization,
  sharded_losses,
)
from reldistill_jax import metrics_writer as mw


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over every device (or `config.mesh.data` of them)."""
  n = config.mesh.data if config.mesh.data > 0 else jax.device_count()
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def make_model(config: ml_collections.ConfigDict):
  """The student named by `config.model.name` (a module of reldistill_jax.models)."""
  module = importlib.import_module(f"reldistill_jax.models.{config.model.name}")
  return module.Model(
    variant=config.model.variant,
    out_dim=config.model.out_dim,
    patch_size=config.model.patch_size,
    num_curves=config.model.num_curves,
    dtype=jnp.dtype(config.model.dtype),
  )


def weight_decay_mask(params):
  """True for the parameters that decay: no weight decay on biases, norms and other vectors."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
  """Optimizer and learning-rate schedule of `config.optimizer` (PROTOCOLS.md section 6)."""
  opt = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, opt.lr, min(opt.warmup_steps, max(config.num_steps - 1, 1)), max(config.num_steps, 2)
  )
  if opt.name == "adamw":
    core = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=weight_decay_mask)
  elif opt.name == "sgd":
    core = optax.chain(
      optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask),
      optax.sgd(schedule, momentum=opt.momentum),
    )
  else:
    raise ValueError(f"config.optimizer.name: unknown optimizer {opt.name!r} (adamw or sgd)")
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


def open_data(config: ml_collections.ConfigDict, process_index: int, process_count: int):
  """The training dataset of this process (`process_dataset`) and the stores behind it."""
  inp = config.input
  buckets = records.ShardedReader(inp.buckets, {"bucket_version": serialization.BUCKET_VERSION})
  store = feature_store.FeatureStore(
    inp.features, {"teacher": config.teacher, "feature_dim": config.model.out_dim}
  )
  transform = input_pipeline.Transform(
    buckets.config,
    inp.capacity,
    inp.num_pairs,
    inp.intensity_scale,
    grid=tuple(store.config["grid"]),
    augment=input_pipeline.Augment(inp.augment.rotate, inp.augment.flip, tuple(inp.augment.scale)),
  )
  ds = process_dataset(buckets, store, transform, config, process_index, process_count)
  return ds, buckets, store


def process_dataset(
  buckets: records.ShardedReader,
  store: feature_store.FeatureStore | None,
  transform: input_pipeline.Transform,
  config: ml_collections.ConfigDict,
  process_index: int,
  process_count: int,
) -> grain.IterDataset:
  """Block `process_index` of `process_count` of every global batch, read ahead.

  Global batch j (`config.input.batch_size` examples) is the per-process
  batches j * count ... (j + 1) * count - 1 of one shuffled, augmented stream,
  so each process loads and augments only its own block, and the examples are
  those of one process reading whole global batches.
  """
  inp = config.input
  if inp.batch_size % process_count:
    raise ValueError(
      f"config.input.batch_size {inp.batch_size} is not divisible by {process_count} processes"
    )
  per_process = inp.batch_size // process_count
  ds = input_pipeline.dataset(buckets, store, transform, per_process, seed=config.seed)
  ds = ds[process_index::process_count]
  options = grain.ReadOptions(num_threads=inp.num_threads, prefetch_buffer_size=inp.prefetch)
  return ds.to_iter_dataset(options)


def check_patch_size(config: ml_collections.ConfigDict, buckets: records.ShardedReader) -> None:
  """Fails when the model's patch size is not the one the buckets were serialised for."""
  if config.model.patch_size != buckets.config["patch_size"]:
    raise ValueError(
      f"config.model.patch_size {config.model.patch_size} differs from the buckets' "
      f"{buckets.config['patch_size']} ({buckets.path})"
    )


def update_step(state, batch, *, model, tx, loss_fn, schedule):
  """One optimizer step; returns the new state and its measurements."""

  def objective(params):
    features, _ = model.apply(params, batch)
    k, q, mask = pairs.batch_pairs(features, batch)
    out = loss_fn(k, q, mask)
    return out["loss"], (out, mask.sum())

  (_, (parts, num_pairs)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  measurements = {
    **{f"loss/{k}" if k != "loss" else "loss": v for k, v in parts.items()},
    "grad_norm": optax.tree.norm(grads),
    "param_norm": optax.tree.norm(params),
    "update_norm": optax.tree.norm(updates),
    "learning_rate": schedule(state["step"]),
    "pairs": num_pairs,
  }
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, measurements


class StopRequest:
  """Set by SIGTERM: the loop saves a checkpoint and returns.

  With several processes SIGTERM is left to JAX's preemption service instead (installed by
  `jax.distributed.initialize`): a notice to any process makes every process stop after the
  same step (`multihost_utils.reached_preemption_sync_point`), so none waits in a collective
  for another that stopped.
  """

  requested = False

  @classmethod
  def handler(cls, signum, frame):
    del signum, frame
    cls.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains the student of `config` in `workdir`; returns the last measurements."""
  workdir = pathlib.Path(workdir)

  # Mesh.
  mesh = make_mesh(config)
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))

  # Data.
  if config.input.batch_size % mesh.shape["data"]:
    raise ValueError(
      f"config.input.batch_size {config.input.batch_size} is not divisible by the "
      f"{mesh.shape['data']} devices of the data axis"
    )
  # This process's block of every global batch: the rows its devices hold on the data axis.
  iterator_ds, buckets, _ = open_data(
    config, *distributed.batch_slice(data_sharding, config.input.batch_size)
  )
  iterator = iter(iterator_ds)
  check_patch_size(config, buckets)
  workdir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known good

  # Model and optimizer, shape first, then initialised already replicated.
  model = make_model(config)
  tx, schedule = make_optimizer(config)
  example = input_pipeline.Transform(
    buckets.config, config.input.capacity, 0, config.input.intensity_scale
  )(buckets[0])
  example = {k: v[None] for k, v in example.items() if k not in input_pipeline.HOST_KEYS}

  def init(rng):
    params = model.init(rng, example)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  loss_fn = make_loss(config, mesh)
  step_fn = jax.jit(
    functools.partial(update_step, model=model, tx=tx, loss_fn=loss_fn, schedule=schedule),
    in_shardings=(state_sharding, data_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )

  # Restore: the workdir's latest, else resume, else init_from (encoder only).
  manager = checkpoint_manager(workdir, config.checkpoint.keep)
  abstract_sharded = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
  )
  state = _restore(manager, config, abstract_sharded, iterator, init, state_sharding)
  start = int(state["step"])
  logging.info("training from step %d to %d on %s", start, config.num_steps, mesh)

  # Loop.
  state, measurements, history, _ = run_loop(
    state, step_fn, iterator, data_sharding, manager, workdir,
    start=start, num_steps=config.num_steps, log_every=config.log_every,
    checkpoint_every=config.checkpoint.every,
  )  # fmt: skip
  return {"state": state, "measurements": measurements, "model": model, "history": history}


def run_loop(
  state,
  step_fn,
  iterator,
  data_sharding,
  manager: ocp.CheckpointManager,
  workdir: pathlib.Path,
  *,
  start: int,
  num_steps: int,
  log_every: int,
  checkpoint_every: int,
):
  """The training loop shared by pretraining and fine-tuning.

  Runs `step_fn(state, batch) -> (state, measurements)` from step `start` to
  `num_steps`: measurements every `log_every` steps to TensorBoard and the
  console, checkpoints every `checkpoint_every` steps, at the end, and on
  SIGTERM (which then stops the loop); a non-finite loss stops it naming the
  step and the batch's samples.

  Returns:
    (state, last measurements, history of logged measurements, whether a
    SIGTERM stopped the loop).
  """
  writer = mw.MetricWriter(workdir, enabled=jax.process_index() == 0)
  several = jax.process_count() > 1
  previous = None if several else signal.signal(signal.SIGTERM, StopRequest.handler)
  StopRequest.requested = stop = False
  measurements, pending, t0 = {}, None, time.perf_counter()
  try:
    # Implicit host <-> device transfers fail loudly; the loop's are explicit.
    with jax.transfer_guard("disallow"):
      for step in range(start, num_steps):
        batch = next(iterator)
        tokens = batch["token"]
        state, out = step_fn(state, input_pipeline.to_device(batch, data_sharding))
        # The previous step's loss is checked while this one runs.
        if pending is not None:
          check_finite(*pending)
        pending = (out, step + 1, tokens)
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
          check_finite(*pending)
          measurements = {k: float(v) for k, v in jax.device_get(out).items()}
          measurements["step_time"] = (time.perf_counter() - t0) / log_every
          if "pairs" in measurements:
            measurements["pairs_per_second"] = measurements["pairs"] / measurements["step_time"]
          writer.write(step + 1, measurements, num_steps)
          t0 = time.perf_counter()
        last = step + 1 == num_steps
        if several:
          stop = multihost_utils.reached_preemption_sync_point(step + 1)
        else:
          stop = StopRequest.requested
        if (step + 1) % checkpoint_every == 0 or last or stop:
          save_checkpoint(manager, step + 1, state, iterator)
        if stop:
          logging.warning("SIGTERM: saved step %d, stopping", step + 1)
          break
    if pending is not None:
      check_finite(*pending)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    manager.wait_until_finished()
    writer.close()
  return state, measurements, writer.history, stop


def checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`, keeping the last `keep` checkpoints."""
  return ocp.CheckpointManager(
    (workdir / "checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
  )


def save_checkpoint(manager, step: int, state, iterator) -> None:
  """Saves the train state and the grain iterator's position at `step`."""
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
    ),
    force=True,
  )


def restore_checkpoint(manager, resume: str | None, abstract_sharded, iterator):
  """The state (and iterator position) of the workdir's latest checkpoint, else of
  the latest in the folder `resume`; None when there is neither."""
  args = lambda: ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract_sharded),
    data=grain.checkpoint.CheckpointRestore(iterator),
  )
  if manager.latest_step() is not None:
    logging.info("resuming from %s step %d", manager.directory, manager.latest_step())
    return manager.restore(manager.latest_step(), args=args())["state"]
  if resume:
    other = ocp.CheckpointManager(pathlib.Path(resume).absolute())
    if other.latest_step() is None:
      raise FileNotFoundError(f"config.checkpoint.resume: no checkpoint in {resume}")
    return other.restore(other.latest_step(), args=args())["state"]
  return None


def _restore(manager, config, abstract_sharded, iterator, init, state_sharding):
  """The state to start from (module docstring: restore order)."""
  state = restore_checkpoint(manager, config.checkpoint.resume, abstract_sharded, iterator)
  if state is not None:
    return state
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(config.seed))
  if config.checkpoint.init_from:
    # Read straight onto this run's mesh: any device count, any number of processes.
    replicated = jax.tree.leaves(state_sharding["params"])[0]
    state["params"] = load_params(config.checkpoint.init_from, replicated)
  return state


def load_params(checkpoints: str | pathlib.Path, sharding: jax.sharding.Sharding | None = None):
  """The student parameters of the latest checkpoint in a checkpoint folder.

  Args:
    checkpoints: the folder.
    sharding: where to put every array (a checkpoint written on other devices needs one);
      None: the devices the checkpoint was written from.
  """
  manager = ocp.CheckpointManager(
    pathlib.Path(checkpoints).absolute(), item_handlers={"state": ocp.StandardCheckpointHandler()}
  )
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{checkpoints}: no checkpoint to take parameters from")
  target = None
  if sharding is not None:
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      manager.item_metadata(step)["state"],
    )
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"]["params"]


def check_finite(out, step: int, tokens) -> None:
  """Stops the run on a non-finite loss, naming the step and the batch's samples."""
  loss = float(jax.device_get(out["loss"]))
  if not np.isfinite(loss):
    names = [t.decode() if isinstance(t, bytes) else str(t) for t in np.asarray(tokens).ravel()]
    raise FloatingPointError(f"non-finite loss {loss} at step {step}; batch samples: {names}")
