"""WaffleIron (Puy et al., ICCV 2023) on packed batches: the student of ScaLR.

valeoai/WaffleIron v0.3 (`waffleiron/embedding.py`, `backbone.py`, `segmenter.py`)
restated in Flax with the same numbers, parameters and PyTorch initialisation,
for the project's packs (several scans per pack, padding masked). A point's
features go through

  Embedding     BN1d of the input features; a pointwise conv C->F (bias); and a
                neighbour branch on the k nearest points of the same scan (the
                point excluded): neighbour minus centre of the normalised
                features, BN2d, 1x1 conv C->F (no bias), BN2d, ReLU, 1x1 conv
                F->F (no bias), max over the neighbours; the two branches are
                concatenated and merged by a 1x1 conv 2F->F (bias).
  SpatialMix    x += DropPath(LayerScale(FFN(scatter-mean of norm(x) onto a 2D
                grid))[cell of x]): the FFN is a depthwise 3x3 conv (bias), ReLU,
                depthwise 3x3 conv (bias) on the grid; LayerScale a per-channel
                factor (officially a grouped 1x1 conv without bias).
  ChannelMix    x += DropPath(LayerScale(conv F->F, ReLU, conv F->F (norm(x)))).
  head          a pointwise conv F->out_dim (classes, or the teacher's D: ScaLR
                768->1024), or ScaLR+'s MLP F->hidden->ReLU->out_dim
                (`head_hidden`); L2-normalised when `normalize` (distillation).

Layer d (0-based) runs SpatialMix on plane `planes[d % P]` with grid
`grids[d % P]`, then ChannelMix. Plane p projects along axis p: p = 2 onto
(x, y), 1 onto (x, z), 0 onto (y, z); the official configs cycle (2, 1, 0). A
point's cell on a plane of axes (a, b) and grid (H, W) is q_a * W + q_b with
q = floor((xyz - fov_min) / ((fov_max - fov_min) / (H, W))), clipped to the
grid (the official pipeline crops the cloud to the field of view first,
`waffleiron_inputs.crop_mask`, and never needs the clip). A cell averages the
points it holds; empty cells are zero.

  VARIANTS        variant -> (depth, width, grid preset): "48_256" (SemanticKITTI),
                  "48_384" (nuScenes), "48_768" (ScaLR), "12_64" (CPU runs on the
                  synthetic world), "tiny" (tests).
  GRIDS           preset -> (field of view, grid shapes); planes default (2, 1, 0).
  Model           the network: `Model(variant=...)`, `__call__(batch) -> (features, aux)`.
  Embedding, SpatialMix, ChannelMix, DepthwiseConv   its layers.
  Projection      a plane's per-scan grids: scatter-mean (flatten) and gather (inflate).
  grid_cells      the cell of every token on a plane (float32, on device).
  input_features  the embedding's input from the batch's x, y, z, intensity.
  load_torch_checkpoint  variables from an official PyTorch state dict
                  (`waffleiron_import` has the mapping).
  param_count     trainable parameters, from shapes (also the CLI below).

The numpy side (kNN maps, the pack's keys, the official crop and cells) is
`waffleiron_inputs`, so the data pipeline needs no JAX.

Why per-scan grids: a pack holds several scans, and the official model sees
one scan per batch element. Each scan gets its own grids: a token's cell is
offset by its scan's slot, the mean runs over (pack, slot, cell), and the
depthwise convolutions run on (B * S, H, W, F), so a scan's features depend
neither on the other scans of its pack nor on its place in it (beyond
BatchNorm's batch statistics in training, which are the batch's, as
officially). Padding enters no mean and no BatchNorm statistic
(`minkunet.MaskedBatchNorm`); the official code zero-pads scans to the
longest of its batch and counts those points in its BatchNorm statistics,
which is the same only when nothing is padded. The layers run under
`nn.scan` over groups of P layers (one per plane): one compiled body instead
of 48 unrolled layers, every parameter stacked on a leading axis of length
depth / P (so depth must be a multiple of P).

BatchNorm is `minkunet.MaskedBatchNorm` (statistics of the valid tokens,
PyTorch's momentum, collection `batch_stats`); `norm="layer"` puts LayerNorm
(eps 1e-5) in SpatialMix and ChannelMix, as ScaLR does; the embedding keeps
BatchNorm either way, as officially. DropPath drops a whole scan's residual,
as the official one drops a batch element's, when `drop_path > 0` and `apply`
gets a "dropout" rng. Parameters start as PyTorch's defaults, which the
official code keeps: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and
biases, so LayerScale starts in U(-1, 1).

Batch keys read (B packs, T0 stage-0 tokens, S scan slots; `input_pipeline.py`
has the others): `features` (B, T0, 4) x, y, z, intensity; `s0/mask` (B, T0);
and three keys of this model (`waffleiron_inputs.pack_inputs` builds them):

  knn     (B, T0, k) int32: the tokens of the k (16) nearest points of the
          token's own scan, itself excluded, T0 for padding. Distances do not
          change under the pipeline's rotations, flips and isotropic scaling,
          so it is computed once per scan, before augmentation.
  scan    (B, T0) int32: the token's scan slot in its pack, S for padding.
  slots   (B, S) bool: the slot holds a scan (its shape gives S).

The input features are computed from `features` in the order the official
`prepare_input_features` lists them (`input_feat`): "intensity", "xyz",
"height" (z), "radius" (|xyz|), "constant" (1). (The official training
augments its copy of xyz in the features with its own rotation and scaling;
here they follow the batch's coordinates.)

  python -m reldistill_jax.models.waffleiron --depth 48 --width 256 --in_channels 5 \\
      --num_classes 19

prints `48-256 <trainable parameters>` (6840615, the official Segmenter's).
"""

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from reldistill_jax.models import layers
from reldistill_jax.models.minkunet import MaskedBatchNorm
from reldistill_jax.models.waffleiron_inputs import NUM_NEIGHBORS, PLANE_AXES, PLANES

