"""The 3D student: a serialised patch-attention U-Net on fixed-shape buckets.

In the spirit of Point Transformer V3, written for static shapes: everything
that depends on geometry (curve orders, inverses, pooling parents, 3x3x3
neighbour maps) comes precomputed in the bucket (`serialization.py`), so the
model is gathers, attention and segment reductions.

Per block: x += CPE(x); x += Attn(LN(x)); x += MLP(LN(x)), where
  * CPE is a sparse 3x3x3 convolution over the precomputed neighbour map
    (gather (C, 27, ch), then one contraction with a (27, ch, ch) kernel),
    followed by a linear layer and LayerNorm, as PTv3's sparse-conv CPE. It is
    the only layer that sees relative geometry: attention has no positional
    bias, so the positional stage must be a real local operator; a sparse
    convolution over true grid neighbours is exact, cheap to gather and has no
    dependence on which curve cut the patches;
  * Attn gathers the voxels by the block's curve order, cuts them into
    (patches, K) groups, runs masked multi-head attention with
    `jax.nn.dot_product_attention`, and scatters back by the inverse. Curves
    alternate between blocks so information crosses patch borders. Padding
    sorts last in every order, so the valid keys of a patch are a prefix: the
    mask is `key_value_seq_lengths`, the form the cuDNN flash kernel accepts.

Stages are joined by grid pooling (linear, segment max over the children of
each parent voxel, LayerNorm, GELU) and unpooling with skips (U-Net). A
projection head maps to the teacher's dimension; outputs are L2-normalised.
LayerNorm is used throughout: it has no batch statistics, so padding never
leaks into valid voxels and a frozen encoder is frozen entirely.

The output of a valid voxel does not depend on how much padding its bucket has.

Batch keys read by `Model.__call__` (B leading, names of `serialization.py`):
`features` (B, C0, F), and per stage s `s{s}/mask` (B, Cs), `s{s}/order` and
`s{s}/inverse` (B, R, Cs), `s{s}/neighbors` (B, Cs, 27), `s{s}/parent`
(B, Cs) for s < stages - 1.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (encoder channels, encoder depths, decoder channels, decoder depths).
VARIANTS = {
  "tiny": ((16, 32), (1, 1), (16,), (1,)),
  "small": ((32, 64, 128, 256), (1, 1, 2, 2), (64, 64, 128), (1, 1, 1)),
  "base": ((32, 64, 128, 256, 512), (2, 2, 2, 2, 2), (64, 96, 128, 256), (2, 2, 2, 2)),
}


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[b, index[b]] for every batch row: (B, C, ...) x (B, ...) -> (B, ..., ...)."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, index)


def _with_zero_row(x: jax.Array) -> jax.Array:
  """Appends a zero slot so the SENTINEL index (= capacity) gathers zeros."""
  return jnp.pad(x, ((0, 0), (0, 1), (0, 0)))


class SparseConv3d(nn.Module):
  """3x3x3 submanifold convolution over a precomputed neighbour map."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, neighbors: jax.Array) -> jax.Array:
    # x: (B, C, cin); neighbors: (B, C, 27) slots, C for absent neighbours.
    kernel = self.param(
      "kernel",
      nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1)),
      (27, x.shape[-1], self.features),
      jnp.float32,
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    patches = _gather_rows(_with_zero_row(x.astype(self.dtype)), neighbors)  # (B, C, 27, cin)
    y = jnp.einsum("bnkc,kcd->bnd", patches, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class PatchAttention(nn.Module):
  """Multi-head attention inside serialised patches of K voxels."""

  channels: int
  heads: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, order: jax.Array, inverse: jax.Array, num_valid: jax.Array
  ) -> jax.Array:
    # x: (B, C, ch); order, inverse: (B, C); num_valid: (B,).
    b, c, ch = x.shape
    k = self.patch_size
    p = c // k
    head_dim = ch // self.heads
    xs = _gather_rows(x, order)  # (B, C, ch), valid voxels first
    qkv = nn.Dense(3 * ch, dtype=self.dtype, name="qkv")(xs)
    qkv = qkv.reshape(b * p, k, 3, self.heads, head_dim)
    # Valid keys of patch i are its first clip(V - i K, 0, K) slots.
    lengths = jnp.clip(num_valid[:, None] - jnp.arange(p)[None, :] * k, 0, k).astype(jnp.int32)
    out = jax.nn.dot_product_attention(
      qkv[:, :, 0],
      qkv[:, :, 1],
      qkv[:, :, 2],
      key_value_seq_lengths=lengths.reshape(b * p),
      implementation=_attention_implementation(self.dtype),
    )  # (B * P, K, heads, head_dim)
    out = nn.Dense(ch, dtype=self.dtype, name="proj")(out.reshape(b, c, ch))
    return _gather_rows(out, inverse)


