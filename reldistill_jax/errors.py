"""The errors a user can act on, and the exit status each one gives a command.

Every command-line entry point runs through `reldistill_jax.cli.run`, which
prints an error of these kinds as one line (the traceback only with
`--verbose`) and exits with its status:

  0    the command finished.
  1    an internal error (a bug): the traceback is printed.
  2    `UserError`: a missing or corrupt file, a bad flag or config value, an
       empty split, a store written with other settings, a changed config.
       The line names the file, field or split and what to do.
  3    `Diverged`: training met a non-finite loss (the line names the step and
       the samples); lower the learning rate or check the named samples.
  130  interrupted (Ctrl-C); the last periodic checkpoint is kept.
  143  `Preempted`: SIGTERM; the run saved a checkpoint and stopped. Run the
       same command again to resume (128 + SIGTERM, what schedulers expect of
       a job to restart).

The classes also derive from the built-in error a caller would expect
(`ValueError`, `FloatingPointError`), so library callers can catch either.
"""


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