# Field of view ((x, y, z) min, (x, y, z) max) in metres and the grid of every plane. The
# configs give the grids; a cell spans (max - min) / grid (`datasets/pc_dataset.py`), so a grid
# is the extent over the cell size, rounded down: nuScenes (configs/WaffleIron-48-384__nuscenes
# .yaml) 100 m / 0.6 m = 166 and 10 m / 0.6 m = 16; ScaLR (configs/pretrain/WI_768_pretrain.yaml)
# 128 / 0.5 = 256 and 16 / 0.5 = 32; SemanticKITTI (WaffleIron-48-256__kitti.yaml) x, y in
# +-50 m, z in [-3, 2] m, 100 / 0.4 = 250 and 5 / 0.4 = 12 (the BEV-only
# WaffleIron-48-256__40cm-BEV-cutmix-kitti.yaml has z in [-5, 3] and one (250, 250) grid).
GRIDS = {
  "semantickitti": (((-50, -50, -3), (50, 50, 2)), ((250, 250), (250, 12), (250, 12))),
  "nuscenes": (((-50, -50, -5), (50, 50, 5)), ((166, 166), (166, 16), (166, 16))),
  "scalr": (((-64, -64, -8), (64, 64, 8)), ((256, 256), (256, 32), (256, 32))),
  "tiny": (((-50, -50, -5), (50, 50, 5)), ((40, 40), (40, 4), (40, 4))),
}
# name -> (depth, width, grid preset).
VARIANTS = {
  "48_256": (48, 256, "semantickitti"),
  "48_384": (48, 384, "nuscenes"),
  "48_768": (48, 768, "scalr"),
  "12_64": (12, 64, "nuscenes"),  # CPU runs on the synthetic world
  "tiny": (3, 16, "tiny"),
}
INPUT_FEAT = ("intensity", "xyz", "radius")  # nuScenes and ScaLR (5 channels)
_FEATURE_WIDTH = {"intensity": 1, "xyz": 3, "height": 1, "radius": 1, "constant": 1}


