"""Evaluation reports: `metrics.json`, a readable `report.md` and PNG plots.

`write_report(workdir, metrics, ...)` writes

  workdir/metrics.json   the metrics as nested dicts (NaN and inf -> null),
                         replaced atomically (temp file + rename);
  workdir/report.md      headline table (mIoU, accuracies, the empty-class
                         convention, the labelled subset), other measurements,
                         per-class IoU, the gap study, and the plots embedded
                         by relative path;
  workdir/plots/*.png    the plots whose inputs are given.

Every plot function is public and writes one PNG. Figures are built with the
object-oriented API on an Agg canvas, never through pyplot, so no global
figure state is touched (notebooks keep their backend) and nothing stays open.

In `metrics`, a dict holding a "miou" key is an evaluation (at any depth, e.g.
{"zeroshot": segmentation_metrics(...), "fewshot": {...}}); its
"empty_class_convention" and a "subset" (text) or "label_fraction" (e.g.
0.01), on it or on the top level, are named in the headline table.
"""

import json
import math
import pathlib
import statistics
import sys
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from reldistill_jax import files
from reldistill_jax.evaluators import segmentation, structural_gap

IGNORE_COLOUR = "#c8c8c8"  # points labelled 0, in both BEV panels
UNPREDICTED_COLOUR = "#000000"  # labelled points with prediction 0
# Semantic colours of the 16 nuScenes classes, all distinct on white.
NUSCENES_COLOURS = {
  "barrier": "#f58231", "bicycle": "#911eb4", "bus": "#ffe119", "car": "#4363d8",
  "construction vehicle": "#9a6324", "motorcycle": "#f032e6", "pedestrian": "#e6194b",
  "traffic cone": "#000075", "trailer": "#800000", "truck": "#42d4f4",
  "driveable surface": "#dcbeff", "other flat": "#fabed4", "sidewalk": "#469990",
  "terrain": "#bfef45", "manmade": "#808000", "vegetation": "#3cb44b",
}  # fmt: skip
# Any other class list: distinct colours in order (Trubetskoy's list without grey).
_DISTINCT = (
  "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
  "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#808000", "#000075",
  "#aaffc3", "#ffd8b1", "#b8860b",
)  # fmt: skip
_EVAL_KEYS = ("miou", "accuracy", "mean_class_accuracy", "empty_class_convention", "empty_classes")
_SUBSET_KEYS = ("subset", "label_fraction")
_SHORT_CONVENTION = {"nan": "nanmean (ScaLR)", "one": "empty = 1 (SLidR)"}


def class_palette(class_names: Sequence[str], colours=None) -> np.ndarray:
  """(C, 3) RGB colours in [0, 1] of training ids 1..C.

  Args:
    class_names: names of ids 1..C.
    colours: None for the default (nuScenes' semantic colours when the names
      are nuScenes', else a list of distinct colours), a sequence of C
      matplotlib colours, or a mapping name -> colour.
  """
  if colours is None:
    if all(name in NUSCENES_COLOURS for name in class_names):
      colours = NUSCENES_COLOURS
    else:
      hues = np.linspace(0, 1, len(class_names), endpoint=False)  # beyond the distinct list
      colours = [*_DISTINCT, *(mcolors.hsv_to_rgb((h, 0.8, 0.8)) for h in hues)][: len(class_names)]
  if isinstance(colours, Mapping):
    colours = [colours[name] for name in class_names]
  if len(colours) != len(class_names):
    raise ValueError(f"{len(colours)} colours for {len(class_names)} classes")
  return np.array([mcolors.to_rgb(c) for c in colours])


