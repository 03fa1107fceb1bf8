"""ScaLR's fine-tuning recipe for WaffleIron: its head and its layer-wise learning rates.

valeoai/ScaLR (`finetune.py`, `configs/downstream/*/WI_768_finetune_*.yaml`), restated:
  * the head is new at every fine-tuning and linear probe: BatchNorm over the
    backbone's channels, then a linear layer whose weight and bias start at
    zero, so the first step starts from uniform class scores;
  * AdamW over every parameter, weight decay on the parameters of two or more
    dimensions only, a linear warm-up then a cosine decay to 0;
  * layer-wise learning-rate decay: with L layers, the embedding's rate is
    lr * decay^(L + 1), layer i's (its SpatialMix and ChannelMix) lr *
    decay^(L - i), and the head's (and anything else's) lr. ScaLR uses a decay
    of 0.95 on 1% of the labels and 0.99 on 100%, lr 2e-3, no weight decay,
    warm-up 4 epochs of 45 (1%) or 2 of 25 (100%).

Our WaffleIron stacks its layers `planes` at a time (`nn.scan`), so a stacked
parameter of group g and plane j (`layers/spatial_mix_j`, leading axis g) is
layer g * planes + j: its scale is an array along that axis.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from reldistill_jax.models.minkunet import MaskedBatchNorm

_MIX = re.compile(r"(spatial|channel)_mix_(\d+)")


class BatchNormZeroHead(nn.Module):
  """BatchNorm over the valid tokens, then a zero-initialised linear layer (float32)."""

  num_classes: int
  takes_mask = True  # `finetune.logits_fn` passes (backbone, mask)

  @nn.compact
  def __call__(self, inputs) -> jax.Array:
    x, mask = inputs
    x = MaskedBatchNorm(momentum=0.1, name="norm")(x.astype(jnp.float32), mask)
    dense = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="linear")
    return dense(x)


def _layer(path: tuple, depth: int, planes: int, shape: tuple) -> jax.Array | float:
  """The layer index of one encoder parameter: 0 the embedding, 1..L the layers (an array
  along the stacked axis), L + 1 anything else."""
  names = [str(getattr(k, "key", k)) for k in path]
  if "embed" in names:
    return 0.0
  mix = next((m for n in names if (m := _MIX.fullmatch(n))), None)
  if "layers" in names and mix is not None:
    groups = shape[0]
    layer = jnp.arange(groups) * planes + int(mix[2]) + 1
    return layer.reshape((groups,) + (1,) * (len(shape) - 1)).astype(jnp.float32)
  return float(depth + 1)


def layer_scales(params: dict, depth: int, planes: int, decay: float) -> dict:
  """The learning-rate factor of every trainable leaf of {"encoder", "head"}: decay^(L + 1 -
  layer) for the encoder's (module docstring), 1 for the head's."""

  def scale(path, leaf):
    if str(getattr(path[0], "key", path[0])) != "encoder":
      return jnp.ones((), jnp.float32)
    layer = _layer(path, depth, planes, leaf.shape)
    return jnp.asarray(decay, jnp.float32) ** (depth + 1 - jnp.asarray(layer))

  return jax.tree_util.tree_map_with_path(scale, params)


def _scale_by_layer(depth: int, planes: int, decay: float) -> optax.GradientTransformation:
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, depth, planes, decay)
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(init, update)


def _decayed(params) -> dict:
  """Weight decay on the leaves of two or more dimensions (ScaLR's `p.ndim == 1` rule; a
  stacked layer's leaves have one more axis)."""

  def rule(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    stacked = "layers" in names
    return leaf.ndim - stacked >= 2

  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(opt, num_steps: int, warmup_steps: int, depth: int, planes: int):
  """AdamW with layer-wise learning-rate decay over {"encoder", "head"} (module docstring);
  `finetune.make_optimizer` freezes the encoder of a linear probe and clips.

  Args:
    opt: `config.optimizer` (`lr`, `weight_decay`, `layer_decay`).
    num_steps, warmup_steps: the schedule's length and warm-up.
    depth, planes: the WaffleIron's L and its planes (the stacking of its layers).

  Returns:
    (tx, the head's schedule).
  """
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, opt.lr, min(warmup_steps, max(num_steps - 1, 1)), max(num_steps, 2)
  )
  tx = optax.chain(
    optax.scale_by_adam(),
    optax.add_decayed_weights(opt.weight_decay, mask=_decayed),
    _scale_by_layer(depth, planes, opt.layer_decay),
    optax.scale_by_learning_rate(schedule),
  )
  return tx, schedule
