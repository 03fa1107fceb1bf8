"""Throughput, memory and FLOPs utilisation of the full pretraining step.

  python benchmarks/train_step.py --out train_step.json

The step is the one `reldistill_jax.train.train_and_evaluate` trains with:
`train.update_step` with the model of `runtime.make_model`, the optimizer of
`train.make_optimizer` and the loss of `train.make_loss` (the relational loss
over every pair of the batch, in `shard_map` row blocks), jitted on the mesh of
`runtime.make_mesh` with the same shardings (state replicated, batch on the
`data` axis) and the state donated. The config is `configs/pretrain.py` with
`--config` (default `loss=relational,teacher=clip_vitb16,dataset=nuscenes`: the
`base` encoder, batch 16, bfloat16, capacity 32,768, patch 1,024, 4,096 pair
slots per scan, a 512-d teacher), then the flags below override fields.

Input: synthetic scans at nuScenes scale, made procedurally (no dataset, no
download). Each scan casts the 32 x 1,084 beams of a simulated HDL-32E (the
nuScenes LIDAR_TOP, 1.84 m above the ground; 34,688 rays, the size of a real
nuScenes keyframe) analytically against a street: the ground plane, two rows of
building facades with gaps (5-25 m tall, 7-14 m from the sensor), 15-35 parked
or driving car boxes, 10-30 poles and trunks (cylinders) and a far, irregular
skyline (40-90 m) that catches the upward beams; 2% dropout and 2 cm range
noise. That gives about 33k points and, at 0.1 m, about 19-21k stage-0 voxels
(stages 0-4 about 20k / 13k / 8k / 4k / 2k; the real scene-0061 keyframe has
17,885 / 12,614 / 7,927 / 4,495 / 2,310). Points are projected into the six
cameras with the calibration of a real nuScenes car
(`data_prep/resources/nuscenes_rig.json`, the devkit's visibility test), which
gives about 23k point-to-pixel pairs per scan. Each scan is voxelised by
`serialization.build_bucket`, turned into a fixed-shape example by
`input_pipeline.Transform` (padding to the batch capacity, augmentation, pair
sampling onto the 14 x 26 grid), joined with a random float16 teacher map of
the feature store's shape (6, h, w, D), stacked with `input_pipeline.stack` and
sent with `input_pipeline.to_device`. `--num_batches` distinct batches are
built once, kept on the devices and cycled: this measures the step, not the
input (benchmarks/input_pipeline.py measures that).

Measured: compile time (`lower().compile()`), then `--warmup` untimed steps
and `--steps` timed steps, each waited for. Reported: steps/s, scans/s,
valid pairs per step (the step's own `pairs` measurement), peak device memory
(`memory_stats()["peak_bytes_in_use"]` right after the timed steps where the
backend keeps it; else the compiled memory analysis of the step, arguments +
outputs + temporaries - aliased; `peak_source` says which), and FLOPs:

  xla          `compiled.cost_analysis()["flops"]` of the step (and of the
               encoder's forward + backward alone). XLA's count is per device
               (the partitioned program), counts every elementwise operation,
               counts the body of a `lax.scan` once (so it misses most of the
               relational loss's blocked scan) and counts custom calls (cuDNN
               flash attention on GPU, Pallas kernels) as zero.
  analytic     matmul FLOPs only (2 per multiply-add), forward, per scan, then
               x 3 for forward + backward (weight and input gradients each cost
               a forward). Per block of width c: the CPE's 3x3x3 sparse
               convolution as a gathered matmul (27 c^2 multiply-adds per
               voxel), its linear (c^2), qkv (3 c^2), the output projection
               (c^2) and the MLP (8 c^2): 80 c^2 FLOPs per voxel; attention
               QK^T and PV: 4 K c per voxel of a patch of K = patch size (the
               heads split c). Plus the stem convolution (27 * 4 * c0 MACs),
               the pooling projections, the unpooling and skip projections, and
               the head (c_dec0 x D). Two counts: `model` (the useful work:
               layers over the valid voxels of every stage, attention over the
               patches holding a valid voxel, each a full K x K block since
               that is what a kernel computes) and `capacity` (every slot of the
               padded bucket, what the XLA program executes; comparable with
               `xla`). The relational loss's blocked kernel does five N x N x D
               products per pass (K Q^T, K K^T, Q Q^T and the two gradient
               products), 10 N^2 D FLOPs for value and gradient, N the pair
               slots (`model`: the valid pairs).

The two counts differ most in the deep stages, which hold most of the FLOPs
(c = 256, 512) and whose capacities (C0 * 0.75**s) are 3-5x their valid
voxels: at the default capacity 32,768 the encoder executes 3.51 TFLOP
forward + backward per scan where the real scene-0061 keyframe's voxel counts
need 1.09 (31%); so an encoder MFU on `model` FLOPs cannot exceed about 31%
with these capacities, whatever the kernels do. `mfu_executed` and the
`encoder.mfu_capacity` count the executed FLOPs instead.

Model FLOPs utilisation (MFU) = analytic `model` FLOPs per second / (the
device's dense bf16 peak x devices): for the step (encoder + loss, per step
time) and for the encoder alone (its forward + backward timed as a separate
jitted function on the same batches, the gradient of the sum of its outputs
with respect to the parameters; the issue's target is >= 35% on an H100).
Peaks: `PEAK_FLOPS` (H100 SXM and H200 989.4e12, H100 PCIe 756e12, A100
312e12, ...; `--peak_flops` overrides); a CPU has none, so MFU is null with a
reason.

Writes JSON (`--out`) with the machine, devices, date, command, settings and
results, and prints a markdown table. `--smoke` is a tiny variant (the `tiny`
encoder, batch 2, capacity 4,096 at 1 m voxels, patch 256, 2 steps) for the
test; it shards the batch over gcd(batch, devices) devices. `--profile_dir`
wraps `--profile_steps` more steps in `jax.profiler.trace`.

Memory: a configuration whose compiled memory analysis exceeds
`--memory_headroom` of the device's memory (the host's on a CPU) is recorded
as skipped, with the estimate, instead of run; `--compile_only` stops after
compiling (memory and FLOPs without running). Where attention is XLA's rather
than cuDNN's (the CPU, and float32 anywhere), the K x K scores of every patch
are materialised for the backward pass: the `base` step at batch 1 needs
13.7 GiB at capacity 8,192, 25.4 GiB at 16,384 and about 52 GiB at 32,768 on
the CPU.
"""