def _torch_uniform(fan_in: int):
  """PyTorch's default initialisation of a conv's weight and bias: U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(features: int, fan_in: int, name: str, bias: bool = True, dtype=jnp.float32):
  """A pointwise conv (PyTorch's Conv1d / Conv2d with kernel 1) and its initialisation."""
  init = _torch_uniform(fan_in)
  return nn.Dense(features, use_bias=bias, dtype=dtype, kernel_init=init, bias_init=init, name=name)


def _drop_path(module: nn.Module, y: jax.Array, scan: jax.Array, slots: int, rate: float):
  """Stochastic depth per scan: y / keep * Bernoulli(keep) drawn per (pack, slot)."""
  if rate == 0.0 or not module.has_rng("dropout"):
    return y
  keep = 1.0 - rate
  draw = jnp.floor(keep + jax.random.uniform(module.make_rng("dropout"), (y.shape[0], slots + 1)))
  per_token = jnp.take_along_axis(draw, scan, axis=1)[..., None]  # (B, T, 1)
  return y / keep * per_token.astype(y.dtype)


class _Norm(nn.Module):
  """BatchNorm over the valid tokens (`MaskedBatchNorm`) or LayerNorm (eps 1e-5)."""

  kind: str
  momentum: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    if self.kind == "batch":
      return MaskedBatchNorm(self.momentum, dtype=self.dtype, name="bn")(x, mask)
    if self.kind == "layer":
      y = layers.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln")(x)
      return jnp.where(mask[..., None], y, 0)
    raise ValueError(f"norm must be 'batch' or 'layer', got {self.kind!r}")


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------


class Embedding(nn.Module):
  """Point and neighbourhood embedding (module docstring)."""

  width: int
  momentum: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, knn: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, T, C) features, (B, T, k) neighbour tokens (T: padding), (B, T) -> (B, T, F)."""
    c, f = x.shape[-1], self.width
    bn = lambda name: MaskedBatchNorm(self.momentum, dtype=self.dtype, name=name)
    x = bn("norm")(x, mask)
    point = _dense(f, c, "conv1", dtype=self.dtype)(x)
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    neighbors = jax.vmap(lambda xb, ib: xb[ib])(padded, knn) - x[:, :, None]  # (B, T, k, C)
    pairs = jnp.broadcast_to(mask[..., None], knn.shape)
    y = bn("neighbor_norm_in")(neighbors, pairs)
    y = _dense(f, c, "neighbor_conv_in", bias=False, dtype=self.dtype)(y)
    y = jax.nn.relu(bn("neighbor_norm_hidden")(y, pairs))
    y = _dense(f, f, "neighbor_conv_out", bias=False, dtype=self.dtype)(y)
    y = jnp.max(y, axis=2)
    out = _dense(f, 2 * f, "final", dtype=self.dtype)(jnp.concatenate([point, y], axis=-1))
    return jnp.where(mask[..., None], out, 0)


@flax.struct.dataclass
class Projection:
  """A plane's per-scan grids: every token's cell and the points of every cell.

  Attributes:
    index: (B, T) the token's cell among its pack's S * H * W (slot after
      slot), 0 for padding.
    segment: (B * T,) the token's cell among all the batch's, each pack with
      one more cell that takes its padding.
    counts: (B * (S * H * W + 1), 1) points per cell (at least 1).
    grid: (H, W).
    slots: S.
  """

  index: jax.Array
  segment: jax.Array
  counts: jax.Array
  grid: tuple[int, int] = flax.struct.field(pytree_node=False)
  slots: int = flax.struct.field(pytree_node=False)

  @classmethod
  def build(cls, cell, scan, mask, grid: Sequence[int], slots: int) -> "Projection":
    """From (B, T) cells on a scan's grid (`grid_cells`), scan slots (S for padding), mask."""
    b, cells = cell.shape[0], slots * grid[0] * grid[1]
    index = jnp.where(mask, jnp.minimum(scan, slots - 1) * grid[0] * grid[1] + cell, 0)
    segment = (jnp.where(mask, index, cells) + jnp.arange(b)[:, None] * (cells + 1)).reshape(-1)
    counts = jax.ops.segment_sum(
      mask.reshape(-1).astype(jnp.float32), segment, num_segments=b * (cells + 1)
    )
    return cls(index, segment, jnp.maximum(counts, 1.0)[:, None], tuple(grid), slots)

  def flatten(self, x: jax.Array) -> jax.Array:
    """(B, T, F) -> (B * S, H, W, F): the mean of every cell's points (zero when empty)."""
    b, t, f = x.shape
    sums = jax.ops.segment_sum(x.reshape(b * t, f), self.segment, num_segments=self.counts.shape[0])
    mean = (sums / self.counts.astype(sums.dtype)).reshape(b, -1, f)[:, :-1]
    return mean.reshape(b * self.slots, *self.grid, f)

  def inflate(self, grid: jax.Array, batch: int) -> jax.Array:
    """(B * S, H, W, F) -> (B, T, F): every token's cell."""
    rows = grid.reshape(batch, -1, grid.shape[-1])
    return jax.vmap(lambda r, i: r[i])(rows, self.index)


