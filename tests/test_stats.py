"""Summaries and paired tests of repeated runs, against direct computations."""

import math

import numpy as np
import pytest

from reldistill_jax import stats

# Student t quantiles t(0.975, df), from the standard tables.
T975 = {1: 12.706, 2: 4.303, 4: 2.776}


def test_summary_is_the_mean_sd_and_t_interval():
  values = [0.10, 0.12, 0.11, 0.15, 0.13]
  result = stats.summary(values)
  mean, sd = np.mean(values), np.std(values, ddof=1)
  half = T975[4] * sd / math.sqrt(5)
  assert result["n"] == 5 and result["mean"] == pytest.approx(mean)
  assert result["std"] == pytest.approx(sd)
  assert result["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-3)


def test_summary_drops_missing_values_and_says_little_about_one():
  assert stats.summary([0.2, None, math.nan, 0.4])["n"] == 2
  one = stats.summary([0.3])
  assert one == {"mean": 0.3, "std": None, "ci95": None, "n": 1}
  assert stats.summary([])["mean"] is None


def test_paired_test_of_a_greater_than_b():
  a = [0.20, 0.22, 0.25, 0.21]
  b = [0.15, 0.18, 0.19, 0.20]
  result = stats.paired_test(a, b, "a > b")
  d = np.subtract(a, b)
  t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
  assert result["t"] == pytest.approx(t)
  assert result["n"] == 4 and result["mean_difference"] == pytest.approx(d.mean())
  # One-sided: p is the upper tail of t with 3 degrees of freedom; t = 3.70 lies
  # between the 0.025 (3.182) and 0.01 (4.541) critical values.
  assert 0.01 < result["p_value"] < 0.025 and result["holds"] is True
  reverse = stats.paired_test(b, a, "b > a")
  assert reverse["p_value"] == pytest.approx(1 - result["p_value"]) and reverse["holds"] is False


def test_paired_test_that_cannot_say():
  assert stats.paired_test([0.2], [0.1], "x")["p_value"] is None
  same = stats.paired_test([0.3, 0.4], [0.2, 0.3], "x")
  assert same["p_value"] is None and "all equal" in same["note"]
  with pytest.raises(ValueError, match="differ in length"):
    stats.paired_test([0.1, 0.2], [0.1], "x")
  # A pair with a missing value is dropped, not the whole test.
  assert stats.paired_test([0.2, None, 0.3, 0.5], [0.1, 0.2, 0.25, 0.3], "x")["n"] == 3