def _attention_implementation(dtype) -> str | None:
  """cuDNN flash attention on GPU in half precision; XLA's otherwise."""
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return None


class Block(nn.Module):
  """CPE, patch attention and MLP, each residual."""

  channels: int
  heads: int
  patch_size: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, neighbors, order, inverse, num_valid):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    cpe = SparseConv3d(self.channels, dtype=self.dtype, name="cpe_conv")(x, neighbors)
    x = x + norm("cpe_norm")(dense(self.channels, "cpe_linear")(cpe))
    x = x + PatchAttention(self.channels, self.heads, self.patch_size, self.dtype, name="attn")(
      norm("norm1")(x), order, inverse, num_valid
    )
    h = dense(self.channels * self.mlp_ratio, "mlp_in")(norm("norm2")(x))
    return x + dense(self.channels, "mlp_out")(nn.gelu(h))


def _pool(x: jax.Array, parent: jax.Array, capacity: int) -> jax.Array:
  """Segment max of children into parents: (B, Cs, ch) -> (B, capacity, ch)."""
  b = x.shape[0]
  # Each batch row gets capacity + 1 segments; the last one takes the
  # SENTINEL (padded children) and is dropped.
  segments = parent + jnp.arange(b)[:, None] * (capacity + 1)
  pooled = jax.ops.segment_max(
    x.reshape(-1, x.shape[-1]), segments.reshape(-1), num_segments=b * (capacity + 1)
  )
  return pooled.reshape(b, capacity + 1, -1)[:, :capacity]


@dataclasses.dataclass(frozen=True)
class _Stage:
  channels: int
  depth: int


