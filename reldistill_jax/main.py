r"""Entry point: `python -m reldistill_jax.main --config configs/<x>.py[:args] --workdir DIR`.

Overrides: `--config.optimizer.lr=0.1`. The config's `kind` picks what runs:
`pretrain` (reldistill_jax.train), `finetune` (reldistill_jax.finetune: few-shot
fine-tuning or linear probing, then evaluation on the validation scans),
`default` (reldistill_jax.pipeline: the whole pipeline on the synthetic world),
`zeroshot` (a checkpoint's zero-shot mIoU) or `gap` (the structural-gap study
across runs; both reldistill_jax.evaluation_runs). A wrong field or value fails
before any work, naming it.

Reads what the config names: bucket stores (`input.buckets`,
`input.val_buckets`), a teacher feature store (`input.features`), checkpoint
folders (`checkpoint.init_from`, `checkpoint.resume`, `checkpoint`), text
embeddings, finished runs (`runs`); the default reads nothing and makes its own
data. Writes under --workdir: `checkpoints/` (orbax), `tensorboard/`,
`metrics.json`, `report.md` and `plots/` (which of them: README, Configs).

Several processes (hosts, or GPUs of one host), each running this command:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or
`--distributed` alone where JAX detects the cluster (Cloud TPU pod slices,
SLURM, Open MPI). The mesh then spans every process's devices and each process
reads its slice of every global batch (reldistill_jax.distributed).
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from reldistill_jax import distributed

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run (checkpoints, metrics, report).")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0's coordinator, for a multi-process run (all processes pass the same).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes of a multi-process run.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in 0 .. num_processes - 1.", lower_bound=0
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process run, detecting what --coordinator_address, --num_processes and "
  "--process_id leave unset (Cloud TPU pod slice, SLURM, Open MPI; the coordinator also from "
  "$JAX_COORDINATOR_ADDRESS).",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  # Before anything else touches JAX.
  distributed.initialize(
    _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value
  )
  logging.info(
    "process %d of %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  if config.kind == "pretrain":
    from reldistill_jax import train

    _require(config, "input.buckets", "input.features")
    out = train.train_and_evaluate(config, _WORKDIR.value)
    # Every process's view of the last step (equal across processes; process 0 also logs it).
    logging.info(
      "process %d of %d, last measurements: %s",
      jax.process_index(),
      jax.process_count(),
      json.dumps(out["measurements"], sort_keys=True),
    )
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
