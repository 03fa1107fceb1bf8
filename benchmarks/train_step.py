"""Throughput, memory and FLOPs utilisation of the full pretraining step.

  python benchmarks/train_step.py --out train_step.json
  python benchmarks/train_step.py --buckets DIR[,DIR] [--features DIR] --num_batches 8 \
      --layout packed --layout padded --capacity 24576,32768 --out x.json

The step is the one `reldistill_jax.train.train_and_evaluate` trains with:
`train.update_step` with the model of `runtime.make_model`, the optimizer of
`train.make_optimizer` and the loss of `train.make_loss` (the relational loss
over every pair of the batch, in `shard_map` row blocks), jitted on the mesh of
`runtime.make_mesh` with the same shardings (state replicated, batch on the
`data` axis) and the state donated. The config is `configs/pretrain.py` with
`--config` (default `loss=relational,teacher=clip_vitb16,dataset=nuscenes`: the
`base` attention encoder, batch 16 in packs of 4, bfloat16, patch 1,024, 4,096
pair slots per scan, a 512-d teacher; `--model minkunet` takes
`model=minkunet34c` and its recipe, `--model waffleiron` ScaLR's `model=waffleiron48_768`
with the kNN map its embedding reads), then the flags below override fields.

Input, batched exactly as training batches it (`input_pipeline.packs`: the
pack plan of `packing.PackPlan`, `input_pipeline.Transform` with augmentation
and pair sampling, `packing.pack`, `input_pipeline.stack`, then
`input_pipeline.to_device`):
  * by default procedural sweeps at nuScenes scale (`benchmarks/scans.py`),
    each with a random float16 teacher map of the feature store's shape;
  * with `--buckets DIR` a real bucket store (its manifest's voxel counts fit
    the budgets, as in training), joined with `--features DIR` when given, else
    with random teacher maps.
`--num_batches` distinct batches are built once, kept on the devices and
cycled: this measures the step, not the input (benchmarks/input_pipeline.py
measures that).

Layouts (`--layout`, repeated: each is measured in turn in the same run, on the
same scans; `padded` once per `--capacity`; and each for every `--model`):
  packed   the pack budgets fitted to the scans (`packing.fit_budgets` with
           `input.pack_size`, `input.pack_bins` and the model's token costs):
           what training runs.
  padded   the layout before packing, for comparison in the same run: one scan
           per pack, every stage padded to the capacity `--capacity` x
           `--stage_ratio`**s rounded up to the patch, what a batch of buckets
           padded to one capacity executed.

Measured: compile time (`lower().compile()`), then `--warmup` untimed steps
and `--steps` timed steps, each waited for. Reported: steps/s, scans/s (the
scans the stepped batches hold), valid pairs per step, peak device memory
(`memory_stats()["peak_bytes_in_use"]` where the backend keeps it; else the
compiled memory analysis, arguments + outputs + temporaries - aliased;
`peak_source` says which), and FLOPs:

  xla          `compiled.cost_analysis()["flops"]` of the step (and of the
               encoder's forward + backward alone): per device, every
               elementwise operation, the body of a `lax.scan` once, custom
               calls (cuDNN attention, Pallas kernels) as zero.
  analytic     matmul FLOPs (2 per multiply-add), forward, then x 3 for forward
               + backward. Per block of width c: the CPE's 3x3x3 sparse
               convolution (27 c^2 multiply-adds per token), its linear (c^2),
               qkv (3 c^2), the output projection (c^2) and the MLP (8 c^2): 80
               c^2 per token; attention QK^T and PV: 4 K c per query of a patch
               of K. Plus the stem, pooling, unpooling, skip and head
               projections. Two counts, averaged over the stepped batches:
               `model` (useful: every layer, attention included, over the valid
               voxels of every scan and stage only) and `executed` (what the
               program runs: the layers over every token of the budgets,
               attention over every slot of the aligned views; for `padded`
               every slot of every capacity). The relational loss: five N x N
               x D products for value and gradient, 10 N^2 D, N the padded pair
               rows (`executed`) or the valid pairs (`model`).

`flops.step_executed / flops.step_model` is the padding factor the packing
issue targets. `data` holds the packing statistics of the stepped batches:
scans per batch, the per-stage fill of the budgets, scans carried to a later
pack, and `dropped_voxels_total`: voxels of a scan missing from its pack
(for procedural scans, also any distinct voxel of its points the bucket lost).

MFU = analytic `model` FLOPs per second / (the device's dense bf16 peak x
devices), for the step and for the encoder alone (its forward + backward timed
separately). Peaks: `PEAK_FLOPS` (`--peak_flops` overrides); a CPU has none,
so MFU is null with a reason.

Writes JSON (`--out`) with the machine, devices, date, command and `runs`, each
with its settings, data and results, and prints a markdown table with a column
per run. `--smoke` is a tiny variant (the
`tiny` encoder, batch 2 in packs of 1, 1 m voxels, patch 256, 2 steps) for the
tests; it shards the batch over gcd(packs, devices) devices. `--profile_dir`
wraps `--profile_steps` more steps in `jax.profiler.trace`. A configuration
whose compiled memory exceeds `--memory_headroom` of the device's (host's)
memory is recorded as skipped; `--compile_only` stops after compiling: memory
and FLOPs, the analytic ones counted from the batches' data.
"""

