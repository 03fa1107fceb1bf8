"""FLOPs, memory and peaks of the training step, for `benchmarks/train_step.py`.

  encoder_forward_flops  matmul FLOPs of one encoder forward over given token
                         counts (a scan's voxels, or a pack's budgets)
  minkunet_forward_flops the same for the MinkUNet
  waffleiron_forward_flops the same for WaffleIron (its grids counted whole)
  relational_flops       the blocked relational loss's value and gradient
  analytic_flops         a step's useful (`model`) and executed FLOPs over batches
  padded_pairs           the pair rows the relational kernel runs over
  xla_flops, compiled_memory  XLA's own count and memory analysis of a compiled step
  peak_flops             a device's dense bf16 peak (`PEAK_FLOPS`)

The counts are defined in train_step.py's docstring (analytic).
"""

import math
import statistics

from reldistill_jax import sharded_losses
from reldistill_jax.models import minkunet, point_encoder, waffleiron

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


def encoder_forward_flops(
  variant: str,
  counts: list[int],
  view: list[int] | None = None,
  *,
  patch_size: int,
  out_dim: int,
  in_features: int = 4,
  mlp_ratio: int = 4,
) -> dict[str, float]:
  """Matmul FLOPs of one encoder forward (module docstring: analytic).

  Args:
    variant: a `point_encoder.VARIANTS` name.
    counts: tokens per stage the layers run on (a scan's voxels for the useful
      count, a pack's token budgets for the executed one).
    view: queries per stage attention runs on (default `counts`): the aligned
      view of a pack, each a full patch of K keys.
    patch_size: K.
    out_dim: the head's output dimension.
    in_features: input channels of the stem.
    mlp_ratio: the MLP's hidden width over c.

  Returns:
    {"conv", "linear", "attention", "total"} FLOPs.
  """
  view = counts if view is None else view
  enc_ch, enc_d, dec_ch, dec_d = point_encoder.VARIANTS[variant]
  out = {"conv": 0.0, "linear": 0.0, "attention": 0.0}

  def blocks(c, depth, s):
    out["conv"] += depth * 2 * 27 * c * c * counts[s]
    out["linear"] += depth * 2 * (1 + 3 + 1 + 2 * mlp_ratio) * c * c * counts[s]
    out["attention"] += depth * 4 * patch_size * c * view[s]

  out["conv"] += 2 * 27 * in_features * enc_ch[0] * counts[0]  # stem
  for s, (c, depth) in enumerate(zip(enc_ch, enc_d, strict=True)):
    if s > 0:
      out["linear"] += 2 * enc_ch[s - 1] * c * counts[s - 1]  # pooling projection
    blocks(c, depth, s)
  x_ch = enc_ch[-1]
  for s in reversed(range(len(dec_ch))):
    c = dec_ch[s]
    out["linear"] += 2 * (x_ch + enc_ch[s]) * c * counts[s]  # unpooling and skip projections
    blocks(c, dec_d[s], s)
    x_ch = c
  out["linear"] += 2 * dec_ch[0] * out_dim * counts[0]  # head
  out["total"] = out["conv"] + out["linear"] + out["attention"]
  return out


def minkunet_forward_flops(
  variant: str, counts: list[int], *, out_dim: int, in_features: int = 4, executed: bool
) -> dict[str, float]:
  """Matmul FLOPs of one MinkUNet forward over given token counts: `executed` runs the
  stride-2 and transposed convolutions over the 8 octant slots of every parent token,
  the useful count over the children (`minkunet.stage_macs`). All of it is "conv"."""
  macs = minkunet.stage_macs(variant, in_features, out_dim, per_child=not executed)
  total = 2.0 * sum(m * c for m, c in zip(macs, counts, strict=True))
  return {"conv": total, "linear": 0.0, "attention": 0.0, "total": total}


def waffleiron_forward_flops(variant: str, tokens: int, slots: int, out_dim: int) -> dict:
  """FLOPs (2 per multiply-add) of one WaffleIron forward over `tokens` points and `slots`
  scans' grids. Points: the model's `token_costs` (embedding with its k-neighbour branch,
  2 F^2 per layer's channel mix, the head). Grids: every layer's two depthwise 3x3 convolutions
  and its depthwise 1x1 layer scale, 19 F per cell, over the whole grid of its plane (they
  run there, occupied or not), once per scan slot."""
  model = waffleiron.Model(variant=variant, out_dim=out_dim)
  depth, width, _, grids = model.sizes()
  cells = sum(math.prod(grids[layer % len(grids)]) for layer in range(depth))
  points = 2.0 * model.token_costs(5)[0] * tokens  # 5 inputs: intensity, x, y, z, radius
  grid = 2.0 * 19 * width * cells * slots
  return {"points": points, "grids": grid, "total": points + grid}


