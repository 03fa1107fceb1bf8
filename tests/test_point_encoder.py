"""The student encoder on packs of real nuScenes scans: a scan's features do not depend on its pack."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax import input_pipeline, losses, packing, pairs, serialization
from reldistill_jax.models import point_encoder

PATCH = 64
STAGES = 2


@pytest.fixture(scope="module")
def scans(realdata) -> list[dict]:
  """Three buckets cut from the real nuScenes sweep: the near ring and two far sectors."""
  path = next((realdata / "mmdetection3d-nuscenes-demo" / "samples" / "LIDAR_TOP").glob("*.bin"))
  points = np.fromfile(path, "<f4").reshape(-1, 5)
  radius = np.linalg.norm(points[:, :2], axis=1)
  angle = np.arctan2(points[:, 1], points[:, 0])
  parts = [
    points[radius < 15][:4000],
    points[(radius >= 15) & (angle < 0)][:1500],
    points[(radius >= 15) & (angle >= 0)][:2500],
  ]
  return [
    serialization.build_bucket(p, token=f"part-{i}", num_stages=STAGES, voxel_size=0.2)
    for i, p in enumerate(parts)
  ]


def _examples(buckets) -> list[dict]:
  return [input_pipeline.Transform(0, 1 / 255)(b) for b in buckets]


def _batch(*packs_of_buckets, extra: int = 0) -> dict[str, jax.Array]:
  """A batch of packs (one per argument, each a list of buckets), in the budgets that hold the
  largest plus `extra` tokens of padding in every stage."""
  budgets = [
    packing.budgets_for(np.array([b["counts"] for b in g]), PATCH, extra) for g in packs_of_buckets
  ]
  widest = packing.Budgets(
    tuple(np.max([b.tokens for b in budgets], axis=0).tolist()),
    tuple(np.max([b.attention for b in budgets], axis=0).tolist()),
    max(b.scans for b in budgets),
    PATCH,
  )
  packed = [packing.pack(_examples(group), widest) for group in packs_of_buckets]
  stacked = input_pipeline.stack(packed)
  return {k: jnp.asarray(v) for k, v in stacked.items() if k not in input_pipeline.HOST_KEYS}


@pytest.fixture(scope="module")
def model_and_params(scans):
  model = point_encoder.Model(variant="tiny", out_dim=24, patch_size=PATCH)
  return model, jax.jit(model.init)(jax.random.key(0), _batch(scans[:1]))


def test_output_shape_norm_and_padding(model_and_params, scans):
  model, params = model_and_params
  batch = _batch(scans[:2], scans[2:], extra=300)
  features, aux = jax.jit(model.apply)(params, batch)
  t0 = batch["s0/mask"].shape[1]
  assert features.shape == (2, t0, 24) and features.dtype == jnp.float32 and t0 % PATCH == 0
  valid = np.asarray(batch["s0/mask"])
  np.testing.assert_allclose(np.linalg.norm(features[valid], axis=-1), 1.0, rtol=1e-5)
  assert not np.any(np.asarray(features)[~valid])
  assert aux["backbone"].shape == (2, t0, 16)
  assert aux["stage1"].shape[:2] == batch["s1/mask"].shape


def _features_of(model, params, batch, rows: slice) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)(params, batch)[0][0])[rows]


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
def test_a_scan_gives_the_same_features_alone_or_packed_anywhere(model_and_params, scans, order):
  """Scan 0 alone in the smallest budgets equals scan 0 packed with the others, in any slot,
  with more padding: attention, pooling, neighbours and the head stay inside their scan."""
  model, params = model_and_params
  alone = _features_of(model, params, _batch(scans[:1]), slice(0, scans[0]["num_voxels"]))
  packed = _batch([scans[i] for i in order], extra=2 * PATCH + 7)
  rows = slice(
    sum(scans[i]["num_voxels"] for i in order[: order.index(0)]),
    sum(scans[i]["num_voxels"] for i in order[: order.index(0) + 1]),
  )
  np.testing.assert_allclose(_features_of(model, params, packed, rows), alone, atol=2e-5)


def test_padding_never_produces_nan_forward_or_backward(model_and_params, scans):
  """A small scan in large budgets: most patches and parents are all padding."""
  model, params = model_and_params
  small = serialization.build_bucket(
    scans[1]["features"][:40], token="small", num_stages=STAGES, voxel_size=0.2
  )
  batch = _batch([small], extra=8 * PATCH)
  assert int(batch["s0/mask"].sum()) < PATCH  # every patch but the first is padding

  def loss(p):
    y, aux = model.apply(p, batch)
    return jnp.sum(y[..., 0]) + jnp.sum(aux["stage1"] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_gradients_do_not_depend_on_the_other_scans(model_and_params, scans):
  """The gradient of a loss on scan 0's features is the same alone and packed."""
  model, params = model_and_params

  def grad_of(batch, rows):
    loss = lambda p: jnp.sum(model.apply(p, batch)[0][0, rows] ** 3)
    return jax.jit(jax.grad(loss))(params)

  alone = grad_of(_batch(scans[:1]), slice(0, scans[0]["num_voxels"]))
  start = scans[2]["num_voxels"]
  packed = grad_of(
    _batch([scans[2], scans[0], scans[1]], extra=PATCH),
    slice(start, start + scans[0]["num_voxels"]),
  )
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(packed), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_tiny_forward_backward_jits_in_seconds(model_and_params, scans):
  model, params = model_and_params
  batch = _batch(scans, scans)
  step = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, batch)[0] ** 3)))
  start = time.perf_counter()
  jax.block_until_ready(step(params))
  assert time.perf_counter() - start < 60  # compile + run; typically a few seconds


