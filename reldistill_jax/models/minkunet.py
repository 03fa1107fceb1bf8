"""MinkUNet (MinkowskiEngine's Res16UNet family) as sparse-as-dense convolutions on packed batches.

The 3D student of most published image-to-lidar distillation results (SLidR,
ST-SLidR, Seal, SuperFlow, OLIVINE use `Res16UNet34C`), built from the maps a
bucket already holds (`serialization.py`), so it runs wherever JAX runs and
installs with pip:

  submanifold 3x3x3 convolution   a gather of the 27 neighbours of every voxel
                                  (`s{s}/neighbors`) contracted with a
                                  (27, cin, cout) kernel (`layers.sparse_conv`);
  stride-2 2x2x2 convolution      every child's features, placed in the slot of
                                  its octant (`coords & 1`, `s{s}/octant`) of
                                  its parent (`s{s}/parent`), then one
                                  (8 cin, cout) matmul per parent;
  transposed 2x2x2 convolution    the parent's features times the kernel of the
                                  child's octant, gathered back to the child;
  BatchNorm                       statistics over the valid voxels only
                                  (`s{s}/mask`): padding never enters them.

Stage s+1 holds the unique `coords >> 1` of stage s, which is exactly the output
set of a MinkowskiEngine / spconv stride-2, kernel-2 convolution, and the
decoder's transposed convolutions return to the encoder's voxels, as
`MinkowskiConvolutionTranspose` (spconv's `SparseInverseConv3d`) does.

Architecture (Res16UNet: `INIT_DIM`, `PLANES`, `LAYERS` of `VARIANTS`): a stem
convolution (kernel 3) to INIT_DIM, BN, ReLU; four times a stride-2 convolution
(same width), BN, ReLU and LAYERS[i] BasicBlocks of PLANES[i]; four times a
transposed convolution to PLANES[4 + i], BN, ReLU, concatenation with the
encoder's output at that resolution and LAYERS[4 + i] BasicBlocks; a 1x1 layer
(with bias) to `out_dim`, then L2 normalisation. A BasicBlock is conv3-BN-ReLU-
conv3-BN plus the input (through a 1x1 convolution and BN when the width
changes), then ReLU. Convolutions have no bias; kernels start from He normal
initialisation (fan out), as MinkowskiEngine's ResNetBase.

BatchNorm: with the `batch_stats` collection mutable (training: `apply(...,
mutable=["batch_stats"])`) a layer normalises by the statistics of the valid
voxels of the whole batch and updates its running averages with PyTorch's
convention (`bn_momentum` 0.1: running = 0.9 running + 0.1 batch, the unbiased
variance); otherwise (evaluation, a frozen encoder) by its running averages.
Under `jit` the batch is one global array sharded over the `data` mesh axis,
so the statistics are reduced over every device: synchronised BatchNorm.

Batch keys read (`input_pipeline.py`): `features` (B, T0, F); per stage
`s{s}/mask` (B, T_s), `s{s}/neighbors` (B, T_s, 27), and for s < 4
`s{s}/parent` (B, T_s) and `s{s}/octant` (B, T_s). The buckets must have 5
stages. The attention views of the batch (`order`, `inverse`, `lengths`) are
not read.

  python -m reldistill_jax.models.minkunet --in_channels 4 --out_dim 512

prints `<variant> <trainable parameters>` for every variant.
"""

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reldistill_jax.models import layers

# name -> (INIT_DIM, PLANES (4 encoder, 4 decoder), LAYERS), as MinkowskiEngine's Res16UNet*.
VARIANTS = {
  "34c": (32, (32, 64, 128, 256, 256, 128, 96, 96), (2, 3, 4, 6, 2, 2, 2, 2)),
  "18a": (32, (32, 64, 128, 256, 128, 128, 96, 96), (2, 2, 2, 2, 2, 2, 2, 2)),
  "14a": (32, (32, 64, 128, 256, 128, 128, 96, 96), (1, 1, 1, 1, 1, 1, 1, 1)),
  "tiny": (8, (8, 16, 16, 32, 16, 16, 8, 8), (1, 1, 1, 1, 1, 1, 1, 1)),
}
NUM_STAGES = 5
# MinkowskiEngine's ResNetBase.weight_initialization: kaiming_normal_(mode="fan_out", relu).
_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal", in_axis=-2, out_axis=-1)


