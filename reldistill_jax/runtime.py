"""What the training loops share: mesh, model factory, state, checkpoints, the loop itself.

`train.py` (pretraining) and `finetune.py` (few-shot fine-tuning, linear
probing) are each one readable function built from these parts, and the
evaluations (`evaluation_runs.py`, `pipeline.py`) load models through them.

  make_mesh, make_model          the 1-D `data` mesh; the student of `config.model`
  sgd, weight_decay_mask         PyTorch's SGD (momentum, dampening); what decays
  split_statistics, merge, encode
                                 a student's variables: trainable parameters and
                                 BatchNorm statistics (`batch_stats`), and one
                                 forward pass that updates the statistics when training
  pack_budgets                   the pack shape fitted to a bucket store
  sharded_state                  a train state's shapes, shardings and initial value
  checkpoint_manager, save_checkpoint, restore_checkpoint, load_params
                                 orbax checkpoints of the state and the grain iterator
  find_checkpoint, check_restore_paths
                                 the checkpoint a path names (a workdir, its
                                 checkpoints/ or one checkpoints/<step>)
  run_loop                       steps, logging, checkpoints, SIGTERM, non-finite stop

The workdir's config (config.json and the restart check) is `workdir_config.py`'s.
"""

import importlib
import pathlib
import signal
import time
from collections.abc import Callable, Iterable, Mapping
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
  checkpoint_health,
  errors,
  frustum,
  input_pipeline,
  packing,
  records,
)
from reldistill_jax import metrics_writer as mw

# ----------------------------------------------------------------------------
# Mesh, model, state.
# ----------------------------------------------------------------------------


