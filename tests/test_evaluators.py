"""Segmentation metrics, zero-shot prediction, the structural gap, CKA and the gap study."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from reldistill_jax.evaluators import segmentation, structural_gap, zeroshot

# A tiny split, C = 3. Labelled (label, pred) pairs after dropping label 0:
# (1,1) (1,1) (1,2) (2,2) (2,0) (3,3) (3,1) (1,3).
TINY_LABEL = np.array([1, 1, 1, 2, 2, 3, 0, 0, 3, 1])
TINY_PRED = np.array([1, 1, 2, 2, 0, 3, 2, 1, 1, 3])
# Class a: TP 2, FP 1 (a 3 predicted 1), FN 2 (1 -> 2, 1 -> 3): 2 / 5.
# Class b: TP 1, FP 1 (a 1 predicted 2), FN 1 (2 -> no prediction): 1 / 3.
# Class c: TP 1, FP 1 (a 1 predicted 3), FN 1 (3 -> 1): 1 / 3.
TINY_IOU = {"a": 2 / 5, "b": 1 / 3, "c": 1 / 3}


def test_confusion_matrix_by_hand():
  confusion = segmentation.confusion_matrix(TINY_PRED, TINY_LABEL, 3)
  expected = np.array(
    [
      [0, 0, 0, 0],  # label 0 is never counted
      [0, 2, 1, 1],
      [1, 0, 1, 0],  # one b point without a prediction
      [0, 1, 0, 1],
    ]
  )
  np.testing.assert_array_equal(confusion, expected)
  assert confusion.dtype == np.int64


def test_metrics_by_hand():
  confusion = segmentation.confusion_matrix(TINY_PRED, TINY_LABEL, 3)
  m = segmentation.segmentation_metrics(confusion, ("a", "b", "c"))
  assert m["per_class_iou"] == pytest.approx(TINY_IOU)
  assert m["miou"] == pytest.approx((2 / 5 + 1 / 3 + 1 / 3) / 3)
  assert m["accuracy"] == pytest.approx(4 / 8)
  assert m["mean_class_accuracy"] == pytest.approx((2 / 4 + 1 / 2 + 1 / 2) / 3)
  assert m["empty_classes"] == []
  assert m["empty_class_convention"] == "nan"
  assert (m["num_points"], m["num_unpredicted"]) == (8, 1)


def test_empty_class_conventions():
  # Class d: never labelled, never predicted. Class e: predicted once, never labelled.
  label = np.concatenate([TINY_LABEL, [0]])
  pred = np.concatenate([TINY_PRED, [5]])
  names = ("a", "b", "c", "d", "e")
  confusion = segmentation.confusion_matrix(pred, label, 5)
  # The point predicted e is labelled 0: ignored, so e is empty too.
  nan = segmentation.segmentation_metrics(confusion, names, empty="nan")
  assert nan["empty_classes"] == ["d", "e"]
  assert np.isnan(nan["per_class_iou"]["d"]) and np.isnan(nan["per_class_iou"]["e"])
  assert nan["miou"] == pytest.approx((2 / 5 + 1 / 3 + 1 / 3) / 3)

  label = np.concatenate([TINY_LABEL, [1]])  # now the e prediction is a wrong a point
  confusion = segmentation.confusion_matrix(pred, label, 5)
  nan = segmentation.segmentation_metrics(confusion, names, empty="nan")
  one = segmentation.segmentation_metrics(confusion, names, empty="one")
  assert nan["empty_classes"] == one["empty_classes"] == ["d"]
  assert nan["per_class_iou"]["e"] == 0.0  # a false positive only: not empty, IoU 0
  assert nan["per_class_iou"]["a"] == pytest.approx(2 / 6)
  non_empty = 2 / 6 + 1 / 3 + 1 / 3 + 0.0
  assert nan["miou"] == pytest.approx(non_empty / 4)
  assert one["miou"] == pytest.approx((non_empty + 1.0) / 5)
  assert np.isnan(one["per_class_iou"]["d"])  # the per-class value stays undefined
  assert one["empty_class_convention"] == "one"
  # With nothing labelled the nan convention has no mean and says so with NaN.
  empty = segmentation.segmentation_metrics(np.zeros((6, 6), np.int64), names)
  assert np.isnan(empty["miou"]) and np.isnan(empty["accuracy"])
  with pytest.raises(ValueError, match="empty"):
    segmentation.segmentation_metrics(confusion, names, empty="zero")


def test_ignore_label_and_range_checks():
  base = segmentation.confusion_matrix(TINY_PRED, TINY_LABEL, 3)
  other_pred = np.where(TINY_LABEL == 0, 3, TINY_PRED)  # change predictions of ignored points
  np.testing.assert_array_equal(segmentation.confusion_matrix(other_pred, TINY_LABEL, 3), base)
  with pytest.raises(ValueError, match="label ids"):
    segmentation.confusion_matrix(TINY_PRED, np.where(TINY_LABEL == 3, 4, TINY_LABEL), 3)
  with pytest.raises(ValueError, match="pred ids"):
    segmentation.confusion_matrix(TINY_PRED - 1, TINY_LABEL, 3)
  with pytest.raises(ValueError, match="differ"):
    segmentation.confusion_matrix(TINY_PRED[:-1], TINY_LABEL, 3)
  with pytest.raises(ValueError, match=r"\(4, 4\)"):
    segmentation.segmentation_metrics(base[1:, 1:], ("a", "b", "c"))


def test_accumulation_over_chunks_equals_one_shot():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 17, 100_003).astype(np.uint8)
  pred = rng.integers(0, 17, 100_003).astype(np.int32)
  whole = segmentation.confusion_matrix(pred, label, 16)
  chunks = sum(
    segmentation.confusion_matrix(p, y, 16)
    for p, y in zip(np.array_split(pred, 7), np.array_split(label, 7), strict=True)
  )
  np.testing.assert_array_equal(chunks, whole)
  assert whole.sum() == np.count_nonzero(label)


# Zero-shot.


def _zero_shot_case():
  """Text embeddings of very different norms and features whose answer needs normalisation."""
  rng = np.random.default_rng(1)
  directions = np.linalg.qr(rng.normal(size=(8, 4)))[0].T  # (4, 8) orthonormal rows
  text = directions * np.array([[0.2], [9.0], [1.0], [3.0]])
  ids = np.array([1, 2, 3, 4, 1, 3, 1, 4, 2, 1])
  scale = rng.uniform(0.1, 20.0, size=(len(ids), 1))
  features = scale * (directions[ids - 1] + 0.3 * rng.normal(size=(len(ids), 8)) / np.sqrt(8))
  # A feature at 60 degrees from class 2 and 20 degrees from class 1: the raw dot
  # product (text norms 9 vs 0.2) would pick class 2, the cosine picks class 1.
  tilted = np.cos(np.radians(20)) * directions[0] + np.sin(np.radians(20)) * directions[1]
  features = np.vstack([features, tilted[None]])
  ids = np.append(ids, 1)
  assert np.argmax(tilted @ text.T) + 1 == 2
  return features.astype(np.float32), text.astype(np.float32), ids


def test_zero_shot_numpy():
  features, text, ids = _zero_shot_case()
  pred = zeroshot.zero_shot_predict(features, text)
  assert isinstance(pred, np.ndarray) and pred.dtype == np.int32
  np.testing.assert_array_equal(pred, ids)
  batched = zeroshot.zero_shot_predict(features[:10].reshape(2, 5, 8), text)  # (2, 5)
  np.testing.assert_array_equal(batched, ids[:10].reshape(2, 5))


def test_zero_shot_under_jit():
  features, text, ids = _zero_shot_case()
  pred = jax.jit(zeroshot.zero_shot_predict)(jnp.asarray(features), jnp.asarray(text))
  assert isinstance(pred, jax.Array) and pred.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(pred), ids)
  with pytest.raises(ValueError, match="text"):
    zeroshot.zero_shot_predict(features, text[:, :4])


# The structural gap and CKA.


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def gap_numpy(k, q, mask):
  """PROTOCOLS section 4: G = 1/(N^2 - N) sum_{i != j} |k_i.k_j - q_i.q_j| over valid rows."""
  k, q = _normalise(k[mask].astype(np.float64)), _normalise(q[mask].astype(np.float64))
  n = len(k)
  total = 0.0
  for i in range(n):
    for j in range(n):
      if i != j:
        total += abs(k[i] @ k[j] - q[i] @ q[j])
  return total / (n * n - n)


def _pairs(n=37, d=6, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(n, 1))
  q = (0.6 * k + rng.normal(size=(n, d))).astype(np.float32)
  return k, q, rng.random(n) < 0.7


def test_structural_gap_equals_protocol_formula():
  k, q, mask = _pairs()
  assert structural_gap.structural_gap(k, q, mask) == pytest.approx(gap_numpy(k, q, mask), rel=1e-5)
  everything = np.ones(len(k), bool)
  assert structural_gap.structural_gap(k, q) == pytest.approx(gap_numpy(k, q, everything), rel=1e-5)
  assert structural_gap.structural_gap(3.0 * q, q, mask) == pytest.approx(0.0, abs=1e-6)


def test_structural_gap_sharded(mesh):
  k, q, mask = _pairs(n=50, seed=3)
  sharded = structural_gap.structural_gap(k, q, mask, mesh=mesh)
  assert sharded == pytest.approx(gap_numpy(k, q, mask), rel=1e-5)


def cka_numpy(k, q):
  """CKA = HSIC(KK^T, QQ^T) / sqrt(HSIC(KK^T, KK^T) HSIC(QQ^T, QQ^T)), HSIC with H = I - 11^T/n."""
  n = len(k)
  h = np.eye(n) - np.ones((n, n)) / n
  gram_k, gram_q = k @ k.T, q @ q.T

  def hsic(a, b):
    return np.trace(a @ h @ b @ h) / (n - 1) ** 2

  return hsic(gram_k, gram_q) / np.sqrt(hsic(gram_k, gram_k) * hsic(gram_q, gram_q))


def test_cka_equals_hsic_form():
  k, q, mask = _pairs(n=40, d=5)
  q = q[:, :3]  # CKA compares feature spaces of different sizes
  k64, q64 = k[mask].astype(np.float64), q[mask].astype(np.float64)
  raw = structural_gap.linear_cka(k, q, mask, normalize_rows=False)
  assert raw == pytest.approx(cka_numpy(k64, q64), rel=1e-5)
  normalised = structural_gap.linear_cka(k, q, mask)
  assert normalised == pytest.approx(cka_numpy(_normalise(k64), _normalise(q64)), rel=1e-5)
  assert abs(normalised - raw) > 1e-3  # row normalisation matters for these features
  everything = structural_gap.linear_cka(k, q, normalize_rows=False)
  assert everything == pytest.approx(
    cka_numpy(k.astype(np.float64), q.astype(np.float64)), rel=1e-5
  )


def test_cka_invariances():
  k, q, mask = _pairs(n=60, d=6, seed=2)
  rotation = np.linalg.qr(np.random.default_rng(5).normal(size=(6, 6)))[0].astype(np.float32)
  base = structural_gap.linear_cka(k, q, mask, normalize_rows=False)
  assert 0.0 < base < 1.0
  for kwargs in ({"normalize_rows": False}, {}):
    reference = structural_gap.linear_cka(k, q, mask, **kwargs)
    assert structural_gap.linear_cka(k @ rotation, q, mask, **kwargs) == pytest.approx(
      reference, rel=1e-5
    )
    assert structural_gap.linear_cka(k, 7.5 * q, mask, **kwargs) == pytest.approx(
      reference, rel=1e-5
    )
    assert structural_gap.linear_cka(k, k, mask, **kwargs) == pytest.approx(1.0, rel=1e-6)


# The gap study.


def _rows(gaps, zeroshot_miou, fewshot_miou=None):
  rows = [
    {"name": f"run{i}", "G": g, "zeroshot_miou": z}
    for i, (g, z) in enumerate(zip(gaps, zeroshot_miou, strict=True))
  ]
  for row, f in zip(rows, fewshot_miou or [], strict=False):
    row["fewshot_miou"] = f
  return rows


def test_gap_study_against_scipy():
  gaps = [0.12, 0.31, 0.18, 0.25, 0.40, 0.22]
  zero = [0.9 - g**2 * 3 for g in gaps]  # strictly decreasing in G, not linear
  few = [0.5, float("nan"), 0.44, None, 0.2, 0.41]
  rows = _rows(gaps, zero, few) + [{"name": "no-gap", "zeroshot_miou": 0.3}]
  study = structural_gap.gap_study(rows)
  assert list(study) == ["zeroshot_miou", "fewshot_miou"]
  z = study["zeroshot_miou"]
  assert z["n"] == 6 and z["names"] == [f"run{i}" for i in range(6)] and z["note"] is None
  assert z["spearman_rho"] == pytest.approx(-1.0)
  pearson = stats.pearsonr(gaps, zero)
  assert (z["pearson_r"], z["pearson_p"]) == pytest.approx((pearson.statistic, pearson.pvalue))
  assert -1.0 < z["pearson_r"] < -0.9
  f = study["fewshot_miou"]
  assert f["n"] == 4 and f["names"] == ["run0", "run2", "run4", "run5"]
  used_g, used_f = [0.12, 0.18, 0.40, 0.22], [0.5, 0.44, 0.2, 0.41]
  spearman = stats.spearmanr(used_g, used_f)
  assert (f["spearman_rho"], f["spearman_p"]) == pytest.approx(
    (spearman.statistic, spearman.pvalue)
  )
  cka = structural_gap.gap_study([{**r, "cka": 1 - r["G"]} for r in rows[:6]], x="cka")
  assert cka["zeroshot_miou"]["x"] == "cka" and cka["zeroshot_miou"][
    "spearman_rho"
  ] == pytest.approx(1.0)


def test_gap_study_too_few_runs():
  study = structural_gap.gap_study(_rows([0.1, 0.2], [0.5, 0.4]) + [{"name": "x", "G": 0.3}])
  result = study["zeroshot_miou"]
  assert result["n"] == 2 and "at least 3" in result["note"]
  assert all(np.isnan(result[k]) for k in ("pearson_r", "pearson_p", "spearman_rho", "spearman_p"))
  constant = structural_gap.gap_study(_rows([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]))["zeroshot_miou"]
  assert np.isnan(constant["pearson_r"]) and "same in every run" in constant["note"]
  assert structural_gap.gap_study([{"name": "a", "G": 0.1}]) == {}
