"""Statistics of repeated runs: summaries with t intervals, and paired one-sided tests.

`summary(values)`: mean, sample standard deviation (ddof 1) and the 95%
Student-t confidence interval of the mean, mean +- t(0.975, n - 1) * sd / sqrt(n).

`paired_test(a, b)`: whether a > b, from runs paired by seed (the same world,
data order and initialisation except for what the configurations change): a
one-sided paired t-test on the differences a_i - b_i (scipy's `ttest_rel`,
`alternative="greater"`), with the mean difference and its 95% t interval.
With fewer than two pairs, or differences all equal, the test cannot say and
its p-value is None with a note.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats


def _finite(values: Sequence[float | None]) -> np.ndarray:
  return np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)


def summary(values: Sequence[float | None], level: float = 0.95) -> dict[str, Any]:
  """{"mean", "std", "ci95": [low, high], "n"} of the finite values (None where undefined)."""
  x = _finite(values)
  n = len(x)
  result = {"mean": float(x.mean()) if n else None, "std": None, "ci95": None, "n": n}
  if n >= 2:
    sd = float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    result |= {"std": sd, "ci95": [result["mean"] - half, result["mean"] + half]}
  return result


def paired_test(a: Sequence[float], b: Sequence[float], claim: str) -> dict[str, Any]:
  """One-sided paired t-test of a > b (module docstring).

  Args:
    a, b: one value per pair (e.g. per seed), in the same order; a pair with a
      missing or non-finite value is dropped.
    claim: the claim in words, kept in the result.

  Returns:
    {"claim", "n", "mean_difference", "ci95_difference", "t", "p_value",
     "holds" (p < 0.05), "note"}.
  """
  if len(a) != len(b):
    raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
  keep = [(x, y) for x, y in zip(a, b, strict=True) if len(_finite([x, y])) == 2]
  diff = np.array([x - y for x, y in keep], np.float64)
  result = {"claim": claim, "n": len(diff), "t": None, "p_value": None, "holds": None}
  spread = summary(diff)
  result |= {"mean_difference": spread["mean"], "ci95_difference": spread["ci95"], "note": ""}
  if len(diff) < 2:
    result["note"] = f"{len(diff)} pair(s): a paired test needs at least 2"
  elif np.ptp(diff) <= 1e-12 * max(1.0, float(np.abs(diff).max())):
    result["note"] = "the differences are all equal: no variance to test against"
  else:
    test = scipy_stats.ttest_rel([x for x, _ in keep], [y for _, y in keep], alternative="greater")
    result |= {"t": float(test.statistic), "p_value": float(test.pvalue)}
    result["holds"] = bool(test.pvalue < 0.05)
  return result