def use_compilation_cache(folder: str | pathlib.Path) -> None:
  """Keeps the programs XLA compiles in `folder` (JAX's persistent compilation cache).

  The runs of a study (`study.run_study` calls this) compile the same programs again and
  again, and a restarted study compiles what it did before: with the cache they load them
  instead. Every program
  is kept, the evaluations' many small ones too (JAX's default keeps those that compile in
  over a second). A cache already chosen (JAX_COMPILATION_CACHE_DIR, `jax.config`) is kept
  as it is. JAX reads the setting at the process's first compilation, so call this before any.
  """
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over every device (or `config.mesh.data` of them)."""
  n = config.mesh.data if config.mesh.data > 0 else jax.device_count()
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def make_model(config: ml_collections.ConfigDict):
  """The student named by `config.model.name` (a module of reldistill_jax.models)."""
  module = importlib.import_module(f"reldistill_jax.models.{config.model.name}")
  return module.from_config(config.model, jnp.dtype(config.model.dtype))


def split_statistics(tree: Mapping) -> tuple[dict, dict]:
  """(the tree without its `batch_stats` collections, those collections at their paths).

  A train state's "params" hold a student's variables, its BatchNorm statistics
  included (so evaluation and checkpoints see one tree); the optimizer and the
  gradients see only the first part.
  """
  trainable, statistics = {}, {}
  for key, value in tree.items():
    if key == "batch_stats":
      statistics[key] = value
    elif isinstance(value, Mapping):
      trainable[key], inner = split_statistics(value)
      if inner:
        statistics[key] = inner
    else:
      trainable[key] = value
  return trainable, statistics


def merge(tree: Mapping, other: Mapping) -> dict:
  """The union of two trees of dicts that `split_statistics` split."""
  out = dict(tree)
  for key, value in other.items():
    out[key] = merge(out[key], value) if key in out and isinstance(value, Mapping) else value
  return out


def encode(model, variables: Mapping, batch, train: bool, rng=None) -> tuple[Any, dict]:
  """(model.apply(variables, batch), the variables after it): in training, BatchNorm layers
  normalise by the batch and their running statistics are updated; otherwise they use
  the running statistics and nothing changes. `rng` is the "dropout" key of a model with
  stochastic layers (WaffleIron's drop path), in training only."""
  rngs = {"dropout": rng} if train and rng is not None else None
  if train and "batch_stats" in variables:
    out, updated = model.apply(variables, batch, mutable=["batch_stats"], rngs=rngs)
    return out, {**variables, **updated}
  return model.apply(variables, batch, rngs=rngs), dict(variables)


def sgd(learning_rate, momentum: float, dampening: float, weight_decay: float):
  """PyTorch's `torch.optim.SGD` (weight decay added to the gradient, then momentum with
  dampening: buf = momentum buf + (1 - dampening) grad, the first buf being the gradient
  itself), decaying only `weight_decay_mask`'s parameters. With dampening 0 it is optax's
  SGD with momentum."""

  def init(params):
    return (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

  def update(grads, state, params=None):
    del params
    buf, count = state
    buf = jax.tree.map(
      lambda b, g: jnp.where(count == 0, g, momentum * b + (1 - dampening) * g), buf, grads
    )
    return buf, (buf, count + 1)

  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
    optax.GradientTransformation(init, update),
    optax.scale_by_learning_rate(learning_rate),
  )


def weight_decay_mask(params):
  """True for the parameters that decay: no weight decay on biases, norms and other vectors."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def pack_budgets(
  config: ml_collections.ConfigDict,
  buckets: records.ShardedReader,
  scans_per_pack: int,
  name: str = "training",
  cameras_per_scan: int = 0,
) -> packing.Budgets:
  """The pack shape of `buckets`: token budgets fitted to its scans (`packing.fit_budgets`).

  Args:
    config: a run config (`model`, `input.pack_bins`).
    buckets: the bucket store.
    scans_per_pack: S, the scans of one pack.
    name: what the packs are for, in the log line.
    cameras_per_scan: the scans' crop in training (`frustum.planning_sizes`).

  Raises:
    errors.DataError: the store has fewer stages than the model, or not its kNN map.
  """
  model = make_model(config)
  stages = model.num_stages()
  if buckets.config["num_stages"] < stages:
    raise errors.DataError(
      f"{buckets.path} holds {buckets.config['num_stages']} stages, the {config.model.variant} "
      f"{config.model.name} needs {stages}; voxelise with --num_stages {stages}"
    )
  knn = model.neighbours_needed() if hasattr(model, "neighbours_needed") else 0
  if buckets.config.get("knn", 0) < knn:
    raise errors.DataError(
      f"{buckets.path} has no kNN map of {knn} neighbours, which the {config.model.name} "
      f"reads; voxelise the split again with --knn {knn}"
    )
  sizes = frustum.planning_sizes(buckets, stages, cameras_per_scan)
  if cameras_per_scan == 1 and buckets.sizes.shape[1] < 2 * buckets.config["num_stages"] + 1:
    logging.warning(
      "%s records no one-camera crop sizes (voxelised before they were): the packs are sized "
      "for whole scans; voxelise it again for packs sized for the crops", buckets.path,
    )  # fmt: skip
  budgets = packing.fit_budgets(
    sizes, scans_per_pack, config.model.patch_size, model.token_costs(),
    bins=config.input.get("pack_bins", 8),
  )  # fmt: skip
  fill = np.minimum(scans_per_pack * sizes.mean(axis=0) / np.asarray(budgets.tokens), 1.0)
  logging.info(
    "%s packs: up to %d scans, token budgets %s (a pack of %d mean scans fills %s)",
    name, budgets.scans, list(budgets.tokens), scans_per_pack,
    " / ".join(f"{f:.0%}" for f in fill),
  )  # fmt: skip
  return budgets


def sharded_state(init_params: Callable, tx, seed: int, mesh: jax.sharding.Mesh):
  """A train state {"params", "opt_state", "step"} replicated on `mesh`, shape first.

  "params" holds the student's variables; the optimizer state covers their
  trainable part (`split_statistics`).

  Args:
    init_params: `init_params(rng) -> params`.
    tx: the optimizer.
    seed: seed of the initial parameters.
    mesh: the mesh.

  Returns:
    (abstract, sharding, abstract_sharded, make): the state's shapes, its
    (replicated) shardings, the shapes carrying those shardings (orbax's restore
    target), and `make()`, the initial state built directly on the devices.
  """

  def init(rng):
    params = init_params(rng)
    opt_state = tx.init(split_statistics(params)[0])
    return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}

  replicated = NamedSharding(mesh, P())
  abstract = jax.eval_shape(init, jax.random.key(seed))
  sharding = jax.tree.map(lambda _: replicated, abstract)
  abstract_sharded = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding
  )
  make = lambda: jax.jit(init, out_shardings=sharding)(jax.random.key(seed))
  return abstract, sharding, abstract_sharded, make


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


def checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`, keeping the last `keep` checkpoints."""
  return ocp.CheckpointManager(
    (pathlib.Path(workdir) / "checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
  )


def save_checkpoint(manager, step: int, state, iterator) -> None:
  """Saves the train state and the grain iterator's position at `step` (asynchronously;
  the sizes of the checkpoints finished by then are recorded: `checkpoint_health`)."""
  with errors.storage_faults(manager.directory, "saving a checkpoint"):
    checkpoint_health.record_sizes(manager.directory)
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)
      ),
      force=True,
    )