class Model(nn.Module):
  """The serialised patch-attention encoder.

  Attributes:
    variant: `tiny`, `small` or `base` (MinkUNet34-like in size); None to
      give the sizes explicitly.
    out_dim: dimension of the projected, L2-normalised output (the teacher's).
    patch_size: K, voxels per attention patch; must match the buckets'.
    num_curves: R, the number of serialisation orders in the buckets.
    head_dim: channels per attention head (heads = channels // head_dim).
    enc_channels, enc_depths, dec_channels, dec_depths: sizes, used when
      `variant` is None (S encoder stages, S - 1 decoder stages).
    dtype: compute dtype (parameters stay float32), e.g. jnp.bfloat16.
  """

  variant: str | None = "tiny"
  out_dim: int = 512
  patch_size: int = 1024
  num_curves: int = 4
  head_dim: int = 16
  enc_channels: Sequence[int] = ()
  enc_depths: Sequence[int] = ()
  dec_channels: Sequence[int] = ()
  dec_depths: Sequence[int] = ()
  dtype: Any = jnp.float32

  def _sizes(self) -> tuple[list[_Stage], list[_Stage]]:
    if self.variant is not None:
      if self.variant not in VARIANTS:
        raise ValueError(f"unknown variant {self.variant!r}; choose from {sorted(VARIANTS)}")
      enc_ch, enc_d, dec_ch, dec_d = VARIANTS[self.variant]
    else:
      enc_ch, enc_d = self.enc_channels, self.enc_depths
      dec_ch, dec_d = self.dec_channels, self.dec_depths
    if not len(enc_ch) == len(enc_d) == len(dec_ch) + 1 == len(dec_d) + 1:
      raise ValueError("encoder sizes need S entries each and decoder sizes S - 1")
    encoder = [_Stage(c, d) for c, d in zip(enc_ch, enc_d, strict=True)]
    decoder = [_Stage(c, d) for c, d in zip(dec_ch, dec_d, strict=True)]
    return encoder, decoder

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encodes a batch of buckets.

    Args:
      batch: the bucket arrays listed in the module docstring.

    Returns:
      (features, aux): features (B, C0, out_dim) L2-normalised, zero on
      padding; aux {"backbone": (B, C0, dec_channels[0]) decoder output before
      the head (for fine-tuning heads), "stage{s}": encoder output of stage s}.
    """
    encoder, decoder = self._sizes()
    num_stages = len(encoder)
    missing = [f"s{s}/order" for s in range(num_stages) if f"s{s}/order" not in batch]
    if missing:
      raise ValueError(f"the model has {num_stages} stages; the batch lacks {missing}")
    masks = [batch[f"s{s}/mask"] for s in range(num_stages)]
    num_valid = [m.sum(-1).astype(jnp.int32) for m in masks]
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    block_index = 0

    def run_blocks(x, s, stage, prefix):
      nonlocal block_index
      for d in range(stage.depth):
        curve = block_index % self.num_curves
        block_index += 1
        heads = max(1, stage.channels // self.head_dim)
        x = Block(
          stage.channels, heads, self.patch_size, dtype=self.dtype, name=f"{prefix}_block{d}"
        )(
          x,
          batch[f"s{s}/neighbors"],
          batch[f"s{s}/order"][:, curve],
          batch[f"s{s}/inverse"][:, curve],
          num_valid[s],
        )
      return jnp.where(masks[s][..., None], x, 0)

    x = batch["features"].astype(self.dtype)
    x = SparseConv3d(encoder[0].channels, dtype=self.dtype, name="stem")(x, batch["s0/neighbors"])
    x = nn.gelu(norm("stem_norm")(x))
    aux = {}
    skips = []
    for s, stage in enumerate(encoder):
      if s > 0:
        x = nn.Dense(stage.channels, dtype=self.dtype, name=f"pool{s}_proj")(x)
        # Padded parents have no child: their segment max is -inf, zeroed here.
        x = jnp.where(
          masks[s][..., None], _pool(x, batch[f"s{s - 1}/parent"], masks[s].shape[1]), 0
        )
        x = nn.gelu(norm(f"pool{s}_norm")(x))
      x = run_blocks(x, s, stage, f"enc{s}")
      skips.append(x)
      aux[f"stage{s}"] = x
    for s in reversed(range(num_stages - 1)):
      stage = decoder[s]
      up = _gather_rows(_with_zero_row(x), batch[f"s{s}/parent"])  # parent features per child
      x = nn.Dense(stage.channels, dtype=self.dtype, name=f"unpool{s}_proj")(up)
      x = x + nn.Dense(stage.channels, dtype=self.dtype, name=f"unpool{s}_skip")(skips[s])
      x = nn.gelu(norm(f"unpool{s}_norm")(x))
      x = run_blocks(x, s, stage, f"dec{s}")
    aux["backbone"] = x
    y = nn.Dense(self.out_dim, dtype=self.dtype, name="head")(norm("head_norm")(x))
    y = y.astype(jnp.float32)
    y = y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, -1, keepdims=True), 1e-12))
    return jnp.where(masks[0][..., None], y, 0), aux


def param_shapes(variant: str, out_dim: int = 512):
  """The parameter tree of a named variant as shapes (no allocation)."""
  model = Model(variant=variant, out_dim=out_dim, patch_size=8)
  stages = len(VARIANTS[variant][0])
  batch = {"features": jax.ShapeDtypeStruct((1, 8, 4), jnp.float32)}
  for s in range(stages):
    batch |= {
      f"s{s}/mask": jax.ShapeDtypeStruct((1, 8), jnp.bool_),
      f"s{s}/order": jax.ShapeDtypeStruct((1, 4, 8), jnp.int32),
      f"s{s}/inverse": jax.ShapeDtypeStruct((1, 4, 8), jnp.int32),
      f"s{s}/neighbors": jax.ShapeDtypeStruct((1, 8, 27), jnp.int32),
      f"s{s}/parent": jax.ShapeDtypeStruct((1, 8), jnp.int32),
    }
  return jax.eval_shape(model.init, jax.random.key(0), batch)


def param_count(variant: str, out_dim: int = 512) -> int:
  """Number of parameters of a named variant (shape-only, no allocation)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(param_shapes(variant, out_dim)))


if __name__ == "__main__":
  import argparse

  argparse.ArgumentParser(
    prog="python -m reldistill_jax.models.point_encoder",
    description="Prints the parameter count of every student variant (out_dim 512, 4 input "
    "channels), computed from shapes only. Reads and writes no file.",
  ).parse_args()
  for name in VARIANTS:
    print(f"{name:6s} {param_count(name) / 1e6:8.2f}M parameters (out_dim 512, 4 input channels)")