def figure(width: float, height: float) -> Figure:
  """A new figure on its own Agg canvas (no pyplot state)."""
  fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig: Figure, path) -> pathlib.Path:
  """Writes `fig` as a PNG at `path` (parents created) and releases it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, facecolor="white")
  fig.clear()
  return path


def plot_training_curves(history: Sequence[Mapping], path, title: str = "Training curves"):
  """One panel per scalar series of `history`, against the step.

  Args:
    history: records {"step": int, name: value, ...}; a series may be
      missing from some records (e.g. evaluated less often).
    path: the PNG to write.
    title: the figure title.

  Returns:
    The path written.
  """
  history = to_jsonable(history)  # numpy and jax scalars as floats
  names = [k for k in dict.fromkeys(k for rec in history for k in rec) if k != "step"]
  series = {}
  for name in names:
    points = [(rec["step"], float(rec[name])) for rec in history if _is_number(rec.get(name))]
    if points:
      series[name] = np.array(points)  # (T, 2) step, value
  if not series:
    raise ValueError("history holds no scalar series")
  cols = min(3, len(series))
  rows = math.ceil(len(series) / cols)
  fig = figure(4.3 * cols, 3.0 * rows + 0.4)
  axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax, (name, points) in zip(axes, series.items(), strict=False):
    ax.plot(points[:, 0], points[:, 1], marker="." if len(points) < 30 else None, lw=1.3)
    values = points[:, 1][np.isfinite(points[:, 1])]
    if values.size and values.min() > 0 and values.max() > 100 * values.min():
      ax.set_yscale("log")
    ax.set(title=name, xlabel="step (optimizer updates)", ylabel=name)
    ax.grid(alpha=0.3)
  for ax in axes[len(series) :]:
    ax.set_visible(False)
  fig.suptitle(title, fontsize=13)
  return save_figure(fig, path)


def plot_per_class_iou(per_class: Mapping, path, title: str = "Per-class IoU"):
  """IoU bars per class, one bar per run side by side.

  Args:
    per_class: {class: IoU fraction} for one run, or {run: {class: IoU}} for
      several (e.g. zero-shot and few-shot). NaN or None: an empty class,
      marked "n/a".
    path: the PNG to write.
    title: the figure title.

  Returns:
    The path written.
  """
  runs = _runs(to_jsonable(per_class))
  class_names = list(dict.fromkeys(c for ious in runs.values() for c in ious))
  width = 0.8 / len(runs)
  fig = figure(max(8.0, 0.42 * len(class_names) * (1 + 0.5 * len(runs)) + 1.5), 5.0)
  ax = fig.subplots()
  x = np.arange(len(class_names))
  values = {
    run: 100 * np.array([ious.get(c) for c in class_names], float) for run, ious in runs.items()
  }
  peak = max([np.nanmax(v) for v in values.values() if np.isfinite(v).any()], default=0.0)
  top = min(100.0, max(10.0, 10.0 * math.ceil(peak / 10.0)))  # the axis fits the values
  for r, (run, run_values) in enumerate(values.items()):  # (C,) %, None -> NaN
    offset = x - 0.4 + width * (r + 0.5)
    ax.bar(offset, np.nan_to_num(run_values), width, label=run, edgecolor="white", linewidth=0.5)
    for xi, v in zip(offset, run_values, strict=True):
      text = f"{v:.0f}" if np.isfinite(v) else "n/a"
      ax.text(xi, np.nan_to_num(v) + 0.01 * top, text, ha="center", va="bottom", fontsize=7,
              rotation=90)  # fmt: skip
  ax.set_xticks(x, class_names, rotation=40, ha="right")
  ax.set(xlim=(-0.6, len(class_names) - 0.4), ylim=(0, 1.12 * top), title=title)
  ax.set(xlabel="class", ylabel="IoU (%)")
  ax.grid(axis="y", alpha=0.3)
  if len(runs) > 1:
    fig.legend(loc="outside right upper")
  return save_figure(fig, path)


def plot_gap_scatter(rows: Sequence[Mapping], path, x: str = "G", study=None):
  """mIoU against the structural gap across runs, one panel per mIoU.

  Args:
    rows: one dict per run, as `structural_gap.gap_study` takes.
    path: the PNG to write.
    x: the gap key.
    study: `gap_study(rows, x)` if already computed.

  Returns:
    The path written.
  """
  rows = to_jsonable(rows)
  study = study or structural_gap.gap_study(rows, x)
  if not study:
    raise ValueError("the gap rows hold no key ending in 'miou'")
  fig = figure(6.6 * len(study), 5.2)
  axes = np.atleast_1d(fig.subplots(1, len(study), squeeze=False)).ravel()
  for ax, (target, result) in zip(axes, study.items(), strict=True):
    used = [r for r in rows if _finite(r.get(x)) and _finite(r.get(target))]
    gx = np.array([float(r[x]) for r in used])
    gy = np.array([float(r[target]) * 100 for r in used])
    ax.scatter(gx, gy, s=40, zorder=3)
    for r, xi, yi in zip(used, gx, gy, strict=True):
      name = pathlib.PurePath(str(r.get("name", ""))).name  # a run folder: its last part
      ax.annotate(name, (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=8)
    if result["note"] is None:
      slope, intercept = np.polyfit(gx, gy, 1)
      line = np.linspace(gx.min(), gx.max(), 2)
      ax.plot(line, slope * line + intercept, "--", color="0.5", lw=1, label="least-squares fit")
      ax.legend(loc="best", fontsize=8)
      p = lambda v: "p < 0.0001" if v < 1e-4 else f"p = {v:.2g}"
      subtitle = (
        f"Pearson r = {result['pearson_r']:.2f} ({p(result['pearson_p'])}), "
        f"Spearman ρ = {result['spearman_rho']:.2f} ({p(result['spearman_p'])}), n = {result['n']}"
      )
    else:
      subtitle = textwrap.fill(f"no correlation: {result['note']}", 70)
    ax.set_title(f"{target} vs {x}\n{subtitle}", fontsize=9)
    xlabel = "structural gap G (mean |k_i·k_j − q_i·q_j|)" if x == "G" else x
    ax.set(xlabel=xlabel, ylabel=f"{target} (%)")
    ax.margins(0.12)
    ax.grid(alpha=0.3)
  fig.suptitle("Structural gap vs mIoU across trained models", fontsize=12)
  return save_figure(fig, path)


def plot_bev(points, pred, label, class_names, path, colours=None, extent=None, title=None):
  """Bird's-eye view of one scan: predictions next to labels.

  Args:
    points: (N, 3+) point coordinates in metres (x, y used).
    pred: (N,) predicted training ids 0..C (0 = no prediction, black).
    label: (N,) label training ids 0..C (0 = ignore: grey in both panels).
    class_names: names of ids 1..C.
    path: the PNG to write.
    colours: the class palette (`class_palette`'s argument).
    extent: half-width of the square view in metres; default from the points.
    title: the figure title.

  Returns:
    The path written.
  """
  xy = np.asarray(points)[:, :2]
  pred, label = np.asarray(pred).astype(np.int64), np.asarray(label).astype(np.int64)
  palette = np.vstack([mcolors.to_rgb(UNPREDICTED_COLOUR), class_palette(class_names, colours)])
  if extent is None:
    extent = max(10.0, 10.0 * math.ceil(np.percentile(np.abs(xy), 98) / 10.0)) if len(xy) else 10.0
  scored = label != 0
  order = np.argsort(scored, kind="stable")  # ignored points drawn first, underneath
  accuracy = float((pred[scored] == label[scored]).mean()) if scored.any() else float("nan")
  fig = figure(13.0, 8.0)
  axes = fig.subplots(1, 2, sharex=True, sharey=True)
  panels = (("Labels", label), (f"Predictions (accuracy {accuracy:.1%} on labelled points)", pred))
  size = float(np.clip(1.2e5 / max(len(xy), 1), 1.0, 8.0))  # marker area, points^2
  for ax, (name, ids) in zip(axes, panels, strict=True):
    rgb = np.where(scored[:, None], palette[ids], mcolors.to_rgb(IGNORE_COLOUR))  # (N, 3)
    ax.scatter(*xy[order].T, c=rgb[order], s=size, marker="o", linewidths=0, rasterized=True)
    ax.plot(0, 0, marker="^", color="red", ms=7, ls="none")  # the ego vehicle
    ax.set(title=name, xlabel="x (m)", ylabel="y (m)", xlim=(-extent, extent))
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
  present = np.unique(np.concatenate([label[scored], pred[scored]]))
  handles = [Patch(color=palette[i], label=class_names[i - 1]) for i in present if i > 0]
  if (pred[scored] == 0).any():
    handles.append(Patch(color=UNPREDICTED_COLOUR, label="no prediction"))
  handles.append(Patch(color=IGNORE_COLOUR, label="ignore (label 0, not scored)"))
  fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=9)
  fig.suptitle(
    title or f"Bird's-eye view, {len(xy):,} points (ego at the red triangle)", fontsize=12
  )
  return save_figure(fig, path)


def describe_miou(metrics: Mapping) -> str:
  """`12.3% over 16 scans (empty-union classes left out)`: an evaluation in words."""
  convention = {
    "nan": "empty-union classes left out",
    "one": "empty-union classes scored 1",
  }.get(metrics.get("empty_class_convention"), "")
  return f"{_pct(metrics['miou'])}% over {metrics.get('num_scans', '?')} scans ({convention})"


def print_results(title: str, rows: Mapping[str, str], workdir) -> None:
  """The result block a command prints at its end: one row per result, then where they are."""
  workdir = pathlib.Path(workdir).absolute()
  rows = dict(rows) | {"workdir": str(workdir)}
  if (workdir / "report.md").is_file():
    rows["report"] = str(workdir / "report.md")
  width = max(map(len, rows))
  lines = [f"reldistill-jax {title}:", *(f"  {k:<{width}}  {v}" for k, v in rows.items())]
  sys.stdout.write("\n" + "\n".join(lines) + "\n")
  sys.stdout.flush()


def step_times(history) -> dict[str, str]:
  """The result rows of a run's times: its last compilation and its median step time."""
  compiles = [r["compile_time"] for r in history if "compile_time" in r]
  steps = [r["step_time"] for r in history if "step_time" in r]
  rows = {}
  if compiles:
    rows["compile time"] = f"{compiles[-1]:.1f} s (the first step of the last start)"
  if steps:
    rows["step time"] = f"{statistics.median(steps):.3f} s (median)"
  return rows


def to_jsonable(value):
  """`value` as JSON types: arrays and numpy/jax scalars unpacked, NaN/inf -> None."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist") and not isinstance(value, str):  # numpy and jax values
    return to_jsonable(value.tolist())
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if value is None or isinstance(value, str | int):  # bool is an int
    return value
  raise TypeError(f"cannot write {type(value).__name__} to metrics.json")


def write_metrics_json(path, metrics: Mapping) -> pathlib.Path:
  """Writes `metrics` as indented JSON (NaN and inf as null), atomically."""
  path = pathlib.Path(path)
  text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n"
  files.atomic_write(path, text)
  return path


def write_report(
  workdir,
  metrics: Mapping,
  history=None,
  per_class=None,
  gap_rows=None,
  bev=None,
  title: str = "reldistill-jax evaluation",
) -> dict[str, pathlib.Path]:
  """Writes metrics.json, report.md and the plots whose inputs are given.

  Args:
    workdir: the output directory (created if needed).
    metrics: nested dict of measurements (module docstring).
    history: training records for `plot_training_curves`.
    per_class: {run: {class: IoU}} or {class: IoU}; default: the
      `per_class_iou` of every evaluation in `metrics`.
    gap_rows: runs for `structural_gap.gap_study`; its result is written
      into metrics.json as "gap_study" (unless `metrics` holds one).
    bev: keyword arguments of `plot_bev` without `path`.
    title: the report's title.

  Returns:
    {"metrics": path, "report": path, plus one entry per plot written}.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  metrics = to_jsonable(metrics)  # plain Python values, NaN as None, for the tables too
  evaluations = dict(_evaluations(metrics))
  if per_class is None:
    per_class = {n: e["per_class_iou"] for n, e in evaluations.items() if "per_class_iou" in e}
  study = structural_gap.gap_study(gap_rows) if gap_rows else None
  document = metrics | ({"gap_study": study} if study and "gap_study" not in metrics else {})
  written = {"metrics": write_metrics_json(workdir / "metrics.json", document)}

  plots = workdir / "plots"
  if per_class:
    written["per_class_iou"] = plot_per_class_iou(
      per_class, plots / "per_class_iou.png", title=f"Per-class IoU: {title}"
    )
  if study:
    written["gap_vs_miou"] = plot_gap_scatter(gap_rows, plots / "gap_vs_miou.png", study=study)
  if history:
    written["training_curves"] = plot_training_curves(history, plots / "training_curves.png")
  if bev:
    written["bev"] = plot_bev(**bev, path=plots / "bev.png")

  others = [(name, _fmt(name, value)) for name, value in _leaves(metrics)]
  md = [f"# {title}\n", *_headline(metrics, evaluations)]
  md += (
    ["## Other measurements\n", _table(("Measurement", "Value"), others, "lr")] if others else []
  )
  md += _per_class_section(per_class) if per_class else []
  md += _gap_section(gap_rows, study) if study else []
  for key, caption in (("training_curves", "Training curves"), ("bev", "Bird's-eye view")):
    md += [f"## {caption}\n", f"![{caption}](plots/{key}.png)\n"] if key in written else []
  written["report"] = workdir / "report.md"
  files.atomic_write(written["report"], "\n".join(md))
  return written


# Markdown sections.


def _is_number(value) -> bool:
  return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _finite(value) -> bool:
  return _is_number(value) and math.isfinite(float(value))


def _runs(per_class: Mapping) -> dict[str, Mapping]:
  first = next(iter(per_class.values()), None)
  return dict(per_class) if isinstance(first, Mapping) else {"IoU": per_class}


def _evaluations(metrics: Mapping, prefix: str = ""):
  """(name, dict) of every dict in `metrics` holding "miou"."""
  if "miou" in metrics:
    yield prefix or "metrics", metrics
  for key, value in metrics.items():
    if isinstance(value, Mapping) and key != "gap_study":
      yield from _evaluations(value, f"{prefix}/{key}" if prefix else str(key))


def _pct(value) -> str:
  return f"{100 * float(value):.1f}" if _finite(value) else "n/a"


def _fmt(key: str, value) -> str:
  if value is None or (_is_number(value) and not _finite(value)):
    return "n/a"
  if _is_number(value) and key.split("/")[-1].endswith(("miou", "iou", "accuracy")):
    return f"{_pct(value)} %"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _subset(evaluation: Mapping, metrics: Mapping) -> str:
  for source in (evaluation, metrics):
    if source.get("subset") is not None:
      return str(source["subset"])
    if _is_number(source.get("label_fraction")):
      return f"{100 * float(source['label_fraction']):g}% of the labels"
  return "n/a"


def _table(header: Sequence, rows: Sequence[Sequence], align: str) -> str:
  """A markdown table; `align` holds "l" or "r" per column."""
  line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
  rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
  return "\n".join([line(header), rule, *map(line, rows)]) + "\n"


def _headline(metrics: Mapping, evaluations: Mapping) -> list[str]:
  if not evaluations:
    return []
  header = ("Evaluation", "mIoU (%)", "Accuracy (%)", "Mean class accuracy (%)")
  header += ("mIoU convention", "Empty classes", "Labelled subset")
  rows = []
  for name, e in evaluations.items():
    convention = _SHORT_CONVENTION.get(e.get("empty_class_convention"), "n/a")
    empty = ", ".join(e.get("empty_classes") or []) or "none"
    accuracies = (_pct(e["miou"]), _pct(e.get("accuracy")), _pct(e.get("mean_class_accuracy")))
    rows.append((name, *accuracies, convention, empty, _subset(e, metrics)))
  used = {e.get("empty_class_convention") for e in evaluations.values()}
  notes = [
    f"mIoU convention `{c}`: {m}.  " for c, m in segmentation.EMPTY_CONVENTIONS.items() if c in used
  ]
  notes.append("Points labelled 0 (ignore) are excluded from every metric.\n")
  return ["## Headline metrics\n", _table(header, rows, "lrrrlll"), *notes]


def _leaves(metrics: Mapping, prefix: str = ""):
  """(path, value) of the scalars that the headline table does not show."""
  for key, value in metrics.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      if key not in ("per_class_iou", "gap_study"):
        yield from _leaves(value, name)
    elif _is_number(value) or isinstance(value, str) or value is None:
      if not ("miou" in metrics and key in _EVAL_KEYS) and key not in _SUBSET_KEYS:
        yield name, value


def _per_class_section(per_class: Mapping) -> list[str]:
  runs = _runs(per_class)
  class_names = list(dict.fromkeys(c for ious in runs.values() for c in ious))
  rows = [(c, *(_pct(ious.get(c)) for ious in runs.values())) for c in class_names]
  table = _table(("Class", *runs), rows, "l" + "r" * len(runs))
  note = "n/a: the class has an empty union (no labelled point and no prediction).\n"
  return ["## Per-class IoU (%)\n", table, note, "![Per-class IoU](plots/per_class_iou.png)\n"]


def _gap_section(rows: Sequence[Mapping], study: Mapping) -> list[str]:
  keys = ["G", *(k for k in ("cka",) if any(k in r for r in rows)), *study]
  runs = [
    (r.get("name", f"run {i}"), *(_fmt(k, r.get(k)) for k in keys)) for i, r in enumerate(rows)
  ]
  stats = ("pearson_r", "pearson_p", "spearman_rho", "spearman_p")
  header = ("Target", "n", "Pearson r", "p", "Spearman ρ", "p", "Note")
  results = [
    (t, s["n"], *(_fmt("", s[k]) for k in stats), s["note"] or "") for t, s in study.items()
  ]
  return [
    "## Structural gap vs mIoU\n",
    _table(("Run", *keys), runs, "l" + "r" * len(keys)),
    _table(header, results, "lrrrrrl"),
    "The paper's claim: G correlates negatively with mIoU.\n",
    "![Structural gap vs mIoU](plots/gap_vs_miou.png)\n",
  ]