# What a checkpoint path may name (`find_checkpoint`).
CHECKPOINT_LAYOUTS = (
  "a run's workdir (holding checkpoints/), its checkpoints/ folder, or one checkpoints/<step> "
  "folder in it"
)


def _steps(folder: pathlib.Path) -> list[int]:
  """The finished checkpoint steps in `folder`: its `<step>` subfolders (none
  where it is not a folder)."""
  if not folder.is_dir():
    return []
  return [
    int(p.name)
    for p in folder.iterdir()
    if p.name.isdigit() and p.is_dir() and ocp.utils.is_checkpoint_finalized(p)
  ]


def _resolve_checkpoint(path: pathlib.Path) -> tuple[pathlib.Path, int] | None:
  """(checkpoints folder, step) of the layouts in `CHECKPOINT_LAYOUTS`, else None."""
  for folder in (path, path / "checkpoints"):
    if steps := _steps(folder):
      return folder, max(steps)
  if path.name.isdigit() and int(path.name) in _steps(path.parent):
    return path.parent, int(path.name)
  return None


def find_checkpoint(path: str | pathlib.Path, field: str | None = None) -> tuple[pathlib.Path, int]:
  """The checkpoints/ folder and the step that `path` names.

  Args:
    path: a run's workdir or its checkpoints/ folder (their latest step), or
      one checkpoints/<step> folder (that step).
    field: the config field that gave `path`, for the message.

  Raises:
    errors.DataError: `path` is a file, does not exist or holds no finished
      checkpoint; the message names the accepted layouts and, for a path inside
      a run, the folder meant.
  """
  given = pathlib.Path(path).absolute()
  if found := _resolve_checkpoint(given):
    return found
  if given.is_file():
    what = "is a file"
  else:
    what = "holds no finished checkpoint" if given.is_dir() else "does not exist"
  hint = next(
    (f" (did you mean {p}?)" for p in list(given.parents)[:4] if _resolve_checkpoint(p)), ""
  )
  prefix = f"{field}: " if field else ""
  raise errors.DataError(f"{prefix}{path} {what}; give {CHECKPOINT_LAYOUTS}{hint}")


def restore_checkpoint(manager, resume: str | None, abstract_sharded, iterator):
  """The state (and iterator position) of the workdir's latest checkpoint, else of
  the checkpoint `resume` names (`find_checkpoint`); None when there is neither. The
  workdir's newest checkpoint that fails its checks is set aside (`checkpoint_health`).
  A checkpoint saved by another number of processes resumes too (`restore_step`)."""
  if manager.latest_step() is not None:
    step, state = checkpoint_health.restore_newest_whole(
      manager,
      lambda step: checkpoint_health.restore_step(manager, step, abstract_sharded, iterator),
    )
    logging.info("resuming from %s step %d", manager.directory, step)
    return state
  if resume:
    folder, step = find_checkpoint(resume, "config.checkpoint.resume")
    logging.info("resuming from %s step %d", folder, step)
    manager = ocp.CheckpointManager(folder)
    return checkpoint_health.restore_step(manager, step, abstract_sharded, iterator)
  return None


def check_restore_paths(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Fails on a `checkpoint.resume` or `checkpoint.init_from` that names no
  checkpoint, before a run records its config; a restart from the workdir's own
  checkpoints reads neither, so neither is checked then."""
  if _steps(pathlib.Path(workdir) / "checkpoints"):
    return
  for field in ("resume", "init_from"):  # the restore order: the first set one is read
    if config.checkpoint.get(field):
      find_checkpoint(config.checkpoint[field], f"config.checkpoint.{field}")
      return


def load_params(
  checkpoints: str | pathlib.Path,
  sharding: jax.sharding.Sharding | None = None,
  field: str | None = None,
):
  """The student parameters of a checkpoint.

  Args:
    checkpoints: a run's workdir or its checkpoints/ folder (the latest
      step), or one checkpoints/<step> folder (`find_checkpoint`).
    sharding: where to put every array (a checkpoint written on other devices needs one);
      None: the devices the checkpoint was written from.
    field: the config field that gave `checkpoints`, for the error message.
  """
  folder, step = find_checkpoint(checkpoints, field)
  manager = ocp.CheckpointManager(folder, item_handlers={"state": ocp.StandardCheckpointHandler()})
  target = None
  if sharding is not None:
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      manager.item_metadata(step)["state"],
    )
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"]["params"]


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


class StopRequest:
  """Set by SIGTERM: the loop saves a checkpoint and raises `errors.Preempted`.

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


