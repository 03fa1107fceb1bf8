"""The config a run was started with, kept in its workdir, and the check on a restart.

`record_config` writes `workdir/config.json` on a first start; every change
accepted on a restart goes to `workdir/config_changes.jsonl`. A restart whose
config differs in a field that changes the result is refused naming every such
field, unless `override` is set (`--override_config`). Fields that only extend
(`EXTENDS`) or observe (`OBSERVES`) a run may change. A field added to the
configs after a run was started (`LEGACY_FIELDS`) is no change at the value that
behaves as that run did.
"""

import datetime
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from reldistill_jax import errors, files, workdir_lock

# Fields added to the configs after runs were started without them, and the value that
# behaves as those runs did: a restart with that value is no change.
LEGACY_FIELDS = {
  "head": "linear",
  "input.cameras_per_scan": 0,
  "input.augment.flip_one": 0.0,
  "data.voxel.knn": 0,
  "data.teacher.confusion": 0.55,
  "data.teacher.noise": 0.35,
}
CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
# Fields that only extend or observe a run: they may change on a restart (logged).
EXTENDS = ("num_steps", "num_epochs")
OBSERVES = (
  "log_every",
  "checkpoint.every",
  "checkpoint.keep",
  "input.num_threads",
  "input.prefetch",
  "eval.batch_size",
  "eval.every",
)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out |= _flatten(value, f"{name}.")
    else:
      out[name] = value
  return out


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (tuples as lists), as config.json holds it."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def may_change(kind: str | None) -> tuple[str, ...]:
  """The fields of a config of `kind` that a restart may change (module docstring)."""
  if kind == "default":
    # Extending one stage of the default would leave later stages stale: only observers.
    runs = [f"{run}.{field}" for run in ("pretrain", "finetune") for field in OBSERVES]
    return (*runs, "eval.batch_size", "data.workers")
  return (*EXTENDS, *OBSERVES)


def _legacy_value(key: str) -> tuple:
  """(the old behaviour's value,) of a `LEGACY_FIELDS` key, also inside a run (the default's
  `pretrain.`, `finetune.`); () for other keys."""
  for field, value in LEGACY_FIELDS.items():
    if key == field or key.endswith("." + field):
      return (value,)
  return ()


def record_config(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, override: bool = False
) -> None:
  """Writes `workdir/config.json` on a first start; on a restart, checks the config against it.

  Raises:
    errors.ConfigError: the config differs from the workdir's in a field that
      changes the result (each one named), and `override` is not set.
  """
  workdir = pathlib.Path(workdir)
  path, changes_path = workdir / CONFIG_FILE, workdir / CONFIG_CHANGES_FILE
  current = _flatten(config_dict(config))
  writer = jax.process_index() == 0
  if not path.is_file():
    if writer:
      workdir.mkdir(parents=True, exist_ok=True)
      workdir_lock.take(workdir)  # where the entry point deferred it (a new workdir)
      files.atomic_write(path, json.dumps(config_dict(config), indent=1) + "\n")
    return
  effective = _flatten(json.loads(path.read_text()))
  if changes_path.is_file():
    for line in changes_path.read_text().splitlines():
      effective |= {k: new for k, (_, new) in json.loads(line)["fields"].items()}
  for key, value in current.items():  # fields newer than the run, at their old behaviour
    if key not in effective and _legacy_value(key) == (value,):
      effective[key] = value
  differ = {
    k: (effective.get(k, "<absent>"), current.get(k, "<absent>"))
    for k in sorted(set(effective) | set(current))
    if effective.get(k, "<absent>") != current.get(k, "<absent>")
  }
  if not differ:
    return
  allowed = may_change(config.get("kind"))
  refused = [k for k in differ if k not in allowed]
  described = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items())
  if refused and not override:
    raise errors.ConfigError(
      f"{workdir} was started with another config ({len(refused)} field(s) that change the "
      f"result differ: {', '.join(refused)}; {described}): use another --workdir, set those "
      "fields back, or pass --override_config to continue with the new values"
    )
  logging.log(
    logging.WARNING if refused else logging.INFO,
    "%s: config changed on restart%s: %s",
    workdir,
    " (--override_config)" if refused else "",
    described,
  )
  if writer:
    entry = {
      "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "override": bool(refused),
      "fields": {k: list(v) for k, v in differ.items()},
    }
    with changes_path.open("a") as f:
      f.write(json.dumps(entry) + "\n")
