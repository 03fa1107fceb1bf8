"""Training measurements: TensorBoard, the run's history file and one console line per interval.

The history (`workdir/history.jsonl`, one JSON object per logged step) outlives
restarts: a resumed run keeps the steps logged up to its checkpoint and drops
the later ones (they are run again), so curves and the last measurements of a
run do not depend on how often it was restarted.
"""

import json
import math
import pathlib
import sys
import time

from absl import logging

from reldistill_jax import errors


def _summary_writer_class():
  """tensorboardX's SummaryWriter. tensorboardX imports torch, where it is installed, only to
  accept its tensors; that costs every process 1-2 s, and these scalars are Python floats, so
  torch is hidden from that import (None in sys.modules: `import torch` raises ImportError)."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
  else:
    sys.modules["torch"] = None
    try:
      from tensorboardX import SummaryWriter
    finally:
      del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _summary_writer_class()

HISTORY_FILE = "history.jsonl"
# Console names of the measurements shown on the progress line (the rest go to TensorBoard).
_SHOWN = {"grad_norm": "grad norm", "learning_rate": "lr", "train_accuracy": "train accuracy"}


class MetricWriter:
  """Writes scalars to `workdir/tensorboard` and `workdir/history.jsonl`, and logs progress.

  Args:
    workdir: the run's folder.
    start: the step the run starts (or resumes) from: logged steps after it
      are dropped from the history.
    name: the run's name on the console (`pretrain`, `finetune`, ...).
    enabled: False on every process but the first of a multi-host run.
  """

  def __init__(self, workdir: str | pathlib.Path, start: int, name: str, enabled: bool = True):
    self.enabled = enabled
    self.name = name
    self.history: list[dict] = []
    self._writer = None
    self._start = time.perf_counter()
    self._first_step = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self._path = workdir / HISTORY_FILE
    if self._path.is_file():
      lines = self._path.read_text().splitlines()
      self.history = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= start]
    self._path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
    self._writer = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float], total_steps: int) -> None:
    """Records the scalars of `step` and logs progress towards `total_steps`."""
    if not self.enabled:
      return
    record = {"step": step, **scalars}
    self.history.append(record)
    with errors.storage_faults(self._path, "writing the run's history"), self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    with errors.storage_faults(self._path.parent / "tensorboard", "writing TensorBoard events"):
      for name, value in scalars.items():
        self._writer.add_scalar(name, value, step)
      self._writer.flush()
    logging.info("%s", self._line(step, scalars, total_steps))

  def _line(self, step: int, scalars: dict[str, float], total_steps: int) -> str:
    """`pretrain step 10/150: loss 1.61 (cross 1.23, intra 0.374), grad norm 0.77, ...`."""
    if self._first_step is None:
      self._first_step, self._start = step, time.perf_counter()
      eta = ""
    else:
      rate = (time.perf_counter() - self._start) / max(step - self._first_step, 1)
      eta = f", {_duration(rate * (total_steps - step))} left"
    if "loss" not in scalars:  # an evaluation
      shown = ", ".join(f"{k.split('/', 1)[-1]} {v:.3g}" for k, v in scalars.items())
      return f"{self.name} step {step}/{total_steps}: {shown}"
    parts = [f"{k.split('/', 1)[1]} {v:.3g}" for k, v in scalars.items() if k.startswith("loss/")]
    loss = f"loss {scalars.get('loss', math.nan):.4g}" + (f" ({', '.join(parts)})" if parts else "")
    shown = [f"{label} {scalars[k]:.3g}" for k, label in _SHOWN.items() if k in scalars]
    if "step_time" in scalars:
      shown.append(f"{scalars['step_time']:.2f} s/step")
    if "compile_time" in scalars:
      shown.append(f"first step {scalars['compile_time']:.1f} s (compiling)")
    return f"{self.name} step {step}/{total_steps}: " + ", ".join([loss, *shown]) + eta

  def close(self) -> None:
    if self._writer is None:
      return
    try:
      self._writer.close()
    except OSError:
      pass  # a full disk: the write that met it already stopped the run, saying so
    self._writer = None


def _duration(seconds: float) -> str:
  """`1h02m`, `3m05s` or `42s`."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"