# ----------------------------------------------------------------------------
# Operations.
# ----------------------------------------------------------------------------


def down_conv(x: jax.Array, parent: jax.Array, octant: jax.Array, kernel: jax.Array, tokens: int):
  """Stride-2 2x2x2 convolution: y[p] = sum over the children c of p of x[c] @ kernel[octant(c)].

  Args:
    x: (B, T, cin) child features.
    parent: (B, T) parent token of every child, `tokens` for padding.
    octant: (B, T) 4 (x & 1) + 2 (y & 1) + (z & 1) of every child's coordinates.
    kernel: (8, cin, cout), octants in the same order.
    tokens: T', the parents' token budget.

  Returns:
    (B, T', cout).
  """
  b, t, cin = x.shape
  slot = parent * 8 + octant.astype(parent.dtype) + (jnp.arange(b) * (tokens + 1) * 8)[:, None]
  slots = jax.ops.segment_sum(
    x.reshape(b * t, cin), slot.reshape(-1), num_segments=b * (tokens + 1) * 8
  )  # a parent has at most one child per octant: the sum places each child in its slot
  slots = slots.reshape(b, tokens + 1, 8 * cin)[:, :tokens]
  return slots @ kernel.reshape(8 * cin, -1)


def up_conv(x: jax.Array, parent: jax.Array, octant: jax.Array, kernel: jax.Array) -> jax.Array:
  """Transposed stride-2 2x2x2 convolution: y[c] = x[parent(c)] @ kernel[octant(c)].

  Args:
    x: (B, T', cin) parent features.
    parent: (B, T) parent token of every child, T' for padding (reads zeros).
    octant: (B, T) the child's octant (`down_conv`).
    kernel: (8, cin, cout).

  Returns:
    (B, T, cout).
  """
  b, tp, _ = x.shape
  per_octant = jnp.einsum("bpc,kcd->bpkd", x, kernel)  # (B, T', 8, cout)
  per_octant = jnp.pad(per_octant, ((0, 0), (0, 1), (0, 0), (0, 0)))
  rows = per_octant.reshape(b, (tp + 1) * 8, -1)
  index = parent * 8 + octant.astype(parent.dtype)
  return jax.vmap(lambda r, i: r[i])(rows, index)


class MaskedBatchNorm(nn.Module):
  """BatchNorm over the valid tokens of the batch (module docstring)."""

  momentum: float = 0.1  # PyTorch's convention: the weight of the batch
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.is_mutable_collection("batch_stats"):
      m = mask[..., None].astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      n = jnp.sum(m)
      mean = jnp.sum(xf * m, axes) / jnp.maximum(n, 1.0)
      var = jnp.sum(jnp.square((xf - mean) * m), axes) / jnp.maximum(n, 1.0)
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    else:
      mean, var = running_mean.value, running_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return jnp.where(mask[..., None], y, 0).astype(self.dtype)


class _Conv(nn.Module):
  """A kernel of shape (taps, cin, features) without bias, He-initialised."""

  features: int
  taps: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (self.taps, x.shape[-1], self.features)
    return self.param("kernel", _HE_FAN_OUT, shape, jnp.float32).astype(self.dtype)


def _subm(features: int, dtype, name: str):
  """A 3x3x3 submanifold convolution without bias: f(x, neighbors)."""
  conv = _Conv(features, 27, dtype, name=name)
  return lambda x, neighbors: layers.sparse_conv(x, neighbors, conv(x))


