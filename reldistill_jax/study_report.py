"""The loss study's table and figures (`study.py` computes them).

`markdown(study)`: the table of every configuration (mean +- std [95% t
interval] over seeds) beside the teacher's ceiling, the sweep's choices, the
paper's claims and the relational ablations with their paired tests, and the
gap study. `plot_curves`: zero-shot mIoU against pretraining steps per
configuration with the ceiling. `plot_bars`: zero-shot mIoU on the paired
points per configuration against the ceiling.
"""

import pathlib

import numpy as np

from reldistill_jax import curves, report


def _cell(s: dict, scale: float, digits: int = 2) -> str:
  if s["mean"] is None:
    return "n/a"
  if s["ci95"] is None:
    return f"{scale * s['mean']:.{digits}f}"
  low, high = (scale * v for v in s["ci95"])
  d = digits
  return f"{scale * s['mean']:.{d}f} +- {scale * s['std']:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def _classes(s: dict) -> str:
  return "n/a" if s["mean"] is None else f"{s['mean']:.1f}"


def _world(preset: dict) -> str:
  """The world, student and sizes of a preset, in words."""
  size = f"configs/default.py:{preset['world']}" if preset["world"] else "configs/default.py"
  if preset.get("scenes"):
    size += f", {preset['scenes']} scenes"
    if preset.get("samples_per_scene"):
      size += f" of {preset['samples_per_scene']} keyframe(s)"
  if preset.get("variant"):
    size += f", the `{preset['variant']}` student"
  if preset.get("batch_size"):
    size += f", {preset['batch_size']} scans a step"
  return size


def _bound(study: dict) -> str:
  bound = study.get("supervised_bound")
  if bound is None:
    return ""
  text = (
    f" The same student trained from scratch on every labelled training scan (the supervised "
    f"bound): {100 * bound:.2f}%."
  )
  if study.get("from_scratch_1pct") is not None:
    text += f" From scratch on the 1% subset: {100 * study['from_scratch_1pct']:.2f}%."
  return text


def _settings(settings: dict) -> str:
  return ", ".join(f"{k} {v:g}" for k, v in settings.items())


def _test_line(test: dict) -> str:
  if test["p_value"] is None:
    difference = test.get("mean_difference")
    shown = "" if difference is None else f"; mean difference {100 * difference:.2f} points"
    return f"- {test['claim']}: no test ({test['note']}{shown})."
  low, high = (100 * v for v in test["ci95_difference"])
  verdict = "holds" if test["holds"] else "not supported"
  return (
    f"- {test['claim']}: {verdict} (paired t-test over {test['n']} seeds, one-sided p = "
    f"{test['p_value']:.3g}; mean difference {100 * test['mean_difference']:.2f} points, "
    f"95% interval [{low:.2f}, {high:.2f}])."
  )