import datetime
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import time

# The repository root, for `configs` when the project is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import pretrain  # noqa: E402
from data_prep import geometry, resources  # noqa: E402
from reldistill_jax import (  # noqa: E402
  classes,
  cli,
  hardware,
  input_pipeline,
  runtime,
  serialization,
  sharded_losses,
  train,
)
from reldistill_jax.models import point_encoder  # noqa: E402

_OUT = flags.DEFINE_string("out", "train_step.json", "JSON output file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model and sizes, 2 steps (tests).")
_CONFIG = flags.DEFINE_string(
  "config", "loss=relational,teacher=clip_vitb16,dataset=nuscenes", "configs/pretrain.py argument."
)
_VARIANT = flags.DEFINE_string("variant", None, "Encoder variant (default: the config's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
_CAPACITY = flags.DEFINE_integer("capacity", None, "Batch capacity (default: the config's).")
_NUM_PAIRS = flags.DEFINE_integer("num_pairs", None, "Pair slots per scan (default: config's).")
_PATCH = flags.DEFINE_integer("patch_size", None, "Attention patch size (default: config's).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: the config's).")
_VOXEL = flags.DEFINE_float("voxel_size", 0.1, "Voxel size of the synthetic buckets (m).")
_RATIO = flags.DEFINE_float(
  "stage_ratio", None, "Stage capacity ratio of the buckets (default: serialization's)."
)
_IMPLEMENTATION = flags.DEFINE_enum(
  "implementation",
  None,
  list(sharded_losses.IMPLEMENTATIONS),
  "Relational kernel (default: the config's, auto).",
)
_MESH = flags.DEFINE_integer(
  "mesh_data", None, "Devices on the data axis (-1: all; default: config's, smoke: min(B, all))."
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

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, by device_kind
# substring, first match wins.
PEAK_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100", 989.4e12),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
  ("H200", 989.4e12),
  ("H800", 989.4e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v6", 918e12),
)

# (h, w) of the teacher's patch grid as the feature store holds it.
TEACHER_GRID = {"clip_vitb16": (14, 26), "dinov2_vitb14": (16, 30), "synthetic": (14, 26)}

_SMOKE_SETTINGS = {
  "variant": "tiny",
  "batch_size": 2,
  "capacity": 4096,
  "num_pairs": 512,
  "patch_size": 256,
  "voxel_size": 1.0,
  "steps": 2,
  "warmup": 1,
  "num_batches": 2,
}


# ----------------------------------------------------------------------------
# Synthetic scans at nuScenes scale.
# ----------------------------------------------------------------------------

ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)  # HDL-32E
NUM_AZIMUTH = 1084
SENSOR_HEIGHT = 1.84  # LIDAR_TOP above the ground (m)
MAX_RANGE = 100.0
IMAGE_SIZE = (900, 1600)  # (height, width) of the nuScenes cameras


def _beams(rng: np.random.Generator) -> np.ndarray:
  el = np.deg2rad(ELEVATIONS_DEG)[:, None]
  az = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(NUM_AZIMUTH)[None, :] / NUM_AZIMUTH
  shape = (len(ELEVATIONS_DEG), NUM_AZIMUTH)
  return np.stack(
    [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.broadcast_to(np.sin(el), shape)], -1
  ).reshape(-1, 3)


def synthetic_scan(rng: np.random.Generator) -> np.ndarray:
  """One procedural street sweep (module docstring): (N, 4) float32 x, y, z, intensity."""
  d = _beams(rng)
  h = SENSOR_HEIGHT
  t = np.where(d[:, 2] < 0, -h / np.minimum(d[:, 2], -1e-9), np.inf)  # ground

  def closer(hit, t_hit):
    return np.where(hit & (t_hit < t), t_hit, t)

  # Facades on both sides of the street (x = -w and x = +w), with gaps along y.
  for side in (-1, 1):
    w = rng.uniform(7, 14)
    dx = d[:, 0] * side
    t_wall = np.where(dx > 1e-6, w / np.maximum(dx, 1e-6), np.inf)
    y, z = d[:, 1] * t_wall, d[:, 2] * t_wall
    edges = np.cumsum(rng.uniform(5, 40, 30)) - 200
    heights = rng.uniform(5, 25, 30)
    seg = np.searchsorted(edges, y)
    standing = (seg % 2 == 1) & (seg < 30) & (z > -h) & (z < heights[np.minimum(seg, 29)] - h)
    t = closer(standing, t_wall)
  # Cars: axis-aligned boxes (slab test), none on top of the sensor.
  n = rng.integers(15, 36)
  centres = np.stack([rng.uniform(-6, 6, n), rng.uniform(-60, 60, n)], 1)
  half = np.array([0.95, 2.3, 0.8])
  with np.errstate(divide="ignore", invalid="ignore"):
    for cx, cy in centres[np.hypot(*centres.T) > 4]:
      centre = np.array([cx, cy, 0.8 - h])
      t1, t2 = (centre - half) / d, (centre + half) / d
      near, far = np.nanmax(np.minimum(t1, t2), 1), np.nanmin(np.maximum(t1, t2), 1)
      t = closer((near <= far) & (near > 0), near)
  # Poles and trunks: vertical cylinders beside the road.
  n = rng.integers(10, 31)
  a = d[:, 0] ** 2 + d[:, 1] ** 2
  for x0, y0, r, top in zip(
    rng.choice([-1.0, 1.0], n) * rng.uniform(6, 9, n),
    rng.uniform(-50, 50, n),
    rng.uniform(0.1, 0.6, n),
    rng.uniform(3, 9, n),
    strict=True,
  ):
    b = -2 * (d[:, 0] * x0 + d[:, 1] * y0)
    disc = b * b - 4 * a * (x0 * x0 + y0 * y0 - r * r)
    t_cyl = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, 1e-9)), 0)
    z = d[:, 2] * t_cyl
    t = closer((t_cyl > 0) & (z > -h) & (z < top - h), t_cyl)
  # A far, irregular skyline catching the upward beams.
  radius = rng.uniform(40, 90)
  t_sky = radius / np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-9)
  azimuth = np.arctan2(d[:, 1], d[:, 0])
  skyline = (
    14 + 6 * np.sin(3 * azimuth + rng.uniform(0, 6)) + 4 * np.sin(7 * azimuth + rng.uniform(0, 6))
  )
  t = closer(d[:, 2] * t_sky < skyline - h, t_sky)

  keep = np.isfinite(t) & (t < MAX_RANGE) & (rng.random(len(t)) > 0.02)
  ranges = t[keep] + rng.normal(0.0, 0.02, int(keep.sum()))
  intensity = np.clip(rng.lognormal(2.5, 0.8, len(ranges)), 0, 255)
  return np.concatenate([d[keep] * ranges[:, None], intensity[:, None]], 1).astype(np.float32)


