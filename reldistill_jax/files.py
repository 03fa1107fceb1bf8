"""Writing files so that a crash never leaves a partial one: `atomic_write`."""

import os
import pathlib
import tempfile

from reldistill_jax import errors


def atomic_write(path: str | os.PathLike, data: str | bytes) -> pathlib.Path:
  """Writes `data` to a temporary file beside `path`, syncs it, then renames it over `path`.

  Readers see the old file or the new one, never a partial one. A refused write
  raises `errors.StorageError` naming `path`.
  """
  path = pathlib.Path(path)
  with errors.storage_faults(path, "writing it"):
    _write_then_rename(path, data)
  return path


def _write_then_rename(path: pathlib.Path, data: str | bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