import datetime
import functools
import itertools
import json
import math
import os
import pathlib
import statistics
import sys
import time

# The repository root, for `configs` and `benchmarks` when the project is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import flops as flop_counts  # noqa: E402
from benchmarks import step_batches  # noqa: E402
from configs import common, pretrain  # noqa: E402
from reldistill_jax import (  # noqa: E402
  cli,
  files,
  hardware,
  input_pipeline,
  runtime,
  sharded_losses,
  train,
)

_OUT = flags.DEFINE_string("out", "train_step.json", "JSON output file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model and sizes, 2 steps (tests).")
_CONFIG = flags.DEFINE_string(
  "config", "loss=relational,teacher=clip_vitb16,dataset=nuscenes", "configs/pretrain.py argument."
)
_BUCKETS = flags.DEFINE_list(
  "buckets", None, "Bucket stores to batch, comma-separated (default: procedural)."
)
_FEATURES = flags.DEFINE_string(
  "features", None, "The feature store of one store (default: random maps)."
)
_LAYOUT = flags.DEFINE_multi_enum(
  "layout", ["packed"], ["packed", "padded"], "Batch layouts to measure, one after another."
)
_MODEL = flags.DEFINE_list(
  "model", [],
  "Students, each measured in turn: point_encoder, minkunet (Res16UNet34C) or `model=` names "
  "of configs/common.py (default: the config's). Each comes with its recipe.",
)  # fmt: skip
_VARIANT = flags.DEFINE_string("variant", None, "Encoder variant (default: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
_PACK = flags.DEFINE_integer("pack_size", None, "Scans per pack (default: the config's).")
_CAPACITY = flags.DEFINE_list("capacity", ["32768"], "Stage-0 capacities of the padded layout.")
_RATIO = flags.DEFINE_float("stage_ratio", 0.75, "Stage capacity ratio of the padded layout.")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", None, "Pair slots per scan (default: config's).")
_PATCH = flags.DEFINE_integer("patch_size", None, "Attention patch size (default: config's).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: the config's).")
_VOXEL = flags.DEFINE_float("voxel_size", 0.1, "Voxel size of the procedural scans (m).")
_IMPLEMENTATION = flags.DEFINE_enum(
  "implementation",
  None,
  list(sharded_losses.IMPLEMENTATIONS),
  "Relational kernel (default: the config's, auto).",
)
_MESH = flags.DEFINE_integer(
  "mesh_data", None, "Devices on the data axis (-1: all; default: config's, smoke: see doc)."
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 3, "Distinct batches, built once and cycled.")
_ENCODER = flags.DEFINE_bool("encoder", True, "Also time the encoder's forward + backward alone.")
_COMPILE_ONLY = flags.DEFINE_bool(
  "compile_only", False, "Compile and report memory and FLOPs without running."
)
_HEADROOM = flags.DEFINE_float(
  "memory_headroom", 0.9, "Refuse to run above this fraction of the device's (host's) memory."
)
_PEAK = flags.DEFINE_float("peak_flops", None, "Dense bf16 peak FLOP/s per device (override).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of a few steps.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps inside the profiler trace.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the scans, teacher maps and parameters.")

# (h, w) of the teacher's patch grid as the feature store holds it.
TEACHER_GRID = {"clip_vitb16": (14, 26), "dinov2_vitb14": (16, 30), "synthetic": (14, 26)}

_SMOKE_SETTINGS = {
  "variant": "tiny",
  "batch_size": 2,
  "pack_size": 1,
  "num_pairs": 512,
  "patch_size": 256,
  "voxel_size": 1.0,
  "capacity": 8192,
  "steps": 2,
  "warmup": 1,
  "num_batches": 2,
}


# ----------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------


def _value(flag, default=None):
  """The flag's value when given (or not smoke), else the smoke value, else `default`."""
  if _SMOKE.value and not flags.FLAGS[flag.name].present and flag.name in _SMOKE_SETTINGS:
    return _SMOKE_SETTINGS[flag.name]
  return default if flag.value is None else flag.value


def _settings(model: str | None, layout: str, capacity: int | None) -> tuple:
  smoke = _SMOKE.value
  arg = _CONFIG.value
  if model:
    model = {"point_encoder": "ptv3_base", "minkunet": "minkunet34c",
             "waffleiron": "waffleiron48_768"}.get(model, model)  # fmt: skip
    arg = f"{arg},model={model}"
  config = pretrain.get_config(arg)
  with config.unlocked():
    config.model.variant = _value(_VARIANT, config.model.variant)
    config.input.batch_size = _value(_BATCH, config.input.batch_size)
    config.input.pack_size = _value(_PACK, config.input.pack_size)
    config.input.num_pairs = _value(_NUM_PAIRS, config.input.num_pairs)
    config.model.patch_size = _value(_PATCH, config.model.patch_size)
    config.model.dtype = _value(_DTYPE, config.model.dtype)
    config.loss.implementation = _value(_IMPLEMENTATION, config.loss.implementation)
    if layout == "padded":
      config.input.pack_size = 1
    packs = config.input.batch_size // config.input.pack_size
    if _MESH.value is not None:
      config.mesh.data = _MESH.value
    elif smoke:
      config.mesh.data = math.gcd(packs, jax.device_count())
  variant = config.model.variant
  settings = {
    "config": arg,
    "model": config.model.name,
    "layout": layout,
    "variant": variant,
    "batch_size": config.input.batch_size,
    "pack_size": config.input.pack_size,
    "capacity": capacity,
    "stage_ratio": _RATIO.value if layout == "padded" else None,
    "num_pairs": config.input.num_pairs,
    "patch_size": config.model.patch_size,
    "num_stages": runtime.make_model(config).num_stages(),
    "num_curves": config.model.num_curves,
    "knn": common.KNN.get(config.model.name, 0),
    "dtype": config.model.dtype,
    "out_dim": config.model.out_dim,
    "teacher": config.teacher,
    "teacher_grid": TEACHER_GRID.get(config.teacher, (14, 26)),
    "loss": config.loss.name,
    "implementation": config.loss.implementation,
    "optimizer": config.optimizer.name,
    "voxel_size": _value(_VOXEL),
    "mesh_data": config.mesh.data,
    "steps": _value(_STEPS),
    "warmup": _value(_WARMUP),
    "num_batches": _value(_NUM_BATCHES),
    "encoder": _ENCODER.value,
    "compile_only": _COMPILE_ONLY.value,
    "memory_headroom": _HEADROOM.value,
    "seed": _SEED.value,
    "smoke": smoke,
    "scans": _BUCKETS.value or "procedural HDL-32E street sweeps (benchmarks/scans.py)",
    "features": _FEATURES.value or "random float16 maps",
  }
  return config, settings


def _time(fn, args_of, steps: int) -> list[float]:
  """Wall seconds of `steps` calls, each waited for."""
  times = []
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(i, *args_of(i)))
    times.append(time.perf_counter() - start)
  return times


def run(config, settings: dict) -> tuple[dict, dict, jax.sharding.Mesh]:
  """Builds the batches, compiles and times the step (and the encoder); returns the results."""
  mesh = runtime.make_mesh(config)
  packs = config.input.batch_size // config.input.pack_size
  if packs % mesh.shape["data"]:
    raise app.UsageError(
      f"{packs} packs a step do not split over the {mesh.shape['data']} devices of the data "
      "axis (set --mesh_data or --pack_size)"
    )
  data_sharding = NamedSharding(mesh, P("data"))
  start = time.perf_counter()
  host_batches, scan_counts, data_stats, budgets = step_batches.make_batches(
    config, settings, _BUCKETS.value, _FEATURES.value
  )
  data_stats["build_s"] = time.perf_counter() - start
  batches = [input_pipeline.to_device(b, data_sharding) for b in host_batches]
  used = [(settings["warmup"] + i) % len(batches) for i in range(settings["steps"])]
  scans_per_step = statistics.fmean(len(scan_counts[b]) for b in used)
  data_stats["scans_per_step_stepped"] = scans_per_step

  model = runtime.make_model(config)
  compiled, state, state_sharding, results = _compile_step(
    config, model, mesh, host_batches[0], batches[0]
  )
  flops = flop_counts.analytic_flops(
    config, settings, [host_batches[b] for b in used], [scan_counts[b] for b in used], budgets,
    mesh.size,
  )  # fmt: skip
  xla_step = flop_counts.xla_flops(compiled)
  flops["xla_step_per_device"] = xla_step
  flops["xla_step_total"] = None if xla_step is None else xla_step * mesh.size
  results["flops"] = flops

  # Refuse what cannot fit, before running it.
  estimate = (results["compiled_memory"] or {}).get("total_bytes")
  limit, limit_source = hardware.memory_limit()
  results["memory_limit_bytes"], results["memory_limit_source"] = limit, limit_source
  if estimate is not None and limit is not None and estimate > settings["memory_headroom"] * limit:
    results["status"] = "skipped"
    results["reason"] = (
      f"the compiled memory analysis needs {_size(estimate)} per device, over "
      f"{settings['memory_headroom']:.0%} of {_size(limit)} ({limit_source})"
    )
    return results, data_stats, mesh
  if settings["compile_only"]:
    results["status"] = "compiled"
    return results, data_stats, mesh

  one_step, params = _stepper(compiled, state)
  results |= _measure(one_step, batches, used, settings, estimate)
  results["scans_per_s"] = scans_per_step / results["step_s_mean"]
  results["seconds_per_scan"] = results["step_s_mean"] / scans_per_step
  results["pair_slots_per_step"] = int(host_batches[0]["pairs_mask"].size)
  if settings["encoder"]:
    shardings = (data_sharding, state_sharding["params"])
    results["encoder"] = _time_encoder(
      model, params(), batches, shardings, settings, used, scans_per_step
    )
    xla_enc = results["encoder"]["xla_flops_per_device"]
    flops["xla_encoder_fwd_bwd_per_device"] = xla_enc
    flops["xla_encoder_fwd_bwd_total"] = None if xla_enc is None else xla_enc * mesh.size
    flops["xla_over_analytic_encoder"] = (
      None if xla_enc is None else xla_enc * mesh.size / flops["encoder_fwd_bwd_executed"]
    )
  _utilisation(results, flops, mesh.size)
  if _PROFILE.value:
    pathlib.Path(_PROFILE.value).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(_PROFILE.value):
      _time(one_step, lambda i: (batches[i % len(batches)],), _PROFILE_STEPS.value)
    results["profile_dir"] = str(pathlib.Path(_PROFILE.value).absolute())
  return results, data_stats, mesh


def _compile_step(config, model, mesh, host_batch, device_batch) -> tuple:
  """(compiled step, state, state sharding, results with compile time and memory), as
  `train.py` jits the step."""
  tx, schedule = train.make_optimizer(config)
  loss_fn = train.make_loss(config, mesh)
  example = {k: v[:1] for k, v in host_batch.items() if k not in input_pipeline.HOST_KEYS}
  _, state_sharding, _, make_state = runtime.sharded_state(
    lambda rng: model.init(rng, example), tx, _SEED.value, mesh
  )
  state = make_state()
  step_fn = jax.jit(
    functools.partial(train.update_step, model=model, tx=tx, loss_fn=loss_fn, schedule=schedule),
    in_shardings=(state_sharding, NamedSharding(mesh, P("data"))),
    out_shardings=(state_sharding, NamedSharding(mesh, P())),
    donate_argnums=(0,),
  )
  trainable = runtime.split_statistics(state["params"])[0]
  results = {"num_params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(trainable))}
  start = time.perf_counter()
  compiled = step_fn.lower(state, device_batch).compile()
  results["compile_s"] = time.perf_counter() - start
  results["compiled_memory"] = flop_counts.compiled_memory(compiled)
  return compiled, state, state_sharding, results


def _stepper(compiled, state) -> tuple:
  """(one_step(i, batch) that advances a held state and records the step's metrics, the
  current parameters)."""
  holder = {"state": state, "metrics": []}

  def one_step(i, batch):
    holder["state"], out = compiled(holder["state"], batch)
    holder["metrics"].append(out)
    return holder["state"]["step"], out

  one_step.metrics = holder["metrics"]
  return one_step, lambda: holder["state"]["params"]


def _measure(one_step, batches, used, settings, estimate) -> dict:
  """Times `--warmup` then `--steps` steps; the step's times, pairs, losses and peak memory."""
  _time(one_step, lambda i: (batches[i % len(batches)],), settings["warmup"])
  one_step.metrics.clear()
  times = _time(one_step, lambda i: (batches[used[i]],), settings["steps"])
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak, peak_source = stats["peak_bytes_in_use"], "device memory_stats peak_bytes_in_use"
  else:
    peak = estimate
    peak_source = "compiled memory_analysis arguments + outputs + temp - alias (per device)"
  got = [{k: float(v) for k, v in jax.device_get(m).items()} for m in one_step.metrics]
  pairs_per_step = statistics.fmean(g["pairs"] for g in got)
  step_s = statistics.fmean(times)
  return {
    "status": "ok",
    "step_times_s": times,
    "step_s_mean": step_s,
    "step_s_median": statistics.median(times),
    "steps_per_s": 1.0 / step_s,
    "pairs_per_step": pairs_per_step,
    "pairs_per_s": pairs_per_step / step_s,
    "loss_first": got[0]["loss"],
    "loss_last": got[-1]["loss"],
    "loss_finite": bool(all(np.isfinite(g["loss"]) for g in got)),
    "peak_bytes": peak,
    "peak_source": peak_source,
  }


def _utilisation(results: dict, flops: dict, devices: int) -> None:
  """Adds the peak FLOP/s and the MFUs (module docstring) to `results`."""
  peak_fl, source = flop_counts.peak_flops(
    jax.local_devices()[0].device_kind, jax.default_backend(), _PEAK.value
  )
  total_peak = None if peak_fl is None else peak_fl * devices
  results["peak_flops_per_device"] = peak_fl
  results["peak_flops_source"] = source
  mfu = lambda f, seconds: None if total_peak is None or f is None else f / seconds / total_peak
  step_s = results["step_s_mean"]
  results["mfu"] = mfu(flops["step_model"], step_s)
  results["mfu_executed"] = mfu(flops["step_executed"], step_s)
  results["hfu_xla"] = mfu(flops["xla_step_total"], step_s)
  if "encoder" in results:
    enc_s = results["encoder"]["step_s_mean"]
    results["encoder"]["mfu"] = mfu(flops["encoder_fwd_bwd_model"], enc_s)
    results["encoder"]["mfu_executed"] = mfu(flops["encoder_fwd_bwd_executed"], enc_s)
  results["mfu_reason"] = None if total_peak is not None else source


def _time_encoder(model, params, batches, shardings, settings, used, scans_per_step) -> dict:
  """Compile time, times and XLA FLOPs of the encoder's forward + backward alone."""
  data_sharding, param_sharding = shardings

  def fwd_bwd(params, batch):  # in training mode: BatchNorm normalises by the batch
    trainable, statistics = runtime.split_statistics(params)
    encode = lambda p: runtime.encode(model, runtime.merge(p, statistics), batch, train=True)
    return jax.grad(lambda p: jnp.sum(encode(p)[0][0]))(trainable)

  fn = jax.jit(fwd_bwd, in_shardings=(param_sharding, data_sharding))
  start = time.perf_counter()
  compiled = fn.lower(params, batches[0]).compile()
  compile_s = time.perf_counter() - start
  call = lambda i, batch: compiled(params, batch)
  _time(call, lambda i: (batches[i % len(batches)],), settings["warmup"])
  times = _time(call, lambda i: (batches[used[i]],), len(used))
  return {
    "compile_s": compile_s,
    "step_times_s": times,
    "step_s_mean": statistics.fmean(times),
    "step_s_median": statistics.median(times),
    "scans_per_s": scans_per_step / statistics.fmean(times),
    "xla_flops_per_device": flop_counts.xla_flops(compiled),
    "compiled_memory": flop_counts.compiled_memory(compiled),
  }


def _num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def _rows(settings: dict, results: dict) -> list[tuple[str, str]]:
  f = results["flops"]
  enc = results.get("encoder", {})
  tera = lambda x: _num(_div(x, 1e12), ".3f")
  return [
    ("layout / model / variant / batch / pack / devices",
     f"{settings['layout']} / {settings['model']} / {settings['variant']} / "
     f"{settings['batch_size']} / "
     f"{settings['pack_size']} / {settings['mesh_data']}"),
    ("status", results["status"] + (f": {results['reason']}" if "reason" in results else "")),
    ("compile s", _num(results["compile_s"], ".1f")),
    ("compiled memory per device", _size((results["compiled_memory"] or {}).get("total_bytes"))),
    ("steps/s", _num(results.get("steps_per_s"), ".4f")),
    ("scans/s", _num(results.get("scans_per_s"), ".3f")),
    ("seconds per scan", _num(results.get("seconds_per_scan"), ".3f")),
    ("valid pairs/step", _num(results.get("pairs_per_step", f["valid_pairs_per_step"]), ",.0f")),
    ("peak memory", f"{_size(results.get('peak_bytes'))} ({results.get('peak_source', '-')})"),
    ("encoder fwd+bwd TFLOP/step: analytic model / executed / XLA",
     f"{tera(f['encoder_fwd_bwd_model'])} / {tera(f['encoder_fwd_bwd_executed'])} / "
     f"{tera(f.get('xla_encoder_fwd_bwd_total'))}"),
    ("loss TFLOP/step: analytic model / executed", f"{tera(f['loss_model'])} / "
     f"{tera(f['loss_executed'])}"),
    ("step TFLOP: analytic model / executed / XLA",
     f"{tera(f['step_model'])} / {tera(f['step_executed'])} / {tera(f['xla_step_total'])}"),
    ("executed / model FLOPs (step, encoder)",
     f"{f['executed_over_model']:.3f} / {f['encoder_executed_over_model']:.3f}"),
    ("MFU step", _pct(results.get("mfu"), results.get("mfu_reason"))),
    ("encoder fwd+bwd s", _num(enc.get("step_s_mean"), ".3f")),
    ("MFU encoder", _pct(enc.get("mfu"), results.get("mfu_reason"))),
  ]  # fmt: skip


def _table(runs: list[dict]) -> str:
  """A markdown table, one column per run."""
  columns = [dict(_rows(r["settings"], r["results"])) for r in runs]
  names = [r["name"] for r in runs]
  lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
  lines += [f"| {k} | " + " | ".join(c[k] for c in columns) + " |" for k in columns[0]]
  return "\n".join(lines)


def _div(x, y):
  return None if x is None else x / y


def _pct(x, reason) -> str:
  if x is not None:
    return f"{100 * x:.1f}%"
  return f"null ({reason})" if reason else "-"


def _size(x) -> str:
  if x is None:
    return "-"
  return f"{x / 2**30:,.2f} GiB" if x >= 2**30 else f"{x / 2**20:,.1f} MiB"


def main(argv):
  del argv
  if _FEATURES.value and len(_BUCKETS.value or []) != 1:
    raise app.UsageError("--features joins exactly one --buckets store")
  load_at_start = list(os.getloadavg())
  runs = []
  for model, layout in itertools.product(_MODEL.value or [None], _LAYOUT.value):
    capacities = [int(c) for c in _CAPACITY.value] if layout == "padded" else [None]
    for capacity in capacities:
      if _SMOKE.value and capacity is not None and not flags.FLAGS["capacity"].present:
        capacity = _SMOKE_SETTINGS["capacity"]
      config, settings = _settings(model, layout, capacity)
      results, data_stats, mesh = run(config, settings)
      settings["implementation_resolved"] = sharded_losses.resolve_implementation(
        config.loss.implementation, mesh
      )
      settings["mesh_data"] = mesh.shape["data"]
      name = layout if capacity is None else f"{layout} {capacity}"
      name = f"{model} {name}" if len(_MODEL.value) > 1 else name
      runs.append({"name": name, "settings": settings, "data": data_stats, "results": results})
      # Written after every run, so a run killed later (out of memory) keeps the earlier ones.
      result = {
        "benchmark": "pretraining step (train.update_step as train_and_evaluate jits it)",
        "machine": hardware.machine(load_at_start),
        "devices": hardware.devices(mesh),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
        "runs": runs,
      }
      files.atomic_write(_OUT.value, json.dumps(result, indent=2))
      logging.info("%s: %s", name, results["status"])
  print(_table(runs))


if __name__ == "__main__":
  cli.run(main)
