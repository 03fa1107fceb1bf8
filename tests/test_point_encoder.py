"""The student encoder on buckets of a real nuScenes sweep."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax import serialization
from reldistill_jax.models import point_encoder

PATCH = 64
BUCKET = dict(num_stages=2, patch_size=PATCH, stage_ratio=0.75, voxel_size=0.2)


@pytest.fixture(scope="module")
def scan(realdata) -> np.ndarray:
  path = next((realdata / "mmdetection3d-nuscenes-demo" / "samples" / "LIDAR_TOP").glob("*.bin"))
  points = np.fromfile(path, "<f4").reshape(-1, 5)
  near = np.linalg.norm(points[:, :2], axis=1) < 15
  return points[near][:4000]


def _batch(*buckets) -> dict[str, jax.Array]:
  keys = [k for k in buckets[0] if k == "features" or k[:1] == "s" and "/" in k]
  return {k: jnp.asarray(np.stack([b[k] for b in buckets])) for k in keys}


@pytest.fixture(scope="module")
def model_and_params(scan):
  model = point_encoder.Model(variant="tiny", out_dim=24, patch_size=PATCH)
  batch = _batch(serialization.build_bucket(scan, capacities=(4096,), **BUCKET))
  return model, jax.jit(model.init)(jax.random.key(0), batch)


def test_output_shape_norm_and_padding(model_and_params, scan):
  model, params = model_and_params
  bucket = serialization.build_bucket(scan, capacities=(4096,), **BUCKET)
  features, aux = jax.jit(model.apply)(params, _batch(bucket, bucket))
  v = bucket["num_voxels"]
  assert features.shape == (2, 4096, 24) and features.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(features[:, :v], axis=-1), 1.0, rtol=1e-5)
  assert not np.any(features[:, v:])
  assert aux["backbone"].shape == (2, 4096, 16)
  assert aux["stage1"].shape[:2] == (2, bucket["s1/mask"].shape[0])


def test_valid_outputs_do_not_depend_on_padding(model_and_params, scan):
  """The same scan in two bucket capacities gives the same valid features."""
  model, params = model_and_params
  small = serialization.build_bucket(scan, capacities=(4096,), **BUCKET)
  large = serialization.build_bucket(scan, capacities=(6144,), **BUCKET)
  assert small["num_voxels"] == large["num_voxels"] and large["capacity"] == 6144
  y_small = jax.jit(model.apply)(params, _batch(small))[0]
  y_large = jax.jit(model.apply)(params, _batch(large))[0]
  v = small["num_voxels"]
  np.testing.assert_allclose(y_small[0, :v], y_large[0, :v], atol=2e-5)


def test_fully_padded_patches_no_nan_forward_or_backward(model_and_params, scan):
  """A few voxels in a large bucket: most patches and parents are all padding."""
  model, params = model_and_params
  bucket = serialization.build_bucket(scan[:50], capacities=(4096,), **BUCKET)
  assert bucket["num_voxels"] < PATCH  # every patch but the first is empty
  batch = _batch(bucket)

  def loss(p):
    y, aux = model.apply(p, batch)
    return jnp.sum(y[..., 0]) + jnp.sum(aux["stage1"] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_tiny_forward_backward_jits_in_seconds(model_and_params, scan):
  model, params = model_and_params
  batch = _batch(*[serialization.build_bucket(scan, capacities=(4096,), **BUCKET)] * 2)
  step = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, batch)[0] ** 3)))
  start = time.perf_counter()
  jax.block_until_ready(step(params))
  assert time.perf_counter() - start < 60  # compile + run; typically a few seconds


def test_bf16_compute_keeps_fp32_params(scan):
  model = point_encoder.Model(variant="tiny", out_dim=8, patch_size=PATCH, dtype=jnp.bfloat16)
  batch = _batch(serialization.build_bucket(scan, capacities=(4096,), **BUCKET))
  params = jax.jit(model.init)(jax.random.key(1), batch)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  features, aux = jax.jit(model.apply)(params, batch)
  assert aux["backbone"].dtype == jnp.bfloat16 and features.dtype == jnp.float32
  assert np.all(np.isfinite(features))


def test_variant_sizes():
  counts = {name: point_encoder.param_count(name) for name in point_encoder.VARIANTS}
  print({name: f"{n / 1e6:.2f}M" for name, n in counts.items()})
  assert counts["tiny"] < 1e6 < counts["small"] < counts["base"]
  assert 30e6 <= counts["base"] <= 40e6  # MinkUNet34 has about 37.9M


def test_batch_with_too_few_stages(model_and_params, scan):
  model, params = model_and_params
  batch = _batch(serialization.build_bucket(scan, capacities=(4096,), **BUCKET))
  del batch["s1/order"]
  with pytest.raises(ValueError, match=r"lacks \['s1/order'\]"):
    model.apply(params, batch)
