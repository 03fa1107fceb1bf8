"""The memory-lean layers equal the plain ones they replace, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax.models import layers


def _grads(fn, *args):
  """The value and the gradients of sum(fn(*args)^2 / 2) with respect to every argument."""
  return jax.value_and_grad(
    lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2) / 2, range(len(args))
  )(*args)


def test_gelu_equals_jax_gelu_values_and_gradients():
  x = jax.random.normal(jax.random.key(0), (7, 33)) * 3
  ours, theirs = _grads(layers.gelu, x), _grads(jax.nn.gelu, x)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
  np.testing.assert_allclose(ours[1][0], theirs[1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_equals_flax_values_and_gradients(dtype):
  x = (jax.random.normal(jax.random.key(1), (3, 50, 24)) * 2 + 0.5).astype(dtype)
  ours_module = layers.LayerNorm(dtype=dtype)
  flax_module = nn.LayerNorm(dtype=dtype)
  params = flax_module.init(jax.random.key(2), x)
  # Non-trivial scale and bias, under the same names.
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params)
  assert jax.tree.structure(ours_module.init(jax.random.key(2), x)) == jax.tree.structure(params)

  def run(module):
    return _grads(lambda p, x: module.apply(p, x), params, x.astype(jnp.float32))

  ours, theirs = run(ours_module), run(flax_module)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(ours[0], theirs[0], rtol=tol)
  for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(theirs[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _plain_sparse_conv(x, neighbors, kernel):
  """The convolution as a gather and a contraction, differentiated by JAX."""
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
  patches = jax.vmap(lambda xb, nb: xb[nb])(padded, neighbors)  # (B, T, 27, cin)
  return jnp.einsum("bnkc,kcd->bnd", patches, kernel)


def test_sparse_conv_equals_the_plain_gather_values_and_gradients():
  rng = np.random.default_rng(0)
  b, t, cin, cout = 2, 40, 5, 7
  x = jnp.asarray(rng.normal(size=(b, t, cin)), jnp.float32)
  # Neighbours: real tokens, repeated ones, and the sentinel t (absent).
  neighbors = jnp.asarray(rng.integers(0, t + 1, (b, t, 27)), jnp.int32)
  kernel = jnp.asarray(rng.normal(size=(27, cin, cout)), jnp.float32)
  ours = _grads(lambda x, k: layers.sparse_conv(x, neighbors, k), x, kernel)
  theirs = _grads(lambda x, k: _plain_sparse_conv(x, neighbors, k), x, kernel)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
  for a, b_ in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-4)


def test_the_lean_layers_keep_less_for_the_backward_pass():
  """What a layer keeps for its backward pass: its input, not 27 or 3 times it."""
  from jax.ad_checkpoint import print_saved_residuals

  def residual_bytes(fn, *args) -> int:
    import contextlib
    import io
    import re

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      print_saved_residuals(fn, *args)
    total = 0
    for dtype, shape in re.findall(r"^(\w+)\[([\d,]*)\]", out.getvalue(), re.M):
      size = int(np.prod([int(n) for n in shape.split(",") if n])) if shape else 1
      total += size * {"f32": 4, "bf16": 2, "i32": 4}.get(dtype, 4)
    return total

  x = jnp.ones((1, 1000, 16), jnp.float32)
  neighbors = jnp.zeros((1, 1000, 27), jnp.int32)
  kernel = jnp.ones((27, 16, 16), jnp.float32)
  lean = residual_bytes(lambda x, k: layers.sparse_conv(x, neighbors, k).sum(), x, kernel)
  plain = residual_bytes(lambda x, k: _plain_sparse_conv(x, neighbors, k).sum(), x, kernel)
  assert lean <= x.nbytes + neighbors.nbytes + kernel.nbytes < 27 * x.nbytes <= plain
  lean = residual_bytes(lambda x: layers.gelu(x).sum(), x)
  plain = residual_bytes(lambda x: jax.nn.gelu(x).sum(), x)
  assert lean <= x.nbytes < plain
