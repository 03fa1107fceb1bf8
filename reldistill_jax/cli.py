"""The harness every command-line entry point runs through: `cli.run(main)`.

It parses the flags, keeps the console quiet, runs `main`, and turns the
errors a user can act on into one line and an exit status (`errors.py` lists
them). `--verbose` shows the library INFO logs (orbax, TFDS, JAX) and the
traceback of every error.

A quiet console: INFO lines come from this project's own modules only (one
progress line per logging interval, the stages, the results); libraries log
at WARNING and above. TFDS's progress bars are off unless `--verbose`.
"""

import functools
import logging as std_logging
import pathlib
import re
import sys
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


class _OwnInfoOnly(std_logging.Filter):
  """Lets through warnings and errors, and INFO lines of the project's own modules."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_OWN)


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
  handler.addFilter(_OwnInfoOnly())
  handler.setFormatter(_ConsoleFormatter())
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


def _run_main(main: Callable[[list[str]], int | None], argv: list[str]) -> int | None:
  configure_logging(_VERBOSE.value)
  try:
    return main(argv)
  except (app.UsageError, errors.UserError, errors.Preempted, OSError, KeyboardInterrupt) as e:
    if isinstance(e, OSError) and e.filename is None and not isinstance(e, FileNotFoundError):
      raise  # not about a file: an internal error
    if _VERBOSE.value:
      traceback.print_exc()
    if isinstance(e, KeyboardInterrupt):
      fail("interrupted; the last periodic checkpoint (if any) is kept", 130)
    status = 2 if isinstance(e, (app.UsageError, OSError)) else e.exit_status
    fail(str(e), status)


def run(main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run(main)` with one-line errors and a quiet console (module docstring)."""
  app.run(functools.partial(_run_main, main), flags_parser=_parse_flags)
