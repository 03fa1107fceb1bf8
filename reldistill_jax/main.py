r"""Entry point: `python -m reldistill_jax.main --config configs/<x>.py[:args] --workdir DIR`.

Overrides: `--config.optimizer.lr=0.1`. The config's `kind` picks what runs:
`pretrain` (reldistill_jax.train), `finetune` (reldistill_jax.finetune: few-shot
fine-tuning or linear probing, then evaluation on the validation scans),
`default` (reldistill_jax.pipeline: the whole pipeline on the synthetic world),
`zeroshot` (a checkpoint's zero-shot mIoU) or `gap` (the structural-gap study
across runs; both reldistill_jax.evaluation_runs). A wrong field or value fails
before any work, naming it, in one line with exit status 2 (errors.py lists the
statuses); `--verbose` shows library logs and tracebacks. The workdir keeps
the config a run was started with (config.json); a restart with a config that
changes the result is refused unless `--override_config`.

Reads what the config names: bucket stores (`input.buckets`,
`input.val_buckets`), a teacher feature store (`input.features`), checkpoints
(`checkpoint.init_from`, `checkpoint.resume`, `checkpoint`: a run's workdir, its
checkpoints/ folder or one checkpoints/<step> folder), text embeddings, finished
runs (`runs`); the default reads nothing and makes its own data. Writes under
--workdir: `checkpoints/` (orbax), `tensorboard/`, `metrics.json`, `report.md`
and `plots/` (which of them: README, Configs).

Several processes (hosts, or GPUs of one host), each running this command:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or
`--distributed` alone where JAX detects the cluster (Cloud TPU pod slices,
SLURM, Open MPI). The mesh then spans every process's devices and each process
reads its slice of every global batch (reldistill_jax.distributed).
"""

import json
import pathlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from reldistill_jax import cli, config_checks, distributed, errors, report, workdir_lock

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


_OVERRIDE = flags.DEFINE_bool(
  "override_config",
  False,
  "Continue a run in --workdir although its config differs from the one it was started with "
  "(the change is recorded in workdir/config_changes.jsonl).",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  # Before anything else touches JAX.
  distributed.initialize(
    _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value
  )
  config_checks.validate(config)
  workdir = pathlib.Path(_WORKDIR.value)
  process, processes = jax.process_index(), jax.process_count()
  if processes > 1:
    logging.info("process %d of %d, %d device(s)", process, processes, jax.device_count())
  cli.keep_library_log(workdir / ("run.log" if process == 0 else f"run.process_{process}.log"))
  with workdir_lock.hold(workdir, take=process == 0):
    run(config, workdir, _OVERRIDE.value)


def run(config, workdir: pathlib.Path, override: bool) -> None:
  """Runs the config's `kind` in `workdir` and prints its result block."""
  if config.kind == "pretrain":
    from reldistill_jax import train

    out = train.train_and_evaluate(config, workdir, override)
    if jax.process_count() > 1:  # each process's view of the last step (equal across them)
      logging.info("process %d of %d, last measurements: %s", jax.process_index(),
                   jax.process_count(), json.dumps(out["measurements"], sort_keys=True))  # fmt: skip
    loss = out["measurements"].get("loss", float("nan"))
    rows = {"final loss": f"{loss:.4f}", "steps": str(config.num_steps)}
    report.print_results("pretraining", rows | report.step_times(out["history"]), workdir)
  elif config.kind == "finetune":
    from reldistill_jax import finetune

    out = finetune.finetune_and_evaluate(config, workdir, override)
    name = "few-shot" if config.mode == "finetune" else "linear probe"
    rows = {f"{name} mIoU": report.describe_miou(out["metrics"])}
    report.print_results(f"{name} ({config.subset})", rows | report.step_times(out["history"]),
                         workdir)  # fmt: skip
  elif config.kind == "default":
    from reldistill_jax import pipeline

    pipeline.run_default(config, workdir, override)
  elif config.kind == "zeroshot":
    from reldistill_jax import evaluation_runs

    evaluation_runs.run_zeroshot(config, workdir, override)
  elif config.kind == "gap":
    from reldistill_jax import evaluation_runs

    evaluation_runs.run_gap(config, workdir, override)
  else:
    raise errors.ConfigError(f"config.kind: unknown kind {config.kind!r}")


if __name__ == "__main__":
  cli.run(main)
