"""When a run counts as converged, from its zero-shot curve."""

import math

import pytest

from reldistill_jax import curves


def _history(values, every=25):
  """Training records every 10 steps and evaluations every `every` steps."""
  records = [{"step": s, "loss": 1.0 / s} for s in range(10, every * len(values) + 1, 10)]
  records += [{"step": every * (i + 1), curves.KEY: v} for i, v in enumerate(values)]
  return records


def test_a_flat_last_quarter_converges():
  # 150 steps, evaluations at 25..150: 75% is step 112.5, the last one before it is step 100.
  result = curves.convergence(_history([0.05, 0.10, 0.13, 0.140, 0.142, 0.144]), 150)
  assert result["converged"] is True
  assert result["gain_last_quarter"] == pytest.approx(0.144 - 0.140)
  assert result["final"] == 0.144 and result["evaluations"] == 6


def test_a_rising_curve_has_not_converged():
  result = curves.convergence(_history([0.05, 0.10, 0.13, 0.14, 0.15, 0.16]), 150)
  assert result["converged"] is False
  assert result["gain_last_quarter"] == pytest.approx(0.02)
  # A drop is converged too: the student gains nothing by training longer.
  assert curves.convergence(_history([0.2, 0.3, 0.3, 0.3, 0.2, 0.1]), 150)["converged"] is True


def test_too_few_evaluations_cannot_say():
  assert curves.convergence(_history([0.1]), 25)["converged"] is None
  assert curves.convergence([{"step": 10, "loss": 1.0}], 10) == {
    "converged": None, "gain_last_quarter": None, "evaluations": 0, "final": None,
  }  # fmt: skip
  nan = curves.convergence(_history([0.1, math.nan]), 50)
  assert nan["converged"] is None and math.isnan(nan["final"])


def test_curve_reads_one_series_in_step_order():
  history = [
    {"step": 50, curves.KEY: 0.2},
    {"step": 10, "loss": 3.0},
    {"step": 25, curves.KEY: 0.1},
  ]
  assert curves.curve(history) == [(25, 0.1), (50, 0.2)]
  assert curves.curve(history, "loss") == [(10, 3.0)]
