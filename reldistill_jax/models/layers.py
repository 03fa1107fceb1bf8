"""Layers of the 3D students whose backward pass keeps little memory.

The activations an encoder keeps for its backward pass set how many scans a
step can hold. Three layers keep much more than their input by default, and
here keep only their input (and a scalar or two per token), recomputing the
rest in the backward pass:

  gelu          jax.nn.gelu (tanh form) keeps three tensors of its input's size.
  LayerNorm     flax's keeps three float32 tensors of its input's size; this one
                keeps its input and a mean and inverse deviation per token
                (same parameters, `scale` and `bias`, and the same numbers).
  SparseConv3d  a 3x3x3 submanifold convolution over a precomputed neighbour
                map gathers (T, 27, cin) to contract it with the kernel; keeping
                that gather is 27 times its input. It is gathered again in the
                backward pass.

On the CPU, rematerialising with `jax.checkpoint` does not lower the step's
memory (XLA schedules the recomputation early); a custom VJP decides exactly
what is kept, on every backend. `l2_normalize` is the students' shared output.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------
# GELU.
# ----------------------------------------------------------------------------


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """`jax.nn.gelu` (tanh approximation), keeping only `x` for the backward pass."""
  return jax.nn.gelu(x)


def _gelu_fwd(x):
  return jax.nn.gelu(x), x


def _gelu_bwd(x, g):
  return jax.vjp(jax.nn.gelu, x)[1](g)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def l2_normalize(y: jax.Array, mask: jax.Array) -> jax.Array:
  """A student's output: `y` L2-normalised over its last axis in float32, zero where `mask`
  (B, T) is False."""
  y = y.astype(jnp.float32)
  y = y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, -1, keepdims=True), 1e-12))
  return jnp.where(mask[..., None], y, 0)


# ----------------------------------------------------------------------------
# LayerNorm.
# ----------------------------------------------------------------------------


def _moments(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Mean and inverse standard deviation of the last axis, in float32 (flax's fast variance)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
  return mean, jax.lax.rsqrt(var + epsilon)


@jax.custom_vjp
def layer_norm(x, scale, bias, epsilon: float = 1e-6):
  """(x - mean) * rsqrt(var + epsilon) * scale + bias over the last axis, in float32."""
  mean, rstd = _moments(x, epsilon)
  return (x.astype(jnp.float32) - mean) * rstd * scale + bias


def _layer_norm_fwd(x, scale, bias, epsilon=1e-6):
  mean, rstd = _moments(x, epsilon)
  y = (x.astype(jnp.float32) - mean) * rstd * scale + bias
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(residuals, g):
  x, scale, mean, rstd = residuals
  xhat = (x.astype(jnp.float32) - mean) * rstd  # (..., C)
  g = g.astype(jnp.float32)
  axes = tuple(range(g.ndim - 1))
  dscale = jnp.sum(g * xhat, axis=axes)
  dbias = jnp.sum(g, axis=axes)
  gs = g * scale
  dx = rstd * (
    gs - jnp.mean(gs, axis=-1, keepdims=True) - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)
  )
  return dx.astype(x.dtype), dscale, dbias, None


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """flax's `nn.LayerNorm` (same parameters and numbers) keeping only its input for backward."""

  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    y = layer_norm(x, scale, bias, self.epsilon)
    return y.astype(self.dtype or jnp.result_type(x, jnp.float32))


# ----------------------------------------------------------------------------
# Sparse convolution.
# ----------------------------------------------------------------------------


def _gather(x: jax.Array, neighbors: jax.Array) -> jax.Array:
  """(B, T, cin) x (B, T, 27) -> (B, T, 27, cin); the index T (absent) reads zeros."""
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
  return jax.vmap(lambda xb, nb: xb[nb])(padded, neighbors)


@jax.custom_vjp
def sparse_conv(x: jax.Array, neighbors: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_j x[neighbors[..., j]] @ kernel[j]: (B, T, cin), (B, T, 27), (27, cin, cout)."""
  return jnp.einsum("bnkc,kcd->bnd", _gather(x, neighbors), kernel)


def _sparse_conv_fwd(x, neighbors, kernel):
  return sparse_conv(x, neighbors, kernel), (x, neighbors, kernel)


def _sparse_conv_bwd(residuals, g):
  x, neighbors, kernel = residuals
  g = g.astype(kernel.dtype)
  dkernel = jnp.einsum("bnkc,bnd->kcd", _gather(x, neighbors), g)
  dpatches = jnp.einsum("bnd,kcd->bnkc", g, kernel)  # (B, T, 27, cin)
  b, t, _ = x.shape
  rows = neighbors + (jnp.arange(b) * (t + 1))[:, None, None]  # absent -> each pack's T
  dx = jax.ops.segment_sum(
    dpatches.reshape(-1, x.shape[-1]), rows.reshape(-1), num_segments=b * (t + 1)
  )
  dx = dx.reshape(b, t + 1, -1)[:, :t].astype(x.dtype)
  return dx, None, dkernel.astype(kernel.dtype)


sparse_conv.defvjp(_sparse_conv_fwd, _sparse_conv_bwd)


class SparseConv3d(nn.Module):
  """3x3x3 submanifold convolution over a precomputed neighbour map."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, neighbors: jax.Array) -> jax.Array:
    # x: (B, T, cin); neighbors: (B, T, 27) tokens, T for absent neighbours.
    kernel = self.param(
      "kernel",
      nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1)),
      (27, x.shape[-1], self.features),
      jnp.float32,
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = sparse_conv(x.astype(self.dtype), neighbors, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)
