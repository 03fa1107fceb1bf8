"""Training measurements to TensorBoard event files and a console progress line."""

import pathlib
import time

from absl import logging
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars to `workdir/tensorboard` and logs a line with the ETA.

  Args:
    workdir: the run's folder.
    enabled: False on every process but the first of a multi-host run.
  """

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self._writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard")) if enabled else None
    self._start = time.perf_counter()
    self._first_step = None
    self.history: list[dict] = []

  def write(self, step: int, scalars: dict[str, float], total_steps: int) -> None:
    """Records the scalars of `step` and logs progress towards `total_steps`."""
    if not self.enabled:
      return
    self.history.append({"step": step, **scalars})
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, step)
    self._writer.flush()
    if self._first_step is None:
      self._first_step, self._start = step, time.perf_counter()
      eta = "?"
    else:
      rate = (time.perf_counter() - self._start) / max(step - self._first_step, 1)
      eta = f"{rate * (total_steps - step):.0f}s"
    parts = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k.startswith("loss"))
    logging.info(
      "step %d/%d %s grad_norm=%.3g lr=%.3g %.2fs/step ETA %s",
      step,
      total_steps,
      parts,
      scalars.get("grad_norm", float("nan")),
      scalars.get("learning_rate", float("nan")),
      scalars.get("step_time", float("nan")),
      eta,
    )

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
