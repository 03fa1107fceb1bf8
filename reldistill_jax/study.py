r"""The loss study on the synthetic world: each loss x seeds, then the gap study.

  python -m reldistill_jax.study --workdir workdir/study [--losses relational,contrastive,similarity]
      [--seeds 0,1,2] [--pretrain_steps 60] [--finetune_epochs 20] [--model minkunet34c]

Runs the embedded default (configs/default.py) once per (loss, seed), all on
one shared synthetic world (`<workdir>/data`), each in `<workdir>/<loss>_s<seed>`,
then the gap study over every run (`<workdir>/gap`: Pearson and Spearman of G
against zero-shot and few-shot mIoU). Prints a markdown table of mean and
standard deviation per loss and writes it to `<workdir>/study.md`. Finished
runs are reused when the study is restarted.
"""

import json
import pathlib

import numpy as np
from absl import flags

from configs import common
from configs import default as default_config
from configs import gap as gap_config
from reldistill_jax import cli, evaluation_runs, pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the study.", required=True)
_LOSSES = flags.DEFINE_list("losses", ["relational", "contrastive", "similarity"], "Losses.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (pretraining and fine-tuning).")
_STEPS = flags.DEFINE_integer("pretrain_steps", 60, "Pretraining steps per run.")
_EPOCHS = flags.DEFINE_integer("finetune_epochs", 20, "1% fine-tuning epochs per run.")
_MODEL = flags.DEFINE_enum(
  "model", "ptv3_base", list(common.MODELS),
  "The student (configs/default.py model=; ptv3 runs its tiny variant).",
)  # fmt: skip

COLUMNS = (("zeroshot", "miou"), ("fewshot_1pct", "miou"), ("gap", "G"))


def run_study(
  workdir: pathlib.Path, losses, seeds, steps: int, epochs: int, config_arg: str | None = None
) -> str:
  """Runs every (loss, seed) and the gap study; returns the markdown table.

  `config_arg` is the argument of configs/default.py (`"runlocal"`: a 3-scene
  world, as the notebooks use; `"model=minkunet34c"`: that student).
  """
  workdir = pathlib.Path(workdir)
  runs = {}
  for loss in losses:
    for seed in seeds:
      run = workdir / f"{loss}_s{seed}"
      if not (run / "metrics.json").is_file():
        config = default_config.get_config(config_arg)
        config.data.root = str(workdir / "data")
        config.pretrain.loss.name = loss
        config.pretrain.seed = int(seed)
        config.pretrain.num_steps = steps
        config.finetune.seed = int(seed)
        config.finetune.num_epochs = epochs
        pipeline.run_default(config, run)
      runs[(loss, seed)] = json.loads((run / "metrics.json").read_text())
  gap = gap_config.get_config()
  gap.runs = ",".join(str(workdir / f"{loss}_s{seed}") for loss, seed in runs)
  study = evaluation_runs.run_gap(gap, workdir / "gap")
  lines = [
    f"Synthetic world, {len(seeds)} seeds per loss, {steps} pretraining steps, "
    f"{epochs} epochs of 1% fine-tuning; mean +- standard deviation.",
    "",
    "| loss | zero-shot mIoU (%) | 1% few-shot mIoU (%) | structural gap G |",
    "|---|---|---|---|",
  ]
  for loss in losses:
    cells = []
    for group, key in COLUMNS:
      values = np.array([runs[(loss, s)][group][key] for s in seeds], float)
      scale = 100.0 if key == "miou" else 1.0
      cells.append(f"{scale * values.mean():.2f} +- {scale * values.std():.2f}")
    lines.append(f"| {loss} | " + " | ".join(cells) + " |")
  lines.append("")
  number = lambda x, fmt: "n/a" if x is None else format(x, fmt)
  for target, result in study["gap_study"].items():
    lines.append(
      f"G vs {target}: Pearson r = {number(result['pearson_r'], '.3f')} "
      f"(p = {number(result['pearson_p'], '.3g')}), Spearman rho = "
      f"{number(result['spearman_rho'], '.3f')} (p = {number(result['spearman_p'], '.3g')}), "
      f"n = {result['n']}"
    )
  table = "\n".join(lines) + "\n"
  (workdir / "study.md").write_text(table)
  return table


def main(argv):
  del argv
  print(
    run_study(
      pathlib.Path(_WORKDIR.value),
      _LOSSES.value,
      _SEEDS.value,
      _STEPS.value,
      _EPOCHS.value,
      config_arg=f"model={_MODEL.value}",
    )
  )


if __name__ == "__main__":
  cli.run(main)
