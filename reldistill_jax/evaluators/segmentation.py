"""Semantic segmentation metrics from one confusion matrix per split.

PROTOCOLS.md section 5: predictions are scored on every original point of the
split, the counts of all scans go into one confusion matrix, and mIoU is
computed once from it. Training id 0 is `ignore`: points labelled 0 are left
out. A prediction of 0 (a point without a prediction) is a wrong answer for the
point's class.

The matrix is indexed by training id, `confusion[label, pred]`, and has shape
(C + 1, C + 1): column 0 counts the labelled points that got no prediction
(they are false negatives of their class and false positives of none, which a
C x C matrix cannot hold), and row 0 stays zero because ignored points are
never counted. `confusion[1:, 1:]` is the C x C class-versus-class matrix.
Matrices of several chunks or scans add up exactly.

Empty classes (no labelled point and no prediction, an empty union) have no
IoU. `empty="nan"` leaves them out of the mean (ScaLR's convention, the
primary one); `empty="one"` scores them 1.0 (SLidR's). The metrics say which.
"""

from collections.abc import Sequence

import numpy as np

EMPTY_CONVENTIONS = {
  "nan": "classes with an empty union are left out of the mean (nanmean, ScaLR)",
  "one": "classes with an empty union score IoU 1.0 (SLidR)",
}


def confusion_matrix(pred, label, num_classes: int) -> np.ndarray:
  """Counts of (label, prediction) over the labelled points.

  Args:
    pred: (...) integer predictions, training ids in 0..C (0 = none).
    label: (...) integer labels of the same shape, training ids in 0..C
      (0 = ignore, not counted).
    num_classes: C, the number of evaluated classes.

  Returns:
    (C + 1, C + 1) int64 counts, `confusion[label, pred]`; row 0 is zero.

  Raises:
    ValueError: on mismatched shapes or ids outside 0..C.
  """
  pred = np.asarray(pred).reshape(-1)
  label = np.asarray(label).reshape(-1)
  if pred.shape != label.shape:
    raise ValueError(f"pred and label differ in size: {pred.size} vs {label.size}")
  size = num_classes + 1
  for name, ids in (("pred", pred), ("label", label)):
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= size):
      raise ValueError(
        f"{name} ids must lie in 0..{num_classes}; got {int(ids.min())}..{int(ids.max())}"
      )
  keep = label != 0
  flat = label[keep].astype(np.int64) * size + pred[keep]  # (M,) cell index
  return np.bincount(flat, minlength=size * size).reshape(size, size)


def segmentation_metrics(
  confusion: np.ndarray, class_names: Sequence[str], empty: str = "nan"
) -> dict:
  """mIoU, per-class IoU and accuracies of an accumulated confusion matrix.

  Args:
    confusion: (C + 1, C + 1) counts from `confusion_matrix` (summed over a
      split).
    class_names: the names of training ids 1..C.
    empty: "nan" (primary) or "one", the score of a class whose union is
      empty (module docstring).

  Returns:
    {"miou": mean IoU as a fraction in [0, 1] (NaN when every class is empty
     under "nan"), "per_class_iou": {name: IoU or NaN}, "accuracy": correct /
     labelled points, "mean_class_accuracy": mean recall over the classes with
     labelled points, "empty_classes": [names], "empty_class_convention":
     `empty`, "num_points": labelled points counted, "num_unpredicted":
     labelled points with prediction 0}. Fractions are NaN when undefined.
  """
  if empty not in EMPTY_CONVENTIONS:
    raise ValueError(f"empty must be one of {sorted(EMPTY_CONVENTIONS)}; got {empty!r}")
  confusion = np.asarray(confusion, dtype=np.int64)
  c = len(class_names)
  if confusion.shape != (c + 1, c + 1):
    raise ValueError(f"expected a ({c + 1}, {c + 1}) confusion matrix; got {confusion.shape}")
  tp = np.diag(confusion)[1:].astype(np.float64)  # (C,)
  labelled = confusion[1:].sum(axis=1).astype(np.float64)  # (C,) includes prediction 0
  predicted = confusion[1:, 1:].sum(axis=0).astype(np.float64)  # (C,)
  union = labelled + predicted - tp
  is_empty = union == 0
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(is_empty, np.nan, tp / union)
    recall = np.where(labelled > 0, tp / labelled, np.nan)
  scored = np.where(is_empty, 1.0, iou) if empty == "one" else iou
  total = labelled.sum()
  return {
    "miou": _nanmean(scored),
    "per_class_iou": {name: float(v) for name, v in zip(class_names, iou, strict=True)},
    "accuracy": float(tp.sum() / total) if total else float("nan"),
    "mean_class_accuracy": _nanmean(recall),
    "empty_classes": [name for name, e in zip(class_names, is_empty, strict=True) if e],
    "empty_class_convention": empty,
    "num_points": int(total),
    "num_unpredicted": int(confusion[1:, 0].sum()),
  }


def _nanmean(x: np.ndarray) -> float:
  """Mean of the finite entries; NaN (without a warning) when there are none."""
  finite = x[np.isfinite(x)]
  return float(finite.mean()) if finite.size else float("nan")