class BasicBlock(nn.Module):
  """conv3-BN-ReLU-conv3-BN plus the (projected) input, then ReLU."""

  planes: int
  momentum: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, neighbors: jax.Array, mask: jax.Array) -> jax.Array:
    bn = lambda name: MaskedBatchNorm(self.momentum, dtype=self.dtype, name=name)
    out = jax.nn.relu(bn("bn1")(_subm(self.planes, self.dtype, "conv1")(x, neighbors), mask))
    out = bn("bn2")(_subm(self.planes, self.dtype, "conv2")(out, neighbors), mask)
    if x.shape[-1] != self.planes:
      kernel = _Conv(self.planes, 1, self.dtype, name="downsample")(x)[0]
      x = bn("downsample_bn")(x @ kernel, mask)
    return jax.nn.relu(out + x)


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


class Model(nn.Module):
  """MinkUNet (Res16UNet) on packed batches.

  Attributes:
    variant: `34c` (Res16UNet34C), `18a`, `14a` or `tiny` (tests and CPU runs).
    out_dim: dimension of the L2-normalised output (the teacher's).
    bn_momentum: the batch's weight in the running statistics (PyTorch's
      convention; SLidR's recipe uses 0.05).
    normalize: L2-normalise the output (distillation); off for a plain backbone.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  """

  variant: str = "34c"
  out_dim: int = 512
  bn_momentum: float = 0.1
  normalize: bool = True
  dtype: Any = jnp.float32

  def num_stages(self) -> int:
    """The stages the model reads, so the pipeline packs only those."""
    return NUM_STAGES

  def sizes(self) -> tuple[int, Sequence[int], Sequence[int]]:
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown MinkUNet variant {self.variant!r}; choose from {list(VARIANTS)}")
    return VARIANTS[self.variant]

  def token_costs(self, in_channels: int = 4) -> list[float]:
    """Multiply-adds of a token of every stage's compact stream, then 0 for every
    stage's attention view (none here): what `packing.fit_budgets` trades."""
    return [float(c) for c in stage_macs(self.variant, in_channels, self.out_dim)] + [0.0] * 5

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encodes a packed batch.

    Returns:
      (features, aux): features (B, T0, out_dim), L2-normalised when
      `normalize`, zero on padding; aux {"backbone": (B, T0, PLANES[7]) the
      last block's output (for fine-tuning heads), "stage{s}": the encoder's
      output at stage s}.
    """
    init_dim, planes, depths = self.sizes()
    missing = [f"s{s}/octant" for s in range(NUM_STAGES - 1) if f"s{s}/octant" not in batch]
    if missing:
      raise ValueError(f"MinkUNet needs {NUM_STAGES} stages; the batch lacks {missing}")
    masks = [batch[f"s{s}/mask"] for s in range(NUM_STAGES)]
    bn = lambda name: MaskedBatchNorm(self.bn_momentum, dtype=self.dtype, name=name)

    def blocks(x, s, i):
      for d in range(depths[i]):
        x = BasicBlock(planes[i], self.bn_momentum, self.dtype, name=f"block{i + 1}_{d}")(
          x, batch[f"s{s}/neighbors"], masks[s]
        )
      return x

    x = batch["features"].astype(self.dtype)
    x = _subm(init_dim, self.dtype, "conv0")(x, batch["s0/neighbors"])
    x = jax.nn.relu(bn("bn0")(x, masks[0]))
    skips, aux = [x], {"stage0": x}
    for s in range(1, NUM_STAGES):
      kernel = _Conv(x.shape[-1], 8, self.dtype, name=f"down{s}")(x)
      x = down_conv(x, batch[f"s{s - 1}/parent"], batch[f"s{s - 1}/octant"], kernel,
                    masks[s].shape[1])  # fmt: skip
      x = blocks(jax.nn.relu(bn(f"down{s}_bn")(x, masks[s])), s, s - 1)
      skips.append(x)
      aux[f"stage{s}"] = x
    for i, s in enumerate(reversed(range(NUM_STAGES - 1)), start=4):
      kernel = _Conv(planes[i], 8, self.dtype, name=f"up{s}")(x)
      x = up_conv(x, batch[f"s{s}/parent"], batch[f"s{s}/octant"], kernel)
      x = jax.nn.relu(bn(f"up{s}_bn")(x, masks[s]))
      x = blocks(jnp.concatenate([x, skips[s]], axis=-1), s, i)
    aux["backbone"] = x
    kernel = _Conv(self.out_dim, 1, self.dtype, name="final")(x)[0]
    bias = self.param("final_bias", nn.initializers.zeros, (self.out_dim,), jnp.float32)
    y = (x @ kernel).astype(jnp.float32) + bias
    if self.normalize:
      return layers.l2_normalize(y, masks[0]), aux
    return jnp.where(masks[0][..., None], y, 0), aux


def from_config(model_config, dtype) -> Model:
  """The model of a config's `model` block."""
  return Model(
    variant=model_config.variant,
    out_dim=model_config.out_dim,
    bn_momentum=model_config.get("bn_momentum", 0.1),
    dtype=dtype,
  )