def relational_flops(n: int, d: int) -> float:
  """Value and gradient of the blocked relational loss over n pairs: 5 n x n x d products."""
  return 10.0 * n * n * d


def analytic_flops(config, settings, host_batches, scan_counts, budgets, devices) -> dict:
  """Analytic FLOPs per step, averaged over the batches stepped on (module docstring).

  Args:
    config, settings: the benchmark's.
    host_batches: the stepped batches.
    scan_counts: per batch, (scans, stages) voxel counts of its scans.
    budgets: the pack shape.
    devices: of the data axis (the loss pads its pair rows to them).
  """
  variant, out_dim = settings["variant"], config.model.out_dim
  if settings["model"] == "minkunet":
    useful_of = lambda c: minkunet_forward_flops(variant, c, out_dim=out_dim, executed=False)
    per_pack = minkunet_forward_flops(variant, list(budgets.tokens), out_dim=out_dim, executed=True)
  elif settings["model"] == "waffleiron":
    useful_of = lambda c: waffleiron_forward_flops(variant, c[0], 1, out_dim)
    per_pack = waffleiron_forward_flops(variant, budgets.tokens[0], budgets.scans, out_dim)
  else:
    enc = {"patch_size": config.model.patch_size, "out_dim": out_dim}
    useful_of = lambda c: encoder_forward_flops(variant, c, **enc)
    per_pack = encoder_forward_flops(variant, list(budgets.tokens), list(budgets.attention), **enc)
  packs = len(host_batches[0]["token"])
  useful = []
  for counts in scan_counts:
    flops = [useful_of([int(n) for n in c]) for c in counts]  # Python ints: no int32 overflow
    useful.append({k: sum(f[k] for f in flops) for k in flops[0]})
  model_fwd = {k: statistics.fmean(b[k] for b in useful) for k in useful[0]}
  executed_fwd = {k: v * packs for k, v in per_pack.items()}
  pairs = statistics.fmean(int(h["pairs_mask"].sum()) for h in host_batches)
  slots = int(host_batches[0]["pairs_mask"].size)
  rows = padded_pairs(config, slots, devices)
  relational = config.loss.name == "relational"
  d = config.model.out_dim
  flops = {
    "encoder_forward_model": model_fwd,
    "encoder_forward_executed": executed_fwd,
    "encoder_fwd_bwd_model": 3 * model_fwd["total"],
    "encoder_fwd_bwd_executed": 3 * executed_fwd["total"],
    "valid_pairs_per_step": pairs,
    "loss_pair_rows_executed": rows,
    "loss_model": relational_flops(pairs, d) if relational else None,
    "loss_executed": relational_flops(rows, d) if relational else None,
  }
  flops["step_model"] = flops["encoder_fwd_bwd_model"] + (flops["loss_model"] or 0.0)
  flops["step_executed"] = flops["encoder_fwd_bwd_executed"] + (flops["loss_executed"] or 0.0)
  flops["executed_over_model"] = flops["step_executed"] / flops["step_model"]
  flops["encoder_executed_over_model"] = (
    flops["encoder_fwd_bwd_executed"] / flops["encoder_fwd_bwd_model"]
  )
  return flops


def padded_pairs(config, slots: int, devices: int) -> int:
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


def xla_flops(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends have none.
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def compiled_memory(compiled) -> dict | None:
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


def peak_flops(
  device_kind: str, backend: str, override: float | None = None
) -> tuple[float | None, str]:
  """(dense bf16 peak FLOP/s of one device, where it comes from) or (None, why not)."""
  if override:
    return override, "--peak_flops"
  for name, value in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return value, f"PEAK_FLOPS[{name!r}] (dense bf16)"
  if backend == "cpu":
    return None, "a CPU has no bf16 tensor-core peak; MFU is not defined (pass --peak_flops)"
  return None, f"no peak known for device kind {device_kind!r} (pass --peak_flops)"
