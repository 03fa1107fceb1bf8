"""A run resumes from its newest checkpoint that is whole, and keeps a damaged one aside.

A cluster leaves checkpoints behind that orbax cannot read: a chunk file cut
short by a full disk or a node lost mid-copy, a metadata file gone, an
iterator file deleted. Before a run restores, `restore_newest_whole` checks its
checkpoints newest first:

  * the files every checkpoint has (`REQUIRED`), its `state/_METADATA` and its
    iterator files `data/process_<i>-of-<n>.json` (one per process that saved
    it, all at one position: `iterator_state`) readable as JSON;
  * every file against the size it had once the save was complete
    (`SIZES_FILE`, written by `record_sizes` after each save);
  * then the restore itself.

The first checkpoint that passes is restored (`restore_step`: on any number of
processes). Every newer one that failed is
logged in one warning (the step and the file) and moved to
`checkpoints/damaged/<step>`, never deleted. When none passes, nothing is
moved and the run stops with one line listing each step's fault.
"""

import json
import pathlib
import shutil
from collections.abc import Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from reldistill_jax import errors, files

# Written into every finished step folder: {relative path: bytes}.
SIZES_FILE = "file_sizes.json"
DAMAGED = "damaged"
REQUIRED = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")


def _finished_steps(folder: pathlib.Path) -> list[int]:
  if not folder.is_dir():
    return []
  return sorted(
    int(p.name)
    for p in folder.iterdir()
    if p.name.isdigit() and p.is_dir() and ocp.utils.is_checkpoint_finalized(p)
  )


def record_sizes(folder: str | pathlib.Path) -> None:
  """Writes `SIZES_FILE` into every finished step folder of `folder` that lacks one
  (process 0 only; the others' files are on the same file system or their own)."""
  if jax.process_index() != 0:
    return
  folder = pathlib.Path(folder)
  for step in _finished_steps(folder):
    step_dir = folder / str(step)
    if (step_dir / SIZES_FILE).exists():
      continue
    sizes = {
      str(p.relative_to(step_dir)): p.stat().st_size
      for p in sorted(step_dir.rglob("*"))
      if p.is_file() and p.name != SIZES_FILE
    }
    files.atomic_write(step_dir / SIZES_FILE, json.dumps(sizes, indent=0))


def _json_fault(path: pathlib.Path) -> str | None:
  try:
    json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return f"{path} cannot be read ({errors.one_line(e)})"
  return None


def fault(step_dir: str | pathlib.Path) -> str | None:
  """What is wrong with one checkpoint folder, naming the file; None when it looks whole."""
  step_dir = pathlib.Path(step_dir)
  for name in REQUIRED:
    if not (step_dir / name).is_file():
      return f"{step_dir / name} is missing"
  if found := _json_fault(step_dir / "state" / "_METADATA"):
    return found
  try:
    iterator_state(step_dir / "data")
  except errors.DataError as e:
    return str(e)
  sizes_path = step_dir / SIZES_FILE
  if not sizes_path.is_file():
    return None  # saved before its sizes were recorded: the restore checks the rest
  if found := _json_fault(sizes_path):
    return found
  for name, size in json.loads(sizes_path.read_text()).items():
    path = step_dir / name
    if not path.is_file():
      return f"{path} is missing"
    if path.stat().st_size != size:
      return f"{path} holds {path.stat().st_size} bytes, {size} when it was saved"
  return None


def iterator_state(data: pathlib.Path) -> tuple[dict, int]:
  """(the iterator state, the number of processes that saved it) of a checkpoint's `data`
  folder: one `process_<i>-of-<n>.json` per saving process, all at the same position.

  Raises:
    errors.DataError: no iterator file, a missing or unreadable one, or processes that
      stopped at different positions; naming the file.
  """
  paths = sorted(data.glob("process_*-of-*.json"))
  if not paths:
    raise errors.DataError(f"{data} holds no iterator file (process_<i>-of-<n>.json)")
  count = int(paths[0].stem.rsplit("-of-", 1)[1])
  states = []
  for i in range(count):
    path = data / f"process_{i}-of-{count}.json"
    if not path.is_file():
      raise errors.DataError(f"{path} is missing")
    if found := _json_fault(path):
      raise errors.DataError(found)
    states.append(json.loads(path.read_text()))
  if any(state != states[0] for state in states):
    raise errors.DataError(
      f"{data}: its {count} processes stopped at different positions ({states}); resume it "
      f"with {count} processes"
    )
  return states[0], count


def restore_step(manager, step: int, abstract_sharded, iterator):
  """The state of checkpoint `step`, with `iterator` moved to its position.

  Every process's iterator stands at the same index of its slice of the global batches
  (`input_pipeline.process_dataset`), so a checkpoint saved by P processes resumes on
  any number: the state is resharded onto this run's mesh by orbax, and each process
  takes the index the saving processes agree on (`iterator_state`).
  """
  data = pathlib.Path(manager.directory) / str(step) / "data"
  own = data / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  state = ocp.args.StandardRestore(abstract_sharded)
  if own.is_file():
    args = ocp.args.Composite(state=state, data=grain.checkpoint.CheckpointRestore(iterator))
    return manager.restore(step, args=args)["state"]
  position, saved_by = iterator_state(data)
  restored = manager.restore(step, args=ocp.args.Composite(state=state))["state"]
  iterator.set_state(position)
  logging.info(
    "checkpoint step %d was saved by %d process(es), this run has %d: every process resumes "
    "at the same global batch", step, saved_by, jax.process_count(),
  )  # fmt: skip
  return restored


def _move_aside(folder: pathlib.Path, step: int) -> pathlib.Path:
  """Moves checkpoint `step` to folder/damaged/<step> (a suffix when that exists)."""
  target = folder / DAMAGED / str(step)
  suffix = 1
  while target.exists():
    suffix += 1
    target = folder / DAMAGED / f"{step}-{suffix}"
  target.parent.mkdir(exist_ok=True)
  shutil.move(folder / str(step), target)
  return target


def restore_newest_whole(manager, restore: Callable[[int], dict]) -> tuple[int, dict]:
  """(step, restored) of the newest checkpoint of `manager` that passes (module docstring).

  Args:
    manager: the run's orbax CheckpointManager (reloaded after a move).
    restore: step -> the restored state (`restore_step`).

  Raises:
    errors.DataError: no checkpoint passes; the line lists each step's fault.
  """
  folder = pathlib.Path(manager.directory)
  faults = []
  for step in sorted(manager.all_steps(), reverse=True):
    found = fault(folder / str(step))
    if found is None:
      try:
        restored = restore(step)
      except Exception as e:  # orbax and tensorstore raise many kinds on damaged files
        found = f"{folder / str(step)} cannot be restored ({errors.one_line(e)})"
    if found is not None:
      faults.append((step, found))
      continue
    if faults:
      _set_aside(manager, folder, faults, step)
    return step, restored
  listed = "; ".join(f"step {s}: {why}" for s, why in faults)
  raise errors.DataError(
    f"{folder}: no checkpoint can be restored ({listed}); put back a copy of the checkpoints, "
    "or start afresh in another --workdir"
  )


def _set_aside(manager, folder: pathlib.Path, faults, step: int) -> None:
  """Moves the damaged checkpoints newer than `step` aside (process 0), then reloads."""
  if jax.process_index() == 0:
    for bad, why in faults:
      target = _move_aside(folder, bad)
      logging.warning(
        "checkpoint step %d is damaged: %s; moved to %s, resuming from step %d",
        bad, why, target, step,
      )  # fmt: skip
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoints set aside")
  manager.reload()