def test_bf16_compute_keeps_fp32_params(scans):
  model = point_encoder.Model(variant="tiny", out_dim=8, patch_size=PATCH, dtype=jnp.bfloat16)
  batch = _batch(scans[:2])
  params = jax.jit(model.init)(jax.random.key(1), batch)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  features, aux = jax.jit(model.apply)(params, batch)
  assert aux["backbone"].dtype == jnp.bfloat16 and features.dtype == jnp.float32
  assert np.all(np.isfinite(features))


def test_variant_sizes():
  counts = {name: point_encoder.param_count(name) for name in point_encoder.VARIANTS}
  print({name: f"{n / 1e6:.2f}M" for name, n in counts.items()})
  assert counts["tiny"] < 1e6 < counts["tiny_wide"] < counts["small"] < counts["base"]
  assert 30e6 <= counts["base"] <= 40e6  # MinkUNet34 has about 37.9M
  stages = {name: point_encoder.Model(variant=name).num_stages() for name in counts}
  assert stages == {"tiny": 2, "tiny_wide": 2, "small": 4, "base": 5}


def test_batch_with_too_few_stages(model_and_params, scans):
  model, params = model_and_params
  batch = _batch(scans[:1])
  del batch["s1/order"]
  with pytest.raises(ValueError, match=r"lacks \['s1/order'\]"):
    model.apply(params, batch)


def test_the_loss_of_a_pack_equals_the_loss_of_its_scans_one_per_row(model_and_params, scans):
  """One pack of three scans against three packs of one (the layout before packing): the
  relational loss over every pair of the batch is the same."""
  model, params = model_and_params
  rng = np.random.default_rng(0)
  examples = []
  for bucket in scans:
    m = 300
    with_pairs = dict(bucket)
    with_pairs["pairs_voxel"] = rng.integers(0, bucket["num_voxels"], m).astype(np.int32)
    with_pairs["pairs_camera"] = rng.integers(0, 6, m).astype(np.uint8)
    with_pairs["pairs_uv"] = rng.uniform(0, 900, (m, 2)).astype(np.float32)
    with_pairs["image_sizes"] = np.tile(np.array([900, 1600], np.int32), (6, 1))
    with_pairs["teacher"] = rng.normal(size=(6, 4, 5, 24)).astype(np.float16)
    examples.append(
      input_pipeline.Transform(256, 1 / 255, grid=(4, 5))(with_pairs, np.random.default_rng(1))
    )
  counts = np.array([b["counts"] for b in scans])
  together = packing.pack(examples, packing.budgets_for(counts, PATCH))
  widest = packing.budgets_for(counts.max(axis=0)[None], PATCH)  # one shape for the rows
  apart = [packing.pack([e], widest) for e in examples]

  @jax.jit
  def loss_and_pairs(params, batch):
    k, q, mask = pairs.batch_pairs(model.apply(params, batch)[0], batch)
    return losses.relational_loss(k, q, mask)["loss"], mask.sum()

  def loss(packs):
    batch = input_pipeline.stack(packs)
    batch = {k: v for k, v in batch.items() if k not in input_pipeline.HOST_KEYS}
    value, num_pairs = loss_and_pairs(params, batch)
    assert int(num_pairs) == 3 * 256
    return float(value)

  np.testing.assert_allclose(loss([together]), loss(apart), rtol=1e-5)