def stage_macs(variant: str, in_channels: int, out_dim: int, per_child: bool = False) -> list[int]:
  """Multiply-adds per voxel of every stage: what the program executes (a stride-2 or
  transposed convolution as 8 cin cout for every parent, at the coarse stage) or, with
  `per_child`, what the network needs (cin cout for every child, at the fine stage).
  Submanifold convolutions count their 27 taps."""
  init_dim, planes, depths = VARIANTS[variant]

  def block_macs(cin, width, depth):
    total = 0
    for _ in range(depth):
      total += 27 * cin * width + 27 * width * width + (cin * width if cin != width else 0)
      cin = width
    return total

  def strided(fine, cin, cout):  # a stride-2 or transposed convolution between fine and fine+1
    macs[fine if per_child else fine + 1] += (1 if per_child else 8) * cin * cout

  macs = [27 * in_channels * init_dim] + [0] * (NUM_STAGES - 1)
  width = init_dim
  for s in range(1, NUM_STAGES):
    strided(s - 1, width, width)
    macs[s] += block_macs(width, planes[s - 1], depths[s - 1])
    width = planes[s - 1]
  for i, s in enumerate(reversed(range(NUM_STAGES - 1)), start=4):
    strided(s, width, planes[i])
    skip = init_dim if s == 0 else planes[s - 1]
    macs[s] += block_macs(planes[i] + skip, planes[i], depths[i])
    width = planes[i]
  macs[0] += width * out_dim
  return macs


def example_batch(in_channels: int, tokens: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a one-pack batch (for `jax.eval_shape`)."""
  shape = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct((1, *s), dtype)
  batch = {"features": shape(tokens, in_channels, dtype=jnp.float32)}
  for s in range(NUM_STAGES):
    batch |= {f"s{s}/mask": shape(tokens, dtype=jnp.bool_), f"s{s}/neighbors": shape(tokens, 27)}
    if s < NUM_STAGES - 1:
      batch |= {f"s{s}/parent": shape(tokens), f"s{s}/octant": shape(tokens, dtype=jnp.uint8)}
  return batch


def param_count(variant: str, in_channels: int = 4, out_dim: int = 512) -> int:
  """Trainable parameters of a variant (not the BatchNorm statistics), from shapes only."""
  model = Model(variant=variant, out_dim=out_dim)
  shapes = jax.eval_shape(model.init, jax.random.key(0), example_batch(in_channels))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m reldistill_jax.models.minkunet",
    description="Prints '<variant> <trainable parameters>' for every MinkUNet variant, from "
    "shapes only (no BatchNorm statistics). Reads and writes no file.",
  )
  parser.add_argument("--in_channels", type=int, default=4, help="input channels per voxel")
  parser.add_argument("--out_dim", type=int, default=512, help="output dimension")
  args = parser.parse_args(argv)
  if args.in_channels < 1 or args.out_dim < 1:
    parser.error("--in_channels and --out_dim must be positive")
  for name in VARIANTS:
    print(f"{name} {param_count(name, args.in_channels, args.out_dim)}")


if __name__ == "__main__":
  main()
