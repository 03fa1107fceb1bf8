"""What the loss study keeps of each finished unit (`--records`): a few small files.

A sweep trial, the supervised bound, a from-scratch baseline, a run with its OOD
fine-tuning: their `RECORD_FILES` (config, history, metrics; no checkpoints) are
copied into the records folder in the workdir's layout, and copied back into a fresh
workdir, so a study longer than one machine's lease finishes over several.
"""

import pathlib

from reldistill_jax import errors, files, metrics_writer, workdir_config

# The files of a finished unit's folders that the study reads (`--records`).
RECORD_FILES = (
  workdir_config.CONFIG_FILE,
  workdir_config.CONFIG_CHANGES_FILE,
  metrics_writer.HISTORY_FILE,
  "metrics.json",
)


def _record_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The `RECORD_FILES` of `folder` and of the folders inside it."""
  return sorted(p for p in folder.rglob("*") if p.is_file() and p.name in RECORD_FILES)


def keep_records(workdir: pathlib.Path, unit: pathlib.Path, records) -> None:
  """Copies the record files of the finished `unit` (a folder of `workdir`) into `records`
  (nothing when `records` is None).

  Raises:
    errors.DataError: `records` already holds one of them with other contents.
  """
  if records is None:
    return
  for path in _record_files(unit):
    kept = pathlib.Path(records) / path.relative_to(workdir)
    data = path.read_bytes()
    if kept.is_file():
      if kept.read_bytes() == data:
        continue
      raise errors.DataError(
        f"{kept} differs from {path}: the records hold another run of this unit; move one "
        "of them away (records are never overwritten)"
      )
    kept.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(kept, data)


def restore_records(records, workdir: pathlib.Path) -> int:
  """Copies every record file that `workdir` lacks from `records` (if any); returns how many."""
  restored = 0
  for path in _record_files(pathlib.Path(records)) if records else ():
    target = workdir / path.relative_to(records)
    if not target.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      files.atomic_write(target, path.read_bytes())
      restored += 1
  return restored