def _table(study: dict) -> list[str]:
  lines = [
    "| configuration | zero-shot mIoU (%) | on the paired points (%) | share of the ceiling | "
    "1% few-shot mIoU (%) | OOD 1% few-shot mIoU (%) | G | classes recognised | converged |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, s in study["summary"].items():
    paired = s["zeroshot_miou_paired"]["mean"]
    share = "n/a" if paired is None else f"{100 * paired / study['teacher_ceiling']:.0f}%"
    lines.append(
      f"| {name} | {_cell(s['zeroshot_miou'], 100)} | {_cell(s['zeroshot_miou_paired'], 100)} | "
      f"{share} | {_cell(s['fewshot_miou'], 100)} | {_cell(s['fewshot_ood_miou'], 100)} | "
      f"{_cell(s['G'], 1, 3)} | {_classes(s['zeroshot_classes'])} | {s['converged']} |"
    )
  return lines


def markdown(study: dict) -> str:
  """The study's table (mean +- std [95% t interval]), its sweep, tests and gap study."""
  preset = study["preset"]
  ceiling = 100 * study["teacher_ceiling"]
  lines = [
    f"Synthetic world ({_world(preset)}), {len(preset['seeds'])} seeds per configuration, "
    f"{preset['steps']} pretraining steps, {preset['epochs']} epochs of 1% fine-tuning; "
    "mean +- std [95% t interval]. Teacher's zero-shot mIoU at the paired points (the "
    f"ceiling): {ceiling:.2f}% ({study['teacher_classes']} classes recognised)."
    f"{_bound(study)} Classes recognised: how many classes a student reaches an IoU of at "
    f"least {100 * study['recognised_iou']:g}% on, zero-shot (mean over seeds).",
    "",
    *_table(study),
    "",
  ]
  for loss, result in study.get("sweep", {}).items():
    tried = ", ".join(
      f"{_settings(t['settings'])}: {100 * t['verify_zeroshot_miou']:.2f}%"
      for t in result["trials"]
    )
    lines.append(f"- {loss}: {_settings(result['chosen'])} chosen on train_verify ({tried}).")
  lines += [_test_line(test) for test in study["tests"]]
  lines += [_test_line(test) for test in study.get("ablations", [])]
  for target, result in study["gap_study"].items():
    rho = result["spearman_rho"]
    lines.append(
      f"- G against {target}: Pearson r = {result['pearson_r']:.3f} (p = "
      f"{result['pearson_p']:.3g}), Spearman rho = {rho:.3f} (p = {result['spearman_p']:.3g}), "
      f"n = {result['n']}."
      if rho is not None and np.isfinite(rho)
      else f"- G against {target}: {result['note']}."
    )
  return "\n".join(lines) + "\n"


def plot_curves(histories: dict, ceiling: float, path) -> pathlib.Path:
  """Zero-shot mIoU against steps, one line per configuration (mean over seeds, seeds faint)."""
  fig = report.figure(7.0, 4.2)
  ax = fig.subplots()
  names = list(dict.fromkeys(name for name, _ in histories))
  for i, name in enumerate(names):
    colour = f"C{i}"
    runs = [np.array(c[curves.KEY], float) for (n, _), c in histories.items() if n == name]
    for r in runs:
      ax.plot(r[:, 0], 100 * r[:, 1], color=colour, alpha=0.25, lw=0.8)
    if all(len(r) == len(runs[0]) for r in runs):
      ax.plot(runs[0][:, 0], 100 * np.mean([r[:, 1] for r in runs], 0), color=colour, label=name)
  ax.axhline(100 * ceiling, color="k", ls="--", lw=1, label="teacher (ceiling, paired points)")
  ax.set(xlabel="pretraining step", ylabel="zero-shot mIoU (%)", title="Zero-shot mIoU per loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return report.save_figure(fig, path)


def plot_bars(study: dict, path) -> pathlib.Path:
  """Zero-shot mIoU on the paired points per configuration (mean, 95% interval) and the ceiling."""
  fig = report.figure(7.5, 4.2)
  ax = fig.subplots()
  names = list(study["summary"])
  means = [100 * (study["summary"][n]["zeroshot_miou_paired"]["mean"] or 0) for n in names]
  errors = [
    [m - 100 * ci[0], 100 * ci[1] - m] if (ci := study["summary"][n]["zeroshot_miou_paired"]["ci95"])
    else [0, 0]
    for m, n in zip(means, names, strict=True)
  ]  # fmt: skip
  ax.bar(
    names, means, yerr=np.array(errors).T, capsize=4, color=[f"C{i}" for i in range(len(names))]
  )
  ax.axhline(100 * study["teacher_ceiling"], color="k", ls="--", lw=1, label="teacher (ceiling)")
  if study.get("supervised_bound") is not None:
    bound = 100 * study["supervised_bound"]
    ax.axhline(bound, color="grey", ls=":", lw=1, label="supervised, every label (all points)")
  ax.set(ylabel="zero-shot mIoU on the paired points (%)", title="Students against the ceiling")
  ax.tick_params(axis="x", labelrotation=30, labelsize=7)
  ax.legend(fontsize=8)
  return report.save_figure(fig, path)
