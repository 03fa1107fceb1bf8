"""The report writer: metrics.json, report.md and its plots."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from reldistill_jax import classes, report
from reldistill_jax.evaluators import segmentation

NAMES = classes.NUSCENES_CLASSES


def _scan(n=6000, seed=0):
  """A scan whose labels are sectors around the ego car, with 15% wrong predictions."""
  rng = np.random.default_rng(seed)
  radius, angle = 3 + 47 * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
  points = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.normal(size=n)], 1)
  label = (angle / (2 * np.pi) * 15).astype(np.int64) + 1  # ids 1..15: vegetation is empty
  label[rng.random(n) < 0.05] = 0
  pred = np.where(rng.random(n) < 0.15, rng.integers(1, 16, n), label)
  pred[(label == 0) & (rng.random(n) < 0.5)] = 3
  pred[rng.random(n) < 0.01] = 0  # points without a prediction
  return points.astype(np.float32), pred, label


def _inputs():
  points, pred, label = _scan()
  confusion = segmentation.confusion_matrix(pred, label, len(NAMES))
  zero = segmentation.segmentation_metrics(confusion, NAMES)
  better = confusion + np.diag([0] + [40] * 15 + [0])  # more correct points, vegetation empty
  few = segmentation.segmentation_metrics(better, NAMES)
  metrics = {
    "step": 2000,
    "zeroshot": zero,
    "fewshot": few | {"subset": "1% of nuScenes train (SLidR split)"},
    "structural_gap": {"G": np.float32(0.2125), "cka": jnp.asarray(0.61)},
  }
  history = [
    {"step": s, "loss": jnp.float32(3 * np.exp(-s / 500) + 0.2), "lr": 1e-3 * min(1, s / 200)}
    for s in range(0, 2001, 50)
  ]
  history += [{"step": s, "eval/zeroshot_miou": 0.1 + s / 5000} for s in (500, 1000, 2000)]
  gaps = [0.15, 0.21, 0.26, 0.33]
  gap_rows = [
    {"name": f"seed{i}", "G": jnp.float32(g), "zeroshot_miou": 0.5 - g, "fewshot_miou": 0.6 - g / 2}
    for i, g in enumerate(gaps)
  ]
  bev = {"points": points, "pred": pred, "label": label, "class_names": NAMES}
  return metrics, history, gap_rows, bev


def _check_png(path, min_size=(400, 250)):
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
  with Image.open(path) as image:
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], (path, image.size)
    pixels = np.asarray(image.convert("RGB"), np.float32)
  assert pixels.var() > 0, f"{path} is blank"


def test_write_report_with_every_input(tmp_path):
  metrics, history, gap_rows, bev = _inputs()
  written = report.write_report(
    tmp_path, metrics, history=history, gap_rows=gap_rows, bev=bev, title="Synthetic run"
  )
  assert set(written) == {
    "metrics",
    "report",
    "per_class_iou",
    "gap_vs_miou",
    "training_curves",
    "bev",
  }

  # metrics.json: valid strict JSON, NaN -> null, numpy and jax values unpacked.
  text = (tmp_path / "metrics.json").read_text()
  loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert loaded["zeroshot"]["per_class_iou"]["vegetation"] is None
  assert loaded["zeroshot"]["empty_classes"] == ["vegetation"]
  assert loaded["zeroshot"]["miou"] == pytest.approx(metrics["zeroshot"]["miou"])
  assert loaded["zeroshot"]["per_class_iou"]["car"] == pytest.approx(
    metrics["zeroshot"]["per_class_iou"]["car"]
  )
  assert loaded["structural_gap"] == pytest.approx({"G": 0.2125, "cka": 0.61}, rel=1e-6)
  assert loaded["fewshot"]["subset"] == metrics["fewshot"]["subset"]
  assert loaded["gap_study"]["zeroshot_miou"]["spearman_rho"] == pytest.approx(-1.0)
  assert loaded["gap_study"]["zeroshot_miou"]["note"] is None
  assert not list(tmp_path.glob(".*.tmp"))

  # report.md: the headline numbers, conventions, subset, and a link to every PNG.
  md = (tmp_path / "report.md").read_text()
  assert md.startswith("# Synthetic run")
  for name in ("zeroshot", "fewshot"):
    assert f"{100 * metrics[name]['miou']:.1f}" in md
    assert f"{100 * metrics[name]['accuracy']:.1f}" in md
  assert "nanmean (ScaLR)" in md and "left out of the mean" in md
  assert "1% of nuScenes train (SLidR split)" in md
  assert "structural_gap/G | 0.2125" in md and "structural_gap/cka | 0.61" in md
  assert f"| car | {100 * metrics['zeroshot']['per_class_iou']['car']:.1f} |" in md
  assert "| vegetation | n/a | n/a |" in md
  links = set(re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md))
  pngs = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "plots").glob("*.png")}
  assert links == pngs and len(pngs) == 4
  for png in pngs:
    _check_png(tmp_path / png)


def test_metrics_json_is_replaced_atomically(tmp_path):
  path = report.write_metrics_json(tmp_path / "metrics.json", {"miou": 0.5, "x": [1.0, np.inf]})
  assert json.loads(path.read_text()) == {"miou": 0.5, "x": [1.0, None]}
  with pytest.raises(TypeError, match="object"):
    report.write_metrics_json(path, {"miou": 0.7, "bad": object()})
  assert json.loads(path.read_text())["miou"] == 0.5  # the old file survives a failed write
  report.write_metrics_json(path, {"miou": np.float64(0.7), "n": np.int64(3)})
  assert json.loads(path.read_text()) == {"miou": 0.7, "n": 3}
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_report_with_metrics_only(tmp_path):
  metrics = {"zeroshot": {"miou": float("nan"), "per_class_iou": {"a": None}}, "note": "empty"}
  written = report.write_report(tmp_path, metrics, per_class={})
  assert set(written) == {"metrics", "report"}
  md = (tmp_path / "report.md").read_text()
  assert "| zeroshot | n/a |" in md and "plots/" not in md
  assert json.loads((tmp_path / "metrics.json").read_text())["zeroshot"]["miou"] is None


def test_plot_functions_alone(tmp_path):
  _check_png(report.plot_per_class_iou({"car": 0.5, "bus": float("nan")}, tmp_path / "one.png"))
  rows = [{"name": "a", "G": 0.1, "zeroshot_miou": 0.3}, {"name": "b", "G": 0.2}]
  _check_png(report.plot_gap_scatter(rows, tmp_path / "gap.png"))  # too few runs: a note
  points, pred, label = _scan(800, seed=1)
  colours = [(i / 20, 0.2, 1 - i / 20) for i in range(15)]
  bev = report.plot_bev(points, pred, label, NAMES[:15], tmp_path / "bev.png", colours=colours)
  _check_png(bev)
  _check_png(report.plot_training_curves([{"step": 1, "loss": jnp.float32(2)}], tmp_path / "c.png"))
  with pytest.raises(ValueError, match="no scalar"):
    report.plot_training_curves([{"step": 1}], tmp_path / "none.png")
  with pytest.raises(ValueError, match="miou"):
    report.plot_gap_scatter([{"name": "a", "G": 0.1}], tmp_path / "none.png")


def test_class_palette():
  palette = report.class_palette(NAMES)
  assert palette.shape == (16, 3)
  assert len({tuple(c) for c in palette}) == 16  # distinct colours
  kitti = report.class_palette(classes.SEMANTIC_KITTI_CLASSES)
  assert len({tuple(c) for c in kitti}) == 19
  assert report.class_palette(("a", "b"), {"a": "red", "b": "#0000ff"}).tolist() == [
    [1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0],
  ]
  with pytest.raises(ValueError, match="colours"):
    report.class_palette(("a", "b"), ["red"])