class DepthwiseConv(nn.Module):
  """A depthwise 3x3 convolution with bias and zero padding 1 (PyTorch's Conv2d(F, F, 3,
  padding=1, groups=F)): (N, H, W, F) -> (N, H, W, F).

  Written as nine shifted multiply-adds, which XLA fuses into one pass over the
  grid: its grouped convolution (`feature_group_count=F`) is 25 times slower on
  the CPU at these shapes.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid: jax.Array) -> jax.Array:
    _, h, w, f = grid.shape
    init = _torch_uniform(9)
    kernel = self.param("kernel", init, (3, 3, 1, f), jnp.float32).astype(self.dtype)
    bias = self.param("bias", init, (f,), jnp.float32).astype(self.dtype)
    padded = jnp.pad(grid.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = bias
    for i in range(3):
      for j in range(3):  # cross-correlation, as PyTorch's
        out = out + padded[:, i : i + h, j : j + w] * kernel[i, j, 0]
    return out


class _Mix(nn.Module):
  """The settings SpatialMix and ChannelMix share."""

  norm: str = "batch"
  momentum: float = 0.1
  activation: str = "relu"
  drop_path: float = 0.0
  dtype: Any = jnp.float32


class SpatialMix(_Mix):
  """x += DropPath(LayerScale(FFN(flatten(norm(x))))[cell]) on one plane."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, proj: Projection, scan: jax.Array):
    """(B, T, F) tokens, (B, T) mask, the plane's projection, (B, T) scan slots."""
    f = x.shape[-1]
    y = proj.flatten(_Norm(self.norm, self.momentum, self.dtype, name="norm")(x, mask))
    y = _activation(self.activation)(DepthwiseConv(self.dtype, name="ffn_0")(y))
    y = DepthwiseConv(self.dtype, name="ffn_1")(y)
    scale = self.param("scale", _torch_uniform(1), (f,), jnp.float32)
    y = proj.inflate(y, x.shape[0]) * scale.astype(y.dtype)
    y = _drop_path(self, y, scan, proj.slots, self.drop_path)
    return jnp.where(mask[..., None], x + y, 0)