def camera_pairs(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(pairs_point, pairs_camera, pairs_uv) of the six cameras of a real nuScenes rig."""
  rig = resources.load_json("nuscenes_rig")["calibrated_sensor"]
  lidar = geometry.pose_matrix(rig["LIDAR_TOP"])
  points, cameras, uvs = [], [], []
  for index, name in enumerate(classes.NUSCENES_CAMERAS):
    calib = rig[name]
    lidar2cam = np.linalg.inv(geometry.pose_matrix(calib)) @ lidar  # one ego pose
    idx, uv = geometry.project_points(
      xyz, lidar2cam, np.asarray(calib["camera_intrinsic"]), calib["width"], calib["height"]
    )
    points.append(idx)
    cameras.append(np.full(len(idx), index, np.uint8))
    uvs.append(uv)
  return np.concatenate(points), np.concatenate(cameras), np.concatenate(uvs)


def synthetic_bucket(rng, index: int, settings: dict) -> dict:
  """A bucket record as `data_prep.voxelise.bucket_of_scan` writes it."""
  points = synthetic_scan(rng)
  pairs_point, pairs_camera, pairs_uv = camera_pairs(points[:, :3])
  capacities = [c for c in serialization.DEFAULT_CAPACITIES if c <= settings["capacity"]]
  bucket = serialization.build_bucket(
    points,
    token=f"synthetic-{index:04d}",
    voxel_size=settings["voxel_size"],
    curves=serialization.CURVES[: settings["num_curves"]],
    num_stages=settings["num_stages"],
    patch_size=settings["patch_size"],
    capacities=capacities or [settings["capacity"]],
    stage_ratio=settings["stage_ratio"],
    pairs_point=pairs_point,
    pairs_camera=pairs_camera,
    pairs_uv=pairs_uv,
  )
  bucket["has_labels"] = False
  bucket["image_sizes"] = np.tile(np.asarray(IMAGE_SIZE, np.int32), (6, 1))
  return bucket


def make_batches(config, settings: dict) -> tuple[list[dict], dict]:
  """`num_batches` host batches as the input pipeline produces them, and scan statistics."""
  inp = config.input
  transform = input_pipeline.Transform(
    {
      "patch_size": settings["patch_size"],
      "stage_ratio": settings["stage_ratio"],
      "num_stages": settings["num_stages"],
    },
    inp.capacity,
    inp.num_pairs,
    inp.intensity_scale,
    grid=settings["teacher_grid"],
    augment=input_pipeline.Augment(inp.augment.rotate, inp.augment.flip, tuple(inp.augment.scale)),
  )
  rng = np.random.default_rng(settings["seed"])
  h, w = settings["teacher_grid"]
  batches, stats = [], {"points": [], "pairs": [], "voxels": [], "dropped_voxels": []}
  for b in range(settings["num_batches"]):
    examples = []
    for i in range(inp.batch_size):
      bucket = synthetic_bucket(rng, b * inp.batch_size + i, settings)
      teacher = rng.standard_normal((6, h, w, config.model.out_dim), np.float32)
      bucket["teacher"] = (teacher / np.sqrt(config.model.out_dim)).astype(np.float16)
      stats["points"].append(int(bucket["num_points"]))
      stats["pairs"].append(len(bucket["pairs_voxel"]))
      stats["dropped_voxels"].append(int(bucket["num_dropped_voxels"]))
      stats["voxels"].append(
        [int(bucket[f"s{s}/mask"].sum()) for s in range(settings["num_stages"])]
      )
      examples.append(transform(bucket, rng))
    batches.append(input_pipeline.stack(examples))
  summary = {
    "scans": len(stats["points"]),
    "points_per_scan": _spread(stats["points"]),
    "pairs_per_scan_available": _spread(stats["pairs"]),
    "voxels_per_stage_mean": np.mean(stats["voxels"], axis=0).round(1).tolist(),
    "voxels_stage0": _spread([v[0] for v in stats["voxels"]]),
    "dropped_voxels_total": int(sum(stats["dropped_voxels"])),
  }
  return batches, summary


def _spread(values) -> dict:
  return {"mean": float(np.mean(values)), "min": int(np.min(values)), "max": int(np.max(values))}


# ----------------------------------------------------------------------------
# Analytic FLOPs.
# ----------------------------------------------------------------------------


def encoder_forward_flops(
  variant: str,
  counts: list[int],
  *,
  patch_size: int,
  out_dim: int,
  in_features: int = 4,
  head_dim: int = 16,
  mlp_ratio: int = 4,
) -> dict[str, float]:
  """Matmul FLOPs of one scan's encoder forward (module docstring: analytic).

  Args:
    variant: a `point_encoder.VARIANTS` name.
    counts: voxels per stage the layers run on (valid voxels for the model
      count, the stage capacities for the capacity count).
    patch_size: K; attention runs on ceil(count / K) patches of K x K.
    out_dim: the head's output dimension.
    in_features: input channels of the stem.
    head_dim: channels per head (only the head count depends on it).
    mlp_ratio: the MLP's hidden width over c.

  Returns:
    {"conv", "linear", "attention", "total"} FLOPs.
  """
  del head_dim  # QK^T and PV cost 4 K c per token whatever the split into heads.
  enc_ch, enc_d, dec_ch, dec_d = point_encoder.VARIANTS[variant]
  out = {"conv": 0.0, "linear": 0.0, "attention": 0.0}

  def blocks(c, depth, n):
    tokens = math.ceil(n / patch_size) * patch_size
    out["conv"] += depth * 2 * 27 * c * c * n
    out["linear"] += depth * 2 * (1 + 3 + 1 + 2 * mlp_ratio) * c * c * n
    out["attention"] += depth * 4 * patch_size * c * tokens

  out["conv"] += 2 * 27 * in_features * enc_ch[0] * counts[0]  # stem
  for s, (c, depth) in enumerate(zip(enc_ch, enc_d, strict=True)):
    if s > 0:
      out["linear"] += 2 * enc_ch[s - 1] * c * counts[s - 1]  # pooling projection
    blocks(c, depth, counts[s])
  x_ch = enc_ch[-1]
  for s in reversed(range(len(dec_ch))):
    c = dec_ch[s]
    out["linear"] += 2 * (x_ch + enc_ch[s]) * c * counts[s]  # unpooling and skip projections
    blocks(c, dec_d[s], counts[s])
    x_ch = c
  out["linear"] += 2 * dec_ch[0] * out_dim * counts[0]  # head
  out["total"] = out["conv"] + out["linear"] + out["attention"]
  return out


def relational_flops(n: int, d: int) -> float:
  """Value and gradient of the blocked relational loss over n pairs: 5 n x n x d products."""
  return 10.0 * n * n * d


def _xla_flops(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends have none.
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def _compiled_memory(compiled) -> dict | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  out = {
    "argument_bytes": analysis.argument_size_in_bytes,
    "output_bytes": analysis.output_size_in_bytes,
    "temp_bytes": analysis.temp_size_in_bytes,
    "alias_bytes": analysis.alias_size_in_bytes,
  }
  out["total_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  )
  return out


def peak_flops(device_kind: str, backend: str) -> tuple[float | None, str]:
  """(dense bf16 peak FLOP/s of one device, where it comes from) or (None, why not)."""
  if _PEAK.value:
    return _PEAK.value, "--peak_flops"
  for name, value in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return value, f"PEAK_FLOPS[{name!r}] (dense bf16)"
  if backend == "cpu":
    return None, "a CPU has no bf16 tensor-core peak; MFU is not defined (pass --peak_flops)"
  return None, f"no peak known for device kind {device_kind!r} (pass --peak_flops)"


# ----------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------


def _value(flag, default=None):
  """The flag's value when given (or not smoke), else the smoke value, else `default`."""
  if _SMOKE.value and not flags.FLAGS[flag.name].present and flag.name in _SMOKE_SETTINGS:
    return _SMOKE_SETTINGS[flag.name]
  return default if flag.value is None else flag.value


def _settings() -> tuple:
  smoke = _SMOKE.value
  config = pretrain.get_config(_CONFIG.value)
  with config.unlocked():
    config.model.variant = _value(_VARIANT, config.model.variant)
    config.input.batch_size = _value(_BATCH, config.input.batch_size)
    config.input.capacity = _value(_CAPACITY, config.input.capacity)
    config.input.num_pairs = _value(_NUM_PAIRS, config.input.num_pairs)
    config.model.patch_size = _value(_PATCH, config.model.patch_size)
    config.model.dtype = _value(_DTYPE, config.model.dtype)
    config.loss.implementation = _value(_IMPLEMENTATION, config.loss.implementation)
    if _MESH.value is not None:
      config.mesh.data = _MESH.value
    elif smoke:
      config.mesh.data = math.gcd(config.input.batch_size, jax.device_count())
  variant = config.model.variant
  num_stages = len(point_encoder.VARIANTS[variant][0])
  ratio = _value(_RATIO, serialization.DEFAULT_STAGE_RATIO)
  settings = {
    "config": _CONFIG.value,
    "variant": variant,
    "batch_size": config.input.batch_size,
    "capacity": config.input.capacity,
    "stage_capacities": serialization.stage_capacities(
      config.input.capacity, num_stages, config.model.patch_size, ratio
    ),
    "num_pairs": config.input.num_pairs,
    "patch_size": config.model.patch_size,
    "num_stages": num_stages,
    "num_curves": config.model.num_curves,
    "dtype": config.model.dtype,
    "out_dim": config.model.out_dim,
    "teacher": config.teacher,
    "teacher_grid": TEACHER_GRID.get(config.teacher, (14, 26)),
    "loss": config.loss.name,
    "implementation": config.loss.implementation,
    "optimizer": config.optimizer.name,
    "voxel_size": _value(_VOXEL),
    "stage_ratio": ratio,
    "mesh_data": config.mesh.data,
    "steps": _value(_STEPS),
    "warmup": _value(_WARMUP),
    "num_batches": _value(_NUM_BATCHES),
    "encoder": _ENCODER.value,
    "compile_only": _COMPILE_ONLY.value,
    "memory_headroom": _HEADROOM.value,
    "seed": _SEED.value,
    "smoke": smoke,
    "scans": "procedural HDL-32E street sweeps (module docstring), 0.1 m unless voxel_size says",
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


def run(config, settings: dict) -> dict:
  """Builds the data, compiles and times the step (and the encoder); returns the results."""
  mesh = runtime.make_mesh(config)
  if config.input.batch_size % mesh.shape["data"]:
    raise app.UsageError(
      f"batch size {config.input.batch_size} is not divisible by the {mesh.shape['data']} "
      "devices of the data axis (set --mesh_data)"
    )
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))

  start = time.perf_counter()
  host_batches, data_stats = make_batches(config, settings)
  data_stats["build_s"] = time.perf_counter() - start
  batches = [input_pipeline.to_device(b, data_sharding) for b in host_batches]

  model = runtime.make_model(config)
  tx, schedule = train.make_optimizer(config)
  loss_fn = train.make_loss(config, mesh)
  example = {k: v[:1] for k, v in host_batches[0].items() if k not in input_pipeline.HOST_KEYS}

  def init(rng):
    params = model.init(rng, example)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init, jax.random.key(settings["seed"]))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(settings["seed"]))
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  step_fn = jax.jit(
    functools.partial(train.update_step, model=model, tx=tx, loss_fn=loss_fn, schedule=schedule),
    in_shardings=(state_sharding, data_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )

  results = {"num_params": num_params}
  start = time.perf_counter()
  compiled = step_fn.lower(state, batches[0]).compile()
  results["compile_s"] = time.perf_counter() - start
  results["compiled_memory"] = _compiled_memory(compiled)
  nb, offset = len(batches), settings["warmup"]
  used = [(offset + i) % nb for i in range(settings["steps"])]
  flops = _analytic_flops(config, settings, [host_batches[b] for b in used], mesh.size)
  xla_step = _xla_flops(compiled)
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

  holder = {"state": state}
  measurements = []

  def one_step(i, batch):
    holder["state"], out = compiled(holder["state"], batch)
    measurements.append(out)
    return holder["state"]["step"], out

  _time(one_step, lambda i: (batches[i % nb],), settings["warmup"])
  measurements.clear()
  times = _time(one_step, lambda i: (batches[used[i]],), settings["steps"])
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak, peak_source = stats["peak_bytes_in_use"], "device memory_stats peak_bytes_in_use"
  else:
    peak = estimate
    peak_source = "compiled memory_analysis arguments + outputs + temp - alias (per device)"
  got = [{k: float(v) for k, v in jax.device_get(m).items()} for m in measurements]
  pairs_per_step = statistics.fmean(g["pairs"] for g in got)
  batch_size = config.input.batch_size
  step_s = statistics.fmean(times)
  results |= {
    "status": "ok",
    "step_times_s": times,
    "step_s_mean": step_s,
    "step_s_median": statistics.median(times),
    "steps_per_s": 1.0 / step_s,
    "scans_per_s": batch_size / step_s,
    "pairs_per_step": pairs_per_step,
    "pair_slots_per_step": batch_size * config.input.num_pairs,
    "pairs_per_s": pairs_per_step / step_s,
    "loss_first": got[0]["loss"],
    "loss_last": got[-1]["loss"],
    "loss_finite": bool(all(np.isfinite(g["loss"]) for g in got)),
    "peak_bytes": peak,
    "peak_source": peak_source,
  }

  if settings["encoder"]:
    results["encoder"] = _time_encoder(
      model, holder["state"]["params"], batches, (data_sharding, state_sharding["params"]),
      settings, used,
    )  # fmt: skip
    xla_enc = results["encoder"]["xla_flops_per_device"]
    flops["xla_encoder_fwd_bwd_per_device"] = xla_enc
    flops["xla_encoder_fwd_bwd_total"] = None if xla_enc is None else xla_enc * mesh.size
    flops["xla_over_analytic_encoder"] = (
      None if xla_enc is None else xla_enc * mesh.size / flops["encoder_fwd_bwd_capacity"]
    )

  peak_fl, source = peak_flops(jax.local_devices()[0].device_kind, jax.default_backend())
  total_peak = None if peak_fl is None else peak_fl * mesh.size
  results["peak_flops_per_device"] = peak_fl
  results["peak_flops_source"] = source
  mfu = lambda f, seconds: None if total_peak is None or f is None else f / seconds / total_peak
  results["mfu"] = mfu(flops["step_model"], step_s)
  results["mfu_executed"] = mfu(flops["step_executed"], step_s)
  results["hfu_xla"] = mfu(flops["xla_step_total"], step_s)
  if "encoder" in results:
    enc_s = results["encoder"]["step_s_mean"]
    results["encoder"]["mfu"] = mfu(flops["encoder_fwd_bwd_model"], enc_s)
    results["encoder"]["mfu_capacity"] = mfu(flops["encoder_fwd_bwd_capacity"], enc_s)
  results["mfu_reason"] = None if total_peak is not None else source

  if _PROFILE.value:
    pathlib.Path(_PROFILE.value).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(_PROFILE.value):
      _time(one_step, lambda i: (batches[i % nb],), _PROFILE_STEPS.value)
    results["profile_dir"] = str(pathlib.Path(_PROFILE.value).absolute())
  return results, data_stats, mesh


def _analytic_flops(config, settings: dict, host_batches: list[dict], devices: int) -> dict:
  """Analytic FLOPs per step, averaged over the batches stepped on (module docstring)."""
  batch_size = config.input.batch_size
  enc = {"patch_size": config.model.patch_size, "out_dim": config.model.out_dim}
  stages = range(settings["num_stages"])
  per_batch = []
  for host in host_batches:
    scans = [
      encoder_forward_flops(
        settings["variant"], [int(host[f"s{s}/mask"][i].sum()) for s in stages], **enc
      )
      for i in range(batch_size)
    ]
    per_batch.append({k: sum(p[k] for p in scans) for k in scans[0]})
  model_fwd = {k: statistics.fmean(b[k] for b in per_batch) for k in per_batch[0]}
  capacity_scan = encoder_forward_flops(settings["variant"], settings["stage_capacities"], **enc)
  capacity_fwd = {k: v * batch_size for k, v in capacity_scan.items()}
  pairs = statistics.fmean(int(h["pairs_mask"].sum()) for h in host_batches)
  rows = _padded_pairs(config, batch_size * config.input.num_pairs, devices)
  relational = config.loss.name == "relational"
  d = config.model.out_dim
  flops = {
    "encoder_forward_model": model_fwd,
    "encoder_forward_capacity": capacity_fwd,
    "encoder_fwd_bwd_model": 3 * model_fwd["total"],
    "encoder_fwd_bwd_capacity": 3 * capacity_fwd["total"],
    "valid_pairs_per_step": pairs,
    "loss_pair_rows_executed": rows,
    "loss_model": relational_flops(pairs, d) if relational else None,
    "loss_executed": relational_flops(rows, d) if relational else None,
  }
  flops["step_model"] = flops["encoder_fwd_bwd_model"] + (flops["loss_model"] or 0.0)
  flops["step_executed"] = flops["encoder_fwd_bwd_capacity"] + (flops["loss_executed"] or 0.0)
  return flops


def _padded_pairs(config, slots: int, devices: int) -> int:
  """Rows the relational kernel runs over (`sharded_losses.relational_loss`'s padding)."""
  if config.loss.name != "relational":
    return slots
  implementation = sharded_losses.resolve_implementation(config.loss.implementation)
  per_device = -(-slots // devices)
  rows, cols = sharded_losses._fitted_tiles(
    implementation, None, per_device, slots, config.model.out_dim
  )
  multiple = math.lcm(devices * rows, cols)
  return -(-slots // multiple) * multiple


def _time_encoder(model, params, batches, shardings, settings, used) -> dict:
  """Compile time, times and XLA FLOPs of the encoder's forward + backward alone."""
  data_sharding, param_sharding = shardings

  def fwd_bwd(params, batch):
    return jax.grad(lambda p: jnp.sum(model.apply(p, batch)[0]))(params)

  fn = jax.jit(fwd_bwd, in_shardings=(param_sharding, data_sharding), out_shardings=param_sharding)
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
    "scans_per_s": settings["batch_size"] / statistics.fmean(times),
    "xla_flops_per_device": _xla_flops(compiled),
    "compiled_memory": _compiled_memory(compiled),
  }


def _num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def _table(settings: dict, results: dict) -> str:
  f = results["flops"]
  enc = results.get("encoder", {})
  tera = lambda x: _num(_div(x, 1e12), ".3f")
  rows = [
    ("variant / batch / capacity / devices",
     f"{settings['variant']} / {settings['batch_size']} / {settings['capacity']} / "
     f"{settings['mesh_data']}"),
    ("status", results["status"] + (f": {results['reason']}" if "reason" in results else "")),
    ("compile s", _num(results["compile_s"], ".1f")),
    ("compiled memory per device", _size((results["compiled_memory"] or {}).get("total_bytes"))),
    ("steps/s", _num(results.get("steps_per_s"), ".4f")),
    ("scans/s", _num(results.get("scans_per_s"), ".3f")),
    ("valid pairs/step", _num(results.get("pairs_per_step", f["valid_pairs_per_step"]), ",.0f")),
    ("peak memory", f"{_size(results.get('peak_bytes'))} ({results.get('peak_source', '-')})"),
    ("encoder fwd+bwd TFLOP/step: analytic model / capacity / XLA",
     f"{tera(f['encoder_fwd_bwd_model'])} / {tera(f['encoder_fwd_bwd_capacity'])} / "
     f"{tera(f.get('xla_encoder_fwd_bwd_total'))}"),
    ("loss TFLOP/step: analytic model / executed", f"{tera(f['loss_model'])} / "
     f"{tera(f['loss_executed'])}"),
    ("step TFLOP: analytic model / executed / XLA",
     f"{tera(f['step_model'])} / {tera(f['step_executed'])} / {tera(f['xla_step_total'])}"),
    ("MFU step", _pct(results.get("mfu"), results.get("mfu_reason"))),
    ("encoder fwd+bwd s", _num(enc.get("step_s_mean"), ".3f")),
    ("MFU encoder", _pct(enc.get("mfu"), results.get("mfu_reason"))),
  ]  # fmt: skip
  lines = ["| metric | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
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
  load_at_start = list(os.getloadavg())
  config, settings = _settings()
  results, data_stats, mesh = run(config, settings)
  settings["implementation_resolved"] = sharded_losses.resolve_implementation(
    config.loss.implementation, mesh
  )
  settings["mesh_data"] = mesh.shape["data"]
  result = {
    "benchmark": "pretraining step (train.update_step as train_and_evaluate jits it)",
    "machine": hardware.machine(load_at_start),
    "devices": hardware.devices(mesh),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
    "settings": settings,
    "data": data_stats,
    "results": results,
  }
  pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=2))
  print(_table(settings, results))


if __name__ == "__main__":
  cli.run(main)
