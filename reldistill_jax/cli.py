"""The harness every command-line entry point runs through: `cli.run(main)`.

It parses the flags, keeps the console quiet, runs `main`, and turns the
errors a user can act on into one line and an exit status (`errors.py` lists
them). `--verbose` shows the library logs on the console and the traceback of
every error.

A quiet console: it shows this project's own log lines only (one progress
line per logging interval, the stages, the results, its warnings). What the
libraries log (orbax, TFDS, JAX), warnings and errors included, goes to the
run's log file instead (`keep_library_log`: `<workdir>/run.log` for the
entry point), kept in memory until a command names that file. TFDS's progress
bars are off unless `--verbose`.

SIGTERM outside a training loop (which handles it itself: `runtime.run_loop`)
raises `errors.Terminated` where the program is, so every stage unwinds
through its cleanup, removing its partial output, as Ctrl-C does.
"""

import contextlib
import functools
import logging as std_logging
import pathlib
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from reldistill_jax import errors

_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Show the libraries' INFO logs and the traceback of every error."
)

# Source folders whose INFO lines reach the console.
_OWN = tuple(
  str(pathlib.Path(__file__).resolve().parents[1] / name)
  for name in ("reldistill_jax", "data_prep", "benchmarks")
)


def _own(record: std_logging.LogRecord) -> bool:
  return record.pathname.startswith(_OWN)


class _LibraryLog(std_logging.Handler):
  """The libraries' log records, appended to the file `keep_library_log` names once its
  folder exists (a run creates its workdir only once its inputs are known good); kept in
  memory until then."""

  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.addFilter(lambda record: not _own(record))
    self.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    self.pending: list[str] = []
    self.path: pathlib.Path | None = None

  def emit(self, record: std_logging.LogRecord) -> None:
    self.pending.append(self.format(record) + "\n")
    self.write_pending()

  def write_pending(self) -> None:
    if not self.pending or self.path is None or not self.path.parent.is_dir():
      return
    try:
      with self.path.open("a") as f:
        f.writelines(self.pending)
    except OSError:
      return  # a full disk, say: the command's own error says so; the records wait
    self.pending = []


_LIBRARY_LOG = _LibraryLog()


def _unraisable_to_log(report) -> None:
  """An error Python can only report (in an atexit callback or a finaliser: a library's
  writer flushing onto a full disk at exit, say) goes to the log file, not the console."""
  lines = traceback.format_exception(report.exc_type, report.exc_value, report.exc_traceback)
  _LIBRARY_LOG.pending.append(f"{report.err_msg or 'Exception ignored'}: {report.object!r}\n")
  _LIBRARY_LOG.pending += lines
  _LIBRARY_LOG.write_pending()


def keep_library_log(path: str | pathlib.Path) -> None:
  """Appends the libraries' log records to `path` (those kept so far first)."""
  _LIBRARY_LOG.path = pathlib.Path(path)
  _LIBRARY_LOG.write_pending()


class _ConsoleFormatter(std_logging.Formatter):
  """`HH:MM:SS message`, with the level named when it is not INFO."""

  def format(self, record: std_logging.LogRecord) -> str:
    level = "" if record.levelno == std_logging.INFO else f"{record.levelname}: "
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    return f"{stamp} {level}{record.getMessage()}"


def configure_logging(verbose: bool) -> None:
  """The console of a command: quiet (module docstring) unless `verbose`."""
  if verbose:
    return
  handler = absl_logging.get_absl_handler().python_handler
  handler.addFilter(_own)
  handler.setFormatter(_ConsoleFormatter())
  root = std_logging.getLogger()
  if _LIBRARY_LOG not in root.handlers:
    root.addHandler(_LIBRARY_LOG)
  sys.unraisablehook = _unraisable_to_log
  try:
    import tensorflow_datasets as tfds  # only when installed and cheap to import here

    tfds.disable_progress_bar()
  except ImportError:
    pass


