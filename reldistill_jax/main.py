r"""Entry point: `python -m reldistill_jax.main --config configs/<x>.py[:args] --workdir DIR`.

Overrides: `--config.optimizer.lr=0.1`. The config's `kind` picks what runs:
`pretrain` (reldistill_jax.train), `finetune` (reldistill_jax.finetune: few-shot
fine-tuning or linear probing, then evaluation on the validation scans),
`default` (reldistill_jax.pipeline: the whole pipeline on the synthetic world),
`zeroshot` (a checkpoint's zero-shot mIoU) or `gap` (the structural-gap study
across runs; both reldistill_jax.evaluation_runs). A wrong field or value fails
before any work, naming it.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run (checkpoints, metrics, report).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  logging.info(
    "process %d of %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  if config.kind == "pretrain":
    from reldistill_jax import train

    _require(config, "input.buckets", "input.features")
    train.train_and_evaluate(config, _WORKDIR.value)
  elif config.kind == "finetune":
    from reldistill_jax import finetune

    _require(config, "input.buckets", "input.val_buckets")
    finetune.finetune_and_evaluate(config, _WORKDIR.value)
  elif config.kind == "default":
    from reldistill_jax import pipeline

    pipeline.run_default(config, _WORKDIR.value)
  elif config.kind == "zeroshot":
    from reldistill_jax import evaluation_runs

    _require(config, "checkpoint", "input.val_buckets", "text_embeddings")
    evaluation_runs.run_zeroshot(config, _WORKDIR.value)
  elif config.kind == "gap":
    from reldistill_jax import evaluation_runs

    _require(config, "runs")
    evaluation_runs.run_gap(config, _WORKDIR.value)
  else:
    raise ValueError(f"config.kind: unknown kind {config.kind!r}")


def _require(config, *fields: str) -> None:
  """Fails naming the first required config field left unset."""
  for field in fields:
    value = config
    for part in field.split("."):
      value = value[part]
    if value is None:
      raise ValueError(f"config.{field} is not set (pass --config.{field}=...)")


if __name__ == "__main__":
  app.run(main)
