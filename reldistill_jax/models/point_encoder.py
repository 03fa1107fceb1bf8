"""The 3D student: a serialised patch-attention U-Net on packed batches.

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
  * Attn projects the tokens to queries, keys and values, gathers them by the
    block's curve order into the pack's aligned view (`packing.py`: every
    scan starts on a patch boundary, so its patches of K are those it has
    alone), runs multi-head attention on the (patches, K) groups with
    `jax.nn.dot_product_attention`, and scatters back by the inverse. Curves
    alternate between blocks so information crosses patch borders. The valid
    keys of a patch are a prefix: the mask is `key_value_seq_lengths`, the
    form the cuDNN flash kernel accepts.

Stages are joined by grid pooling (linear, segment max over the children of
each parent voxel, LayerNorm, GELU) and unpooling with skips (U-Net). A
projection head maps to the teacher's dimension; outputs are L2-normalised.
LayerNorm is used throughout: it has no batch statistics, so padding never
leaks into valid voxels and a frozen encoder is frozen entirely.

The output of a voxel depends only on its own scan: not on the padding of its
pack, nor on the other scans in it, nor on its place among them.

Batch keys read by `Model.__call__` (B packs leading, T_s the stage-s token
budget, A_s its aligned attention view; `input_pipeline.py`): `features`
(B, T0, F), and per stage s `s{s}/mask` (B, T_s), `s{s}/order` (B, R, A_s),
`s{s}/inverse` (B, R, T_s), `s{s}/lengths` (B, A_s / K), `s{s}/neighbors`
(B, T_s, 27), `s{s}/parent` (B, T_s) for s < stages - 1.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reldistill_jax.models import layers

# name -> (encoder channels, encoder depths, decoder channels, decoder depths).
VARIANTS = {
  "tiny": ((16, 32), (1, 1), (16,), (1,)),
  # The tiny student 4x as wide (a 64-channel decoder): the loss study's capacity check.
  "tiny_wide": ((64, 128), (1, 1), (64,), (1,)),
  "small": ((32, 64, 128, 256), (1, 1, 2, 2), (64, 64, 128), (1, 1, 1)),
  "base": ((32, 64, 128, 256, 512), (2, 2, 2, 2, 2), (64, 96, 128, 256), (2, 2, 2, 2)),
}


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[b, index[b]] for every batch row: (B, C, ...) x (B, ...) -> (B, ..., ...)."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, index)


def _with_zero_row(x: jax.Array) -> jax.Array:
  """Appends a zero token so the SENTINEL index (= the token budget) gathers zeros."""
  return jnp.pad(x, ((0, 0), (0, 1), (0, 0)))


class PatchAttention(nn.Module):
  """Multi-head attention inside serialised patches of K voxels of one scan."""

  channels: int
  heads: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, order: jax.Array, inverse: jax.Array, lengths: jax.Array
  ) -> jax.Array:
    # x: (B, T, ch) compact tokens; order: (B, A) token of each slot of the aligned view
    # (T for a gap); inverse: (B, T) view slot of each token; lengths: (B, A // K).
    b, _, ch = x.shape
    k = self.patch_size
    p = order.shape[1] // k
    head_dim = ch // self.heads
    # The projections run on the compact tokens; only the products see the aligned view.
    qkv = nn.Dense(3 * ch, dtype=self.dtype, name="qkv")(x)
    rows = _with_zero_row(qkv).reshape(-1, 3, self.heads, head_dim)  # (B * (T + 1), ...)
    tokens = qkv.shape[1] + 1
    view = (order + jnp.arange(b)[:, None] * tokens).reshape(b * p, k)  # rows of every patch
    out = _attention(rows, view, lengths.reshape(b * p), _attention_implementation(self.dtype))
    out = _gather_rows(out.reshape(b, p * k, ch), inverse)  # (B, T, ch)
    return nn.Dense(ch, dtype=self.dtype, name="proj")(out)


# Bytes of (K, K) scores per chunk of patches that XLA's attention holds at once.
ATTENTION_CHUNK_BYTES = 2**28


def _attention(
  rows: jax.Array, view: jax.Array, lengths: jax.Array, implementation: str | None
) -> jax.Array:
  """Attention inside patches whose tokens are gathered from `rows`.

  Args:
    rows: (R, 3, heads, head_dim) q, k, v of every token (and zero rows).
    view: (N, K) the row of every token of every patch.
    lengths: (N,) valid keys of every patch (a prefix).
    implementation: `jax.nn.dot_product_attention`'s.

  Returns:
    (N, K, heads, head_dim).

  cuDNN's flash kernel keeps no (K, K) scores and runs on all N patches at
  once. XLA's attention (the CPU's and the TPU's, and any float32 one)
  materialises the (N, heads, K, K) scores and would keep them, and the gathered
  q, k, v, for the backward pass, which then dominate the step's memory: it
  runs over chunks of patches in a loop whose body gathers its own q, k, v and
  is rematerialised, so one chunk's scores (about `ATTENTION_CHUNK_BYTES`) are
  alive at a time, at the cost of one more attention forward in the backward
  pass.
  """

  def attend(view, lengths):
    qkv = rows[view]  # (n, K, 3, heads, head_dim)
    return jax.nn.dot_product_attention(
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_value_seq_lengths=lengths,
      implementation=implementation,
    )  # fmt: skip

  if implementation == "cudnn":
    return attend(view, lengths)
  n, k = view.shape
  heads = rows.shape[2]
  chunk = int(max(1, min(n, ATTENTION_CHUNK_BYTES // (heads * k * k * 16))))  # patches
  pad = -n % chunk  # fully masked patches (length 0): zero outputs, no NaN
  view = jnp.pad(view, ((0, pad), (0, 0))).reshape(-1, chunk, k)
  lengths = jnp.pad(lengths, (0, pad)).reshape(-1, chunk)
  out = jax.lax.map(jax.checkpoint(lambda args: attend(*args)), (view, lengths))
  return out.reshape(-1, *out.shape[2:])[:n]


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
  def __call__(self, x, neighbors, order, inverse, lengths):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    norm = lambda name: layers.LayerNorm(dtype=self.dtype, name=name)
    cpe = layers.SparseConv3d(self.channels, dtype=self.dtype, name="cpe_conv")(x, neighbors)
    x = x + norm("cpe_norm")(dense(self.channels, "cpe_linear")(cpe))
    x = x + PatchAttention(self.channels, self.heads, self.patch_size, self.dtype, name="attn")(
      norm("norm1")(x), order, inverse, lengths
    )
    h = dense(self.channels * self.mlp_ratio, "mlp_in")(norm("norm2")(x))
    return x + dense(self.channels, "mlp_out")(layers.gelu(h))


def _pool(x: jax.Array, parent: jax.Array, tokens: int) -> jax.Array:
  """Segment max of children into parents: (B, T_s, ch) -> (B, tokens, ch)."""
  b = x.shape[0]
  # Each pack gets tokens + 1 segments; the last one takes the SENTINEL
  # (padding) and is dropped.
  segments = parent + jnp.arange(b)[:, None] * (tokens + 1)
  pooled = jax.ops.segment_max(
    x.reshape(-1, x.shape[-1]), segments.reshape(-1), num_segments=b * (tokens + 1)
  )
  return pooled.reshape(b, tokens + 1, -1)[:, :tokens]


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

  def num_stages(self) -> int:
    """The encoder stages, so the pipeline packs only the stages the model reads."""
    return len(self._sizes()[0])

  def token_costs(self) -> list[float]:
    """Relative matmul FLOPs of a token of every stage's compact stream (the blocks'
    layers, 80 c^2 for CPE, qkv, projections and MLP), then of a slot of its aligned
    attention view (4 K c): what `packing.fit_budgets` trades padding against."""
    encoder, decoder = self._sizes()
    layers, attention = [], []
    for s, stage in enumerate(encoder):
      blocks = [(stage.channels, stage.depth)] + (
        [(decoder[s].channels, decoder[s].depth)] if s < len(decoder) else []
      )
      layers.append(sum(80.0 * c * c * d for c, d in blocks))
      attention.append(sum(4.0 * self.patch_size * c * d for c, d in blocks))
    return layers + attention

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
      (features, aux): features (B, T0, out_dim) L2-normalised, zero on
      padding; aux {"backbone": (B, T0, dec_channels[0]) decoder output before
      the head (for fine-tuning heads), "stage{s}": encoder output of stage s}.
    """
    encoder, decoder = self._sizes()
    num_stages = len(encoder)
    missing = [f"s{s}/order" for s in range(num_stages) if f"s{s}/order" not in batch]
    if missing:
      raise ValueError(f"the model has {num_stages} stages; the batch lacks {missing}")
    masks = [batch[f"s{s}/mask"] for s in range(num_stages)]
    norm = lambda name: layers.LayerNorm(dtype=self.dtype, name=name)
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
          batch[f"s{s}/lengths"],
        )
      return jnp.where(masks[s][..., None], x, 0)

    x = batch["features"].astype(self.dtype)
    x = layers.SparseConv3d(encoder[0].channels, dtype=self.dtype, name="stem")(
      x, batch["s0/neighbors"]
    )
    x = layers.gelu(norm("stem_norm")(x))
    aux = {}
    skips = []
    for s, stage in enumerate(encoder):
      if s > 0:
        x = nn.Dense(stage.channels, dtype=self.dtype, name=f"pool{s}_proj")(x)
        # Padded parents have no child: their segment max is -inf, zeroed here.
        x = jnp.where(
          masks[s][..., None], _pool(x, batch[f"s{s - 1}/parent"], masks[s].shape[1]), 0
        )
        x = layers.gelu(norm(f"pool{s}_norm")(x))
      x = run_blocks(x, s, stage, f"enc{s}")
      skips.append(x)
      aux[f"stage{s}"] = x
    for s in reversed(range(num_stages - 1)):
      stage = decoder[s]
      up = _gather_rows(_with_zero_row(x), batch[f"s{s}/parent"])  # parent features per child
      x = nn.Dense(stage.channels, dtype=self.dtype, name=f"unpool{s}_proj")(up)
      x = x + nn.Dense(stage.channels, dtype=self.dtype, name=f"unpool{s}_skip")(skips[s])
      x = layers.gelu(norm(f"unpool{s}_norm")(x))
      x = run_blocks(x, s, stage, f"dec{s}")
    aux["backbone"] = x
    y = nn.Dense(self.out_dim, dtype=self.dtype, name="head")(norm("head_norm")(x))
    return layers.l2_normalize(y, masks[0]), aux


def from_config(model_config, dtype) -> Model:
  """The model of a config's `model` block."""
  return Model(
    variant=model_config.variant,
    out_dim=model_config.out_dim,
    patch_size=model_config.patch_size,
    num_curves=model_config.num_curves,
    dtype=dtype,
  )


def param_shapes(variant: str, out_dim: int = 512):
  """The parameter tree of a named variant as shapes (no allocation)."""
  model = Model(variant=variant, out_dim=out_dim, patch_size=8)
  stages = len(VARIANTS[variant][0])
  batch = {"features": jax.ShapeDtypeStruct((1, 8, 4), jnp.float32)}
  for s in range(stages):
    batch |= {
      f"s{s}/mask": jax.ShapeDtypeStruct((1, 8), jnp.bool_),
      f"s{s}/lengths": jax.ShapeDtypeStruct((1, 1), jnp.int32),
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
    print(f"{name:9s} {param_count(name) / 1e6:6.2f}M parameters (out_dim 512, 4 input channels)")
