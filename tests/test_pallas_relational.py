"""The Pallas relational kernels equal the blocked scan and the naive loss.

The kernels run in Pallas interpret mode on the CPU; a separate test lowers
them for CUDA (Triton) and TPU (Mosaic) ahead of time, which checks their
block shapes and operations against both lowerings without the hardware.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_pairs as _data
from jax import export
from jax.experimental.pallas import tpu as pltpu

from reldistill_jax import losses
from reldistill_jax import pallas_relational as pr
from reldistill_jax import sharded_losses as sl

INTERPRET = ["interpret_gpu", "interpret_tpu"]
KERNELS = {
  "interpret_gpu": functools.partial(pr.relational_block_gpu, interpret=True),
  "interpret_tpu": functools.partial(pr.relational_block_tpu, interpret=True),
  # The TPU interpreter models the TPU's memory spaces (SMEM scalars, VMEM
  # blocks) and grid order more faithfully than the generic one.
  "tpu_interpreter": functools.partial(pr.relational_block_tpu, interpret=pltpu.InterpretParams()),
}


def _block_args(k, q, m, rows, coef):
  return k[rows], q[rows], m[rows], k, q, m, rows.start, coef


@pytest.mark.parametrize("implementation", sorted(KERNELS))
@pytest.mark.parametrize("squared", [False, True], ids=["l1", "squared"])
def test_kernel_has_the_contract_of_the_scan(implementation, squared):
  """One row block with an offset; R, N and D fit none of the kernel's tiles."""
  k, q, m = _data(200, 100, seed=1)
  k, q = losses.normalize(k), losses.normalize(q)
  coef = (jnp.float32(0.3), jnp.float32(0.01), jnp.float32(0.02))
  rows = slice(40, 90)  # 50 rows starting at pair 40
  ref = sl._relational_block_scan(*_block_args(k, q, m, rows, coef), 10, 8, squared=squared)
  tiles = (16, 32) if implementation.endswith("gpu") else (16, 128)
  block = functools.partial(KERNELS[implementation], squared=squared)
  kernel = jax.jit(lambda k, q: block(*_block_args(k, q, m, rows, coef), *tiles))
  out = kernel(k, q)
  for part, (value, expected) in enumerate(zip(out[:3], ref[:3], strict=True)):
    np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=str(part))
  assert out[3].shape == (50, 100) and out[3].dtype == jnp.float32
  np.testing.assert_allclose(out[3], ref[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("implementation", INTERPRET)
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh"])
def test_relational_loss_equals_naive_and_scan(mesh, implementation, sharded):
  """Values and gradients, with masks, N = 200 (no multiple of any tile)."""
  mesh = mesh if sharded else None
  k, q, m = _data(200, 128, seed=3)
  loss = lambda k, impl: sl.relational_loss(k, q, m, 0.6, 1.7, mesh=mesh, implementation=impl)
  naive = losses.relational_loss(k, q, m, 0.6, 1.7)
  scan = loss(k, "xla")
  out = jax.jit(lambda k: loss(k, implementation))(k)
  for part in naive:
    np.testing.assert_allclose(out[part], naive[part], rtol=1e-5, err_msg=part)
    np.testing.assert_allclose(out[part], scan[part], rtol=1e-5, err_msg=part)
  g_naive = jax.grad(lambda k: losses.relational_loss(k, q, m, 0.6, 1.7)["loss"])(k)
  g_scan = jax.grad(lambda k: loss(k, "xla")["loss"])(k)
  g_out = jax.jit(jax.grad(lambda k: loss(k, implementation)["loss"]))(k)
  assert g_out.shape == k.shape and g_out.dtype == k.dtype
  assert not np.any(np.asarray(g_out)[~np.asarray(m)]), "masked pairs get no gradient"
  np.testing.assert_allclose(g_out, g_naive, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(g_out, g_scan, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("implementation", INTERPRET)
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("distance", ["l1", "squared"])
def test_relational_options_equal_the_scan(implementation, diagonal, distance):
  """Both ablations in the kernels: values and gradients equal the XLA scan's, N = 50."""
  k, q, m = _data(50, 24, seed=8)
  options = (0.6, 1.7, diagonal, distance)
  loss = lambda k, impl: sl.relational_loss(k, q, m, *options, mesh=None, implementation=impl)
  scan = loss(k, "xla")
  out = jax.jit(lambda k: loss(k, implementation))(k)
  for part in scan:
    np.testing.assert_allclose(out[part], scan[part], rtol=1e-5, err_msg=part)
  g_scan = jax.grad(lambda k: loss(k, "xla")["loss"])(k)
  g_out = jax.jit(jax.grad(lambda k: loss(k, implementation)["loss"]))(k)
  assert not np.any(np.asarray(g_out)[~np.asarray(m)]), "masked pairs get no gradient"
  np.testing.assert_allclose(g_out, g_scan, rtol=1e-5, atol=1e-9)
  if (diagonal, distance) != (True, "l1"):  # the options reach the kernel
    default = lambda k: sl.relational_loss(k, q, m, 0.6, 1.7, mesh=None, implementation="xla")
    value, grad = jax.value_and_grad(lambda k: default(k)["loss"])(k)
    assert not np.isclose(out["loss"], value, rtol=1e-2)
    assert np.abs(g_out - grad).max() > 1e-2 * np.abs(grad).max()


@pytest.mark.parametrize("implementation", INTERPRET)
@pytest.mark.parametrize("distance", ["l1", "squared"])
def test_bf16_is_close(mesh, implementation, distance):
  """bf16 inputs; with "squared" the 2 d factors stay float32 in the gradient products."""
  k, q, m = _data(256, 128, seed=4)
  ref = losses.relational_loss(k, q, m, distance=distance)
  g_ref = jax.grad(lambda k: losses.relational_loss(k, q, m, distance=distance)["loss"])(k)
  loss = lambda k: sl.relational_loss(
    k, q.astype(jnp.bfloat16), m, distance=distance, mesh=mesh, implementation=implementation
  )["loss"]
  value, grad = jax.jit(jax.value_and_grad(loss))(k.astype(jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, ref["loss"], rtol=2e-2)
  cosine = jnp.vdot(grad.astype(jnp.float32), g_ref) / (
    jnp.linalg.norm(grad.astype(jnp.float32)) * jnp.linalg.norm(g_ref)
  )
  assert cosine > 0.99, cosine


@pytest.mark.parametrize("implementation", INTERPRET)
def test_fully_masked_and_single_pair_are_finite(implementation):
  k, q, _ = _data(24, 16)
  masks = jnp.stack([jnp.zeros(24, bool), jnp.arange(24) == 5])
  loss = lambda k, mask: sl.relational_loss(k, q, mask, mesh=None, implementation=implementation)[
    "loss"
  ]
  values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss), (None, 0)))(k, masks)
  assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
  # Without off-diagonal pairs only the single pair's diagonal term is left.
  np.testing.assert_allclose(values, [0.0, losses.relational_loss(k, q, masks[1])["loss"]])


def test_auto_selection():
  fake_mesh = lambda platform: types.SimpleNamespace(
    devices=np.array([types.SimpleNamespace(platform=platform)])
  )
  assert sl.resolve_implementation("auto", fake_mesh("gpu")) == "pallas_gpu"
  assert sl.resolve_implementation("auto", fake_mesh("tpu")) == "pallas_tpu"
  assert sl.resolve_implementation("auto", fake_mesh("cpu")) == "xla"
  assert sl.resolve_implementation("auto", None) == "xla"  # this CPU-only test run
  assert sl.resolve_implementation("interpret_tpu", fake_mesh("gpu")) == "interpret_tpu"
  with pytest.raises(ValueError, match="unknown implementation"):
    sl.resolve_implementation("triton")


def test_tiles_shrink_and_are_checked():
  assert pr.gpu_tiles(25, 200) == (32, 64)
  assert pr.gpu_tiles(5000, 40000, (128, 64)) == (128, 64)
  assert pr.tpu_tiles(25, 200) == (32, 256)
  assert pr.tpu_tiles(5000, 40000) == pr.TPU_TILES
  with pytest.raises(ValueError, match="powers of two"):
    pr.gpu_tiles(100, 100, (48, 64))
  with pytest.raises(ValueError, match="multiples of"):
    pr.tpu_tiles(100, 100, (128, 64))


@pytest.mark.parametrize(
  "platform, kernel, target",
  [
    ("cuda", pr.relational_block_gpu, "__gpu$xla.gpu.triton"),
    ("tpu", pr.relational_block_tpu, "tpu_custom_call"),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("squared", [False, True], ids=["l1", "squared"])
def test_kernels_lower_for_their_hardware(platform, kernel, target, dtype, squared):
  """Ahead-of-time lowering through Triton / Mosaic: shapes and ops are supported."""
  r, n, d = 256, 1024, 384

  def block(k_rows, q_rows, m_rows, k, q, m, offset, coef):
    return kernel(k_rows, q_rows, m_rows, k, q, m, offset, tuple(coef), squared=squared)

  spec = jax.ShapeDtypeStruct
  args = (
    spec((r, d), dtype),
    spec((r, d), dtype),
    spec((r,), bool),
    spec((n, d), dtype),
    spec((n, d), dtype),
    spec((n,), bool),
    spec((), jnp.int32),
    spec((3,), jnp.float32),
  )
  exported = export.export(
    jax.jit(block),
    platforms=[platform],
    disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
  )(*args)
  assert target in exported.mlir_module()
  assert [o.shape for o in exported.out_avals] == [(), (), (), (r, d)]
