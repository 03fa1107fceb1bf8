"""The errors a user can act on, and the exit status each one gives a command.

Every command-line entry point runs through `reldistill_jax.cli.run`, which
prints an error of these kinds as one line (the traceback only with
`--verbose`) and exits with its status:

  0    the command finished.
  1    an internal error (a bug): the traceback is printed.
  2    `UserError`: a missing or corrupt file, a bad flag or config value, an
       empty split, a store written with other settings, a changed config, a
       workdir another run holds (`WorkdirLocked`). The line names the file,
       field or split and what to do.
  3    `Diverged`: training met a non-finite loss (the line names the step and
       the samples); lower the learning rate or check the named samples.
  4    `StorageError`: the file system refused a write: no space left, a
       read-only file system, a missing permission, a quota. The line names the
       path; free space or fix the permission and run the same command again
       (what was complete before stays complete).
  130  interrupted (Ctrl-C, SIGINT): a stage stops, its partial output is
       removed; a training loop keeps its last periodic checkpoint.
  143  SIGTERM. In a training loop (`Preempted`) the run saves a checkpoint and
       stops; in any other stage (`Terminated`) it stops and removes its partial
       output. Run the same command again to resume (128 + SIGTERM, what
       schedulers expect of a job to restart).

The classes also derive from the built-in error a caller would expect
(`ValueError`, `FloatingPointError`), so library callers can catch either.
"""

import contextlib
import errno
import os
import re

# The errors of a file system that refuses a write: no space, read-only, permission, quota,
# a file over the size limit.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG)
# How orbax and tensorstore report the OS error inside their own exceptions.
_ERRNO_IN_TEXT = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


class UserError(Exception):
  """An input the user can fix; printed as one line, exit status 2."""

  exit_status = 2


class ConfigError(UserError, ValueError):
  """A config value, argument or flag that cannot be used; names the field."""


class DataError(UserError, ValueError):
  """A file, store or split that cannot be used as it is; names it."""


class Diverged(UserError, FloatingPointError):
  """Training met a non-finite loss; exit status 3."""

  exit_status = 3


class WorkdirLocked(UserError):
  """Another run holds the workdir (`workdir_lock`); names the holder."""


class StorageError(OSError):
  """The file system refused a write; names the path; exit status 4."""

  exit_status = 4

  def __str__(self) -> str:
    return str(self.strerror)


def storage_errno(error: BaseException) -> int | None:
  """The errno of a refused write (`STORAGE_ERRNOS`) in `error` or its text, else None."""
  code = getattr(error, "errno", None)
  if code is None and (found := _ERRNO_IN_TEXT.search(str(error))):
    code = int(found[1] or found[2])
  return code if code in STORAGE_ERRNOS else None


def storage_message(path, code: int, doing: str) -> str:
  """The one line of a refused write of `path` while `doing`."""
  what = "free space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix that"
  return (
    f"{path}: {os.strerror(code).lower()} ({doing}); {what} and run the same command again: "
    "what was complete before is kept"
  )


@contextlib.contextmanager
def storage_faults(path, doing: str):
  """Turns a refused write inside the block into one `StorageError` naming `path`."""
  try:
    yield
  except StorageError:
    raise
  except Exception as e:
    code = storage_errno(e)
    if code is None:
      raise
    raise StorageError(
      code, storage_message(getattr(e, "filename", None) or path, code, doing)
    ) from e


class Terminated(BaseException):
  """SIGTERM outside a training loop: the stage stopped; exit status 143. A
  BaseException, as KeyboardInterrupt, so that no `except Exception` swallows it."""

  exit_status = 143


class Preempted(Exception):
  """SIGTERM stopped a run after it saved a checkpoint; exit status 143."""

  exit_status = 143

  def __init__(self, step: int):
    super().__init__(
      f"stopped by SIGTERM after saving step {step}; run the same command again to resume"
    )
    self.step = step


def one_line(error: BaseException | str) -> str:
  """An error message on one line (its lines joined by "; ")."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return "; ".join(lines) or type(error).__name__