class ChannelMix(_Mix):
  """x += DropPath(LayerScale(conv, act, conv (norm(x))))."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, scan: jax.Array, slots: int) -> jax.Array:
    f = x.shape[-1]
    y = _Norm(self.norm, self.momentum, self.dtype, name="norm")(x, mask)
    y = _activation(self.activation)(_dense(f, f, "mlp_0", dtype=self.dtype)(y))
    y = _dense(f, f, "mlp_1", dtype=self.dtype)(y)
    y = y * self.param("scale", _torch_uniform(1), (f,), jnp.float32).astype(y.dtype)
    y = _drop_path(self, y, scan, slots, self.drop_path)
    return jnp.where(mask[..., None], x + y, 0)


class _Layers(nn.Module):
  """One SpatialMix and one ChannelMix per plane: the body that `Model` scans `depth /
  planes` times (one compiled body instead of `depth` unrolled layers)."""

  slots: int
  mix: Mapping[str, Any]

  @nn.compact
  def __call__(self, x: jax.Array, inputs: tuple) -> tuple[jax.Array, None]:
    mask, scan, projections = inputs
    for i, proj in enumerate(projections):
      x = SpatialMix(**self.mix, name=f"spatial_mix_{i}")(x, mask, proj, scan)
      x = ChannelMix(**self.mix, name=f"channel_mix_{i}")(x, mask, scan, self.slots)
    return x, None


def _activation(name: str):
  """ReLU (WaffleIron) or exact GELU (ScaLR+'s `gelu`, PyTorch's `nn.GELU()`)."""
  if name == "relu":
    return jax.nn.relu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f"activation must be 'relu' or 'gelu', got {name!r}")


def grid_cells(xyz: jax.Array, fov, plane: int, grid: Sequence[int]) -> jax.Array:
  """(..., 3) coordinates -> (...) int32 cell on the plane along axis `plane` (float32;
  `cell_indices` is the official float64 computation, clipped the same way)."""
  axes = list(PLANE_AXES[plane])
  low, high = np.asarray(fov[0], np.float64)[axes], np.asarray(fov[1], np.float64)[axes]
  size = np.asarray(grid)
  resolution = ((high - low) / size).astype(np.float32)
  q = jnp.floor((xyz[..., axes] - low.astype(np.float32)) / resolution).astype(jnp.int32)
  q = jnp.clip(q, 0, size - 1)
  return q[..., 0] * int(size[1]) + q[..., 1]


def input_features(features: jax.Array, names: Sequence[str] | None) -> jax.Array:
  """The embedding's input from the batch's (x, y, z, intensity), as the official
  `prepare_input_features` orders them; None keeps `features` as they are."""
  if names is None:
    return features
  xyz, parts = features[..., :3], []
  for name in names:
    if name == "intensity":
      parts.append(features[..., 3:4])
    elif name == "xyz":
      parts.append(xyz)
    elif name == "height":
      parts.append(xyz[..., 2:3])
    elif name == "radius":
      parts.append(jnp.sqrt(jnp.sum(xyz * xyz, axis=-1, keepdims=True)))
    elif name == "constant":
      parts.append(jnp.ones_like(xyz[..., :1]))
    else:
      raise ValueError(f"unknown input feature {name!r}; choose from {list(_FEATURE_WIDTH)}")
  return jnp.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


class Model(nn.Module):
  """WaffleIron (Segmenter: embedding, backbone, pointwise head) on packed batches.

  Attributes:
    variant: a name of `VARIANTS` setting depth, width and grids, or None (the
      attributes below).
    depth, width: L and F when `variant` is None.
    out_dim: classes, or the teacher's dimension (distillation).
    head_hidden: 0 for the pointwise head; else the MLP head's hidden width
      (ScaLR+: 2048).
    norm: "batch" (WaffleIron) or "layer" (ScaLR) in SpatialMix and ChannelMix.
    activation: "relu", or "gelu" (ScaLR+) in SpatialMix and ChannelMix.
    drop_path: stochastic depth of every residual branch (0.2 officially in
      training); needs a "dropout" rng.
    fov, grids: field of view ((min x, y, z), (max x, y, z)) and the grid of
      every plane; None takes the variant's preset (nuScenes' without one).
    planes: projection axis of the layers, cycled (the official `dim_proj`).
    input_feat: the input features (`input_features`); None feeds `features`
      as they are (then `features[..., :3]` must still be x, y, z).
    bn_momentum: PyTorch's convention (0.1, PyTorch's default, officially).
    normalize: L2-normalise the output (distillation).
    remat: recompute each group of layers in the backward pass (memory: one (T, F)
      array a group rather than every layer's grids; about a third more compute).
    dtype: compute dtype (parameters and statistics stay float32).
  """

  variant: str | None = "48_256"
  depth: int = 48
  width: int = 256
  out_dim: int = 19
  head_hidden: int = 0
  norm: str = "batch"
  activation: str = "relu"
  drop_path: float = 0.0
  fov: Any = None
  grids: Any = None
  planes: Sequence[int] = PLANES
  input_feat: Sequence[str] | None = INPUT_FEAT
  bn_momentum: float = 0.1
  normalize: bool = True
  remat: bool = True
  dtype: Any = jnp.float32

  def sizes(self) -> tuple[int, int, Any, tuple[tuple[int, int], ...]]:
    """(depth, width, field of view, grids) after the variant."""
    if self.variant is None:
      depth, width, preset = self.depth, self.width, "nuscenes"
    elif self.variant in VARIANTS:
      depth, width, preset = VARIANTS[self.variant]
    else:
      raise ValueError(f"unknown WaffleIron variant {self.variant!r}; choose from {list(VARIANTS)}")
    fov = GRIDS[preset][0] if self.fov is None else self.fov
    grids = GRIDS[preset][1] if self.grids is None else self.grids
    if len(grids) != len(self.planes):
      raise ValueError(f"{len(grids)} grids for {len(self.planes)} planes")
    return depth, width, fov, tuple(tuple(int(s) for s in g) for g in grids)

  def num_stages(self) -> int:
    """The stages the model reads (stage 0 only)."""
    return 1

  def neighbours_needed(self) -> int:
    """The k of the kNN map the bucket store must hold (`data_prep.voxelise --knn`)."""
    return NUM_NEIGHBORS

  def token_costs(self, in_channels: int = 5) -> list[float]:
    """Multiply-adds of a stage-0 token (the grids' cost is per pack), then 0 for its
    attention view: what `packing.fit_budgets` trades."""
    depth, f, _, _ = self.sizes()
    k = NUM_NEIGHBORS
    embed = in_channels * f + k * (in_channels * f + f * f) + 2 * f * f
    head = (
      f * self.head_hidden + self.head_hidden * self.out_dim
      if self.head_hidden
      else f * self.out_dim
    )
    return [float(embed + depth * 2 * f * f + head), 0.0]

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encodes a packed batch.

    Returns:
      (features, aux): features (B, T0, out_dim), zero on padding (L2-normalised
      when `normalize`); aux {"embedding": (B, T0, F) the tokens entering the
      backbone, "backbone": (B, T0, F) the backbone's output (for heads)}.
    """
    depth, width, fov, grids = self.sizes()
    missing = [key for key in ("knn", "scan", "slots") if key not in batch]
    if missing:
      raise ValueError(f"WaffleIron reads {missing}: add them with waffleiron_inputs.pack_inputs")
    mask, scan, slots = batch["s0/mask"], batch["scan"], batch["slots"].shape[1]
    xyz = batch["features"][..., :3].astype(jnp.float32)
    if depth % len(grids):
      raise ValueError(f"depth {depth} is not a multiple of the {len(grids)} planes")
    projections = tuple(
      Projection.build(grid_cells(xyz, fov, plane, grid), scan, mask, grid, slots)
      for plane, grid in zip(self.planes, grids, strict=True)
    )
    x = input_features(batch["features"].astype(self.dtype), self.input_feat)
    x = Embedding(width, self.bn_momentum, self.dtype, name="embed")(x, batch["knn"], mask)
    aux = {"embedding": x}
    mix = dict(norm=self.norm, momentum=self.bn_momentum, activation=self.activation,
               drop_path=self.drop_path, dtype=self.dtype)  # fmt: skip
    stack = nn.scan(  # rematerialised with `remat` (its docstring)
      nn.remat(_Layers) if self.remat else _Layers,
      variable_axes={"params": 0, "batch_stats": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=nn.broadcast,
      length=depth // len(grids),
    )
    x, _ = stack(slots, mix, name="layers")(x, (mask, scan, projections))
    aux["backbone"] = x
    if self.head_hidden:
      x = jax.nn.relu(_dense(self.head_hidden, width, "classif_0", dtype=self.dtype)(x))
      y = _dense(self.out_dim, self.head_hidden, "classif_1", dtype=self.dtype)(x)
    else:
      y = _dense(self.out_dim, width, "classif", dtype=self.dtype)(x)
    if self.normalize:
      return layers.l2_normalize(y, mask), aux
    return jnp.where(mask[..., None], y.astype(jnp.float32), 0), aux


def from_config(model_config, dtype) -> Model:
  """The model of a config's `model` block."""
  get = model_config.get
  return Model(
    variant=get("variant", "48_256"),
    depth=get("depth", 48),
    width=get("width", 256),
    out_dim=model_config.out_dim,
    head_hidden=get("head_hidden", 0),
    norm=get("norm", "batch"),
    activation=get("activation", "relu"),
    drop_path=get("drop_path", 0.0),
    fov=get("fov", None),
    grids=get("grids", None),
    planes=tuple(get("planes", PLANES)),
    input_feat=get("input_feat", INPUT_FEAT),
    bn_momentum=get("bn_momentum", 0.1),
    normalize=get("normalize", True),
    remat=get("remat", True),
    dtype=dtype,
  )


# ----------------------------------------------------------------------------
# PyTorch checkpoints.
# ----------------------------------------------------------------------------


def load_torch_checkpoint(path_or_state_dict, config_or_model_args) -> dict[str, Any]:
  """Variables {"params", "batch_stats"} of `Model` from an official WaffleIron / ScaLR
  state dict (`Segmenter.state_dict()`: `embed.*`, `waffleiron.spatial_mix.{i}.*`,
  `waffleiron.channel_mix.{i}.*`, `classif.*`), BatchNorm running statistics included
  (`waffleiron_import` has the mapping).

  Args:
    path_or_state_dict: a `.pth` file (reading it needs torch) or a mapping of
      arrays or tensors; {"net": ...} (WaffleIron's trainer), {"model_point":
      ...} (ScaLR's distiller) and a "module." prefix (DDP) are accepted.
    config_or_model_args: a `Model`, a dict of its attributes, or a config's
      `model` block (`from_config`).

  Raises:
    ValueError: a layer missing, a key left over, or a shape that differs from
      the model's.
  """
  from reldistill_jax.models import waffleiron_import

  if isinstance(config_or_model_args, Model):
    model = config_or_model_args
  elif isinstance(config_or_model_args, dict):
    model = Model(**config_or_model_args)
  else:
    model = from_config(config_or_model_args, jnp.float32)
  return waffleiron_import.load(path_or_state_dict, model)


# ----------------------------------------------------------------------------
# Shapes and the parameter count.
# ----------------------------------------------------------------------------


def example_batch(in_channels: int = 4, tokens: int = 32, slots: int = 1) -> dict:
  """Shapes of a one-pack batch (for `jax.eval_shape`)."""
  shape = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct((1, *s), dtype)
  return {
    "features": shape(tokens, in_channels, dtype=jnp.float32),
    "s0/mask": shape(tokens, dtype=jnp.bool_),
    "knn": shape(tokens, NUM_NEIGHBORS),
    "scan": shape(tokens),
    "slots": shape(slots, dtype=jnp.bool_),
  }


def param_count(depth: int, width: int, in_channels: int, out_dim: int, head_hidden: int = 0):
  """Trainable parameters (not the BatchNorm statistics) of a WaffleIron Segmenter whose
  embedding reads `in_channels` features, from shapes only."""
  model = Model(variant=None, depth=depth, width=width, out_dim=out_dim, head_hidden=head_hidden,
                input_feat=None, planes=(2,), grids=((4, 4),))  # fmt: skip
  shapes = jax.eval_shape(model.init, jax.random.key(0), example_batch(in_channels))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m reldistill_jax.models.waffleiron",
    description="Prints '<depth>-<width> <trainable parameters>' of a WaffleIron Segmenter, "
    "from shapes only (no BatchNorm statistics). Reads and writes no file.",
  )
  parser.add_argument("--depth", type=int, default=48, help="layers L")
  parser.add_argument("--width", type=int, default=256, help="channels F")
  parser.add_argument("--in_channels", type=int, default=5, help="input features per point")
  parser.add_argument("--num_classes", type=int, default=19, help="outputs of the head")
  parser.add_argument("--head_hidden", type=int, default=0, help="MLP head width (0: linear)")
  args = parser.parse_args(argv)
  if min(args.depth, args.width, args.in_channels, args.num_classes) < 1 or args.head_hidden < 0:
    parser.error("--depth, --width, --in_channels and --num_classes must be positive")
  count = param_count(args.depth, args.width, args.in_channels, args.num_classes, args.head_hidden)
  print(f"{args.depth}-{args.width} {count}")


if __name__ == "__main__":
  main()
