"""One run per workdir: a lock file that names its holder.

`hold(workdir)` creates `workdir/LOCK_FILE` exclusively, holding the host, the
pid, the process's start time and when the run started, and removes it when
the run ends (however it ends, short of SIGKILL). A workdir that does not exist
yet is locked when the run creates it, once its inputs are known good
(`take`, from `workdir_config.record_config`): a refused input leaves no folder. A second process on the same
workdir stops in one line naming the holder (`errors.WorkdirLocked`, exit
status 2). A lock left by a process that is gone (SIGKILL, a lost node) is
taken over with a warning when it was written on this host, where that can be
checked; a lock from another host is refused, since only that host can tell
whether its run still lives. With several processes only process 0 takes the
lock: the others write under the same workdir by design.
"""

import contextlib
import datetime
import json
import os
import pathlib
import socket

from absl import logging

from reldistill_jax import errors

LOCK_FILE = "run.lock"


def _start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), else None; with the
  pid it names one process, not a later one given the same pid."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(holder: dict) -> bool:
  """Whether the holder, a process of this host, still runs."""
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  recorded = holder.get("start_ticks")
  return recorded is None or _start_ticks(pid) in (None, recorded)


def _describe(holder: dict, path: pathlib.Path) -> str:
  return (
    f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
    f"({path})"
  )


def _create(path: pathlib.Path) -> bool:
  """Writes this process's lock at `path` if none exists; whether it did."""
  me = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start_ticks": _start_ticks(os.getpid()),
    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps(me) + "\n")
  return True


def _read(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except ValueError:
    return {"host": socket.gethostname(), "pid": None}  # a lock cut short: its writer died


def acquire(workdir: str | pathlib.Path) -> pathlib.Path:
  """Takes the lock of `workdir` (created if needed); returns its path.

  Raises:
    errors.WorkdirLocked: another live process holds it, or one on another host.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  for _ in range(3):  # a holder may end between our attempts
    if _create(path):
      return path
    holder = _read(path)
    if not holder:
      continue
    if holder.get("host") != socket.gethostname() or _alive(holder):
      raise errors.WorkdirLocked(
        f"{workdir} is in use by {_describe(holder, path)}; wait for that run to end or use "
        "another --workdir (if that process is gone, delete the lock file)"
      )
    logging.warning(
      "%s: taking over the lock of %s, which is gone", workdir, _describe(holder, path)
    )
    path.unlink(missing_ok=True)
  raise errors.WorkdirLocked(f"{workdir}: another process keeps taking {path}; retry")


def release(path: pathlib.Path) -> None:
  """Removes the lock at `path` if this process holds it."""
  if _read(path).get("pid") == os.getpid():
    path.unlink(missing_ok=True)


# The workdir `hold` will lock once it exists, and the locks this process holds.
_PENDING: dict[str, pathlib.Path | None] = {"workdir": None}
_HELD: dict[pathlib.Path, pathlib.Path] = {}


def _lock(workdir: pathlib.Path) -> None:
  if workdir not in _HELD:
    _HELD[workdir] = acquire(workdir)


def take(workdir: str | pathlib.Path) -> None:
  """Locks `workdir` now if `hold` deferred its lock until the run created it."""
  workdir = pathlib.Path(workdir).absolute()
  if _PENDING["workdir"] == workdir:
    _lock(workdir)


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path, take: bool = True):
  """The lock of `workdir` for the block: taken now if the folder exists, else when the
  run creates it (`take`). `take` False (processes > 0): nothing is locked."""
  workdir = pathlib.Path(workdir).absolute()
  if take and workdir.is_dir():
    _lock(workdir)
  elif take:
    _PENDING["workdir"] = workdir
  try:
    yield
  finally:
    _PENDING["workdir"] = None
    for path in _HELD.values():
      release(path)
    _HELD.clear()