def run_loop(
  state,
  step_fn,
  iterator: Iterable,
  data_sharding,
  manager: ocp.CheckpointManager,
  workdir: pathlib.Path,
  *,
  start: int,
  num_steps: int,
  log_every: int,
  checkpoint_every: int,
  name: str,
  evaluate_fn=None,
  eval_every: int = 0,
):
  """The training loop shared by pretraining and fine-tuning.

  Runs `step_fn(state, batch) -> (state, measurements)` from step `start` to
  `num_steps`: measurements every `log_every` steps to TensorBoard, the
  run's history and one console line (`step_time`: the mean over the steps
  since the last line; the first step's time, which holds the compilation, is
  `compile_time` instead), checkpoints every `checkpoint_every`
  steps and at the end; `evaluate_fn(params) -> scalars` every `eval_every`
  steps and at the end (the curves, `curves.py`), written the same way.

  Returns:
    (state, last measurements, history of logged measurements). The history
    holds the steps logged before a restart too, so a finished run rerun for
    nothing still returns its last measurements.

  Raises:
    errors.Preempted: after SIGTERM, once the checkpoint is saved.
    errors.Diverged: a non-finite loss, naming the step and the batch's samples.
  """
  writer = mw.MetricWriter(workdir, start, name, enabled=jax.process_index() == 0)
  several = jax.process_count() > 1
  previous = None if several else signal.signal(signal.SIGTERM, StopRequest.handler)
  StopRequest.requested = stop = False
  measurements, pending, t0, timed, first = {}, None, time.perf_counter(), 0, {}
  try:
    # Implicit host <-> device transfers fail loudly; the loop's are explicit.
    with jax.transfer_guard("disallow"):
      for step in range(start, num_steps):
        batch = next(iterator)
        tokens = batch["token"]
        state, out = step_fn(state, input_pipeline.to_device(batch, data_sharding))
        if step == start:  # its time is the compilation's: kept apart from the step times
          jax.block_until_ready(out)
          first["compile_time"] = time.perf_counter() - t0
          logging.info("%s: compiled and ran the first step in %.1f s", name, first["compile_time"])
          t0, timed = time.perf_counter(), -1
        timed += 1
        # The previous step's loss is checked while this one runs.
        if pending is not None:
          check_finite(*pending)
        pending = (out, step + 1, tokens)
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
          check_finite(*pending)
          measurements = {k: float(v) for k, v in jax.device_get(out).items()}
          if timed:
            measurements["step_time"] = (time.perf_counter() - t0) / timed
          if "pairs" in measurements and timed:
            measurements["pairs_per_second"] = measurements["pairs"] / measurements["step_time"]
          writer.write(step + 1, measurements | first, num_steps)
          t0, timed, first = time.perf_counter(), 0, {}
        last = step + 1 == num_steps
        if evaluate_fn is not None and ((step + 1) % eval_every == 0 or last):
          with jax.transfer_guard("allow"):  # the evaluation reads results on the host
            writer.write(step + 1, evaluate_fn(state["params"]), num_steps)
        if several:
          stop = multihost_utils.reached_preemption_sync_point(step + 1)
        else:
          stop = StopRequest.requested
        if (step + 1) % checkpoint_every == 0 or last or stop:
          save_checkpoint(manager, step + 1, state, iterator)
        if stop:
          manager.wait_until_finished()
          raise errors.Preempted(step + 1)
    if pending is not None:
      check_finite(*pending)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    try:
      with errors.storage_faults(manager.directory, "saving a checkpoint"):
        manager.wait_until_finished()
        checkpoint_health.record_sizes(manager.directory)
    finally:
      writer.close()
  history = writer.history
  if not measurements and history:  # nothing left to run: the last logged step
    measurements = {k: v for k, v in history[-1].items() if k != "step"}
  return state, measurements, history


def check_finite(out, step: int, tokens) -> None:
  """Stops the run on a non-finite loss, naming the step and the batch's samples."""
  loss = float(jax.device_get(out["loss"]))
  if not np.isfinite(loss):
    names = [t.decode() if isinstance(t, bytes) else str(t) for t in np.asarray(tokens).ravel()]
    raise errors.Diverged(
      f"non-finite loss {loss} at step {step}; batch samples: {names}. Lower "
      "config.optimizer.lr (or set config.optimizer.clip_norm), or check those samples"
    )