def fail(message: str, status: int) -> None:
  """Prints `error: message` on stderr and exits with `status`."""
  sys.stderr.write(f"error: {errors.one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(status)


def _config_override_error(error: Exception, argv: Sequence[str]) -> str:
  """The message of an error raised while applying `--config...` flags.

  ml_collections raises AttributeError or KeyError naming only the last key of a
  mistyped field (`'lrr' Did you mean "lr" instead of "lrr"?`); the field is found in argv.
  """
  text = str(error)
  hint = re.search(r'Did you mean \\?"([^"\\]+)\\?" instead of \\?"([^"\\]+)\\?"', text)
  words = re.findall(r"[A-Za-z_][\w]*", text)
  missing = hint[2] if hint else (words[0] if words else None)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    flag = arg[2:].split("=", 1)[0]
    parts = flag.split(".")[1:]
    if missing in parts:
      at = parts.index(missing)
      field = ".".join(parts[: at + 1])
      suggestion = f" (did you mean {'.'.join([*parts[:at], hint[1]])}?)" if hint else ""
      return f"--{flag}: the config has no field {field}{suggestion}"
  return f"--config: {errors.one_line(error)}"


def _cause(text: str) -> str:
  """The last line of an error text that embeds a traceback, without the exception's name."""
  last = [line.strip() for line in text.splitlines() if line.strip()][-1]
  return re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", last)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with every flag or config error as one line and status 2."""
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    fail(_cause(text) if "Traceback" in text else f"{text} (see --helpfull)", 2)
  except (AttributeError, KeyError) as e:  # a mistyped --config.<field>
    fail(_config_override_error(e, argv), 2)
  except (TypeError, ValueError) as e:
    fail(f"--config: {errors.one_line(e)}", 2)
  config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  if config is not None and not isinstance(config, str):  # an ml_collections config file
    try:  # ml_collections reports a config file it could not load on first use
      config.get("kind")
    except OSError as e:
      fail(f"--config: {_cause(str(e))}", 2)
  return args


def _terminate(signum, frame) -> None:
  del signum, frame
  raise errors.Terminated()


# The signals that stop a command.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_deferred():
  """SIGTERM and SIGINT wait until the block ends, then act as usual: for starting worker
  processes, which a parent stopped mid-start would leave printing a traceback about the
  parent gone. (Deferred in Python, not by masking: any thread may receive a signal.)"""
  if threading.current_thread() is not threading.main_thread():
    yield  # signals reach the main thread only
    return
  received = []
  previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in STOP_SIGNALS}
  try:
    yield
  finally:
    for number, handler in previous.items():
      signal.signal(number, handler)
    if received:
      signal.raise_signal(received[0])


def worker_started() -> None:
  """First thing in a worker process: SIGINT, which a terminal sends to every process of
  the command, is the parent's to handle (it stops its workers); SIGTERM ends the worker."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def catch_sigterm() -> None:
  """From now on SIGTERM raises `errors.Terminated` (module docstring)."""
  signal.signal(signal.SIGTERM, _terminate)


def exit_status(error: BaseException) -> tuple[str, int] | None:
  """(message, status) of an error a user can act on; None for an internal error."""
  if isinstance(error, KeyboardInterrupt):
    return "interrupted; partial output removed, the last periodic checkpoint (if any) kept", 130
  if isinstance(error, errors.Terminated):
    return "stopped by SIGTERM; partial output removed: run the same command again to go on", 143
  if isinstance(error, errors.StorageError):
    return str(error), error.exit_status
  if isinstance(error, OSError):
    if code := errors.storage_errno(error):
      path = error.filename or "a file"
      return errors.storage_message(path, code, "writing it"), errors.StorageError.exit_status
    if error.filename is None and not isinstance(error, FileNotFoundError):
      return None  # not about a file: an internal error
    return str(error), 2
  if isinstance(error, app.UsageError):
    return str(error), 2
  return str(error), error.exit_status


def _logged(main: Callable[[list[str]], int | None], argv: list[str]) -> int | None:
  """`main(argv)`, then the library records still in memory to their file."""
  try:
    return main(argv)
  finally:
    _LIBRARY_LOG.write_pending()


def _run_main(main: Callable[[list[str]], int | None], argv: list[str]) -> int | None:
  configure_logging(_VERBOSE.value)
  catch_sigterm()
  try:
    return _logged(main, argv)
  except (
    app.UsageError, errors.UserError, errors.Preempted, errors.Terminated, OSError,
    KeyboardInterrupt,
  ) as e:  # fmt: skip
    found = exit_status(e)
    if found is None:
      raise
    if _VERBOSE.value:
      traceback.print_exc()
    fail(*found)


def run(main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run(main)` with one-line errors and a quiet console (module docstring)."""
  app.run(functools.partial(_run_main, main), flags_parser=_parse_flags)
