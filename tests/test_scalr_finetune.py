"""ScaLR's fine-tuning recipe: the zero-initialised head, the layer-wise rates, AdamW."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reldistill_jax import finetune, scalr_finetune
from reldistill_jax.models import waffleiron


def _model(depth: int = 6) -> waffleiron.Model:
  return waffleiron.Model(variant=None, depth=depth, width=8, out_dim=4, grids=((4, 4),) * 3)


def _optimizer(depth: int, mode: str, **opt):
  """`finetune.make_optimizer` of ScaLR's recipe over 10 steps without warm-up."""
  optimizer = {"name": "adamw", "warmup_epochs": 0, **opt}
  config = ml_collections.ConfigDict({"optimizer": optimizer, "num_epochs": 10, "mode": mode})
  return finetune.make_optimizer(config, 10, _model(depth))


def _params(depth: int = 6):
  """A WaffleIron of `depth` layers (stacked 3 at a time: 2 groups) and a BN + zero head."""
  model = _model(depth)
  shapes = waffleiron.example_batch(4, 64, 1)
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
  encoder = jax.eval_shape(model.init, jax.random.key(0), shapes)["params"]
  encoder = jax.tree.map(lambda x: jnp.linspace(-1, 1, x.size).reshape(x.shape), encoder)
  head = scalr_finetune.BatchNormZeroHead(3).init(
    jax.random.key(1), (jnp.ones((1, 64, 8)), batch["s0/mask"])
  )
  return {"encoder": encoder, "head": head["params"]}


def test_the_head_starts_at_uniform_scores_and_normalises_valid_tokens_only():
  head = scalr_finetune.BatchNormZeroHead(3)
  x = jax.random.normal(jax.random.key(0), (1, 6, 5)) * 4 + 2
  mask = jnp.array([[True] * 4 + [False] * 2])
  variables = head.init(jax.random.key(1), (x, mask))
  np.testing.assert_array_equal(head.apply(variables, (x, mask)), 0.0)
  variables = {**variables, "params": {**variables["params"], "linear": {
    "kernel": jnp.eye(5, 3), "bias": jnp.zeros(3)}}}  # fmt: skip
  out, updated = head.apply(variables, (x, mask), mutable=["batch_stats"])
  valid = np.asarray(x[0, :4])
  expected = (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
  np.testing.assert_allclose(out[0, :4], expected[:, :3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["norm"]["mean"], 0.1 * valid.mean(0), rtol=1e-5)


def test_layer_scales_follow_scalr_layer_ids():
  """ScaLR: embed -> layer 0, {spatial,channel}_mix.i -> i + 1, the rest -> L + 1; the rate
  factor is decay^(L + 1 - id). Ours stacks layer i as group i // 3, plane i % 3."""
  depth, decay = 6, 0.9
  params = _params(depth)
  scales = scalr_finetune.layer_scales(params, depth, 3, decay)
  enc = scales["encoder"]
  for leaf in jax.tree.leaves(enc["embed"]):
    np.testing.assert_allclose(leaf, decay ** (depth + 1), rtol=1e-6)
  for kind in ("spatial_mix", "channel_mix"):
    for plane in range(3):
      for leaf in jax.tree.leaves(enc["layers"][f"{kind}_{plane}"]):
        for group in range(2):
          layer = group * 3 + plane  # the official index i
          np.testing.assert_allclose(leaf[group], decay ** (depth - layer), rtol=1e-6)
  for leaf in jax.tree.leaves(enc["classif"]) + jax.tree.leaves(scales["head"]):
    np.testing.assert_allclose(leaf, 1.0)


def test_the_first_adamw_step_is_the_scaled_sign_with_decay_on_matrices_only():
  depth, decay, lr, wd = 6, 0.9, 1e-2, 0.1
  params = _params(depth)
  tx, schedules = _optimizer(
    depth, "finetune", lr=lr, weight_decay=wd, layer_decay=decay, clip_norm=0.0
  )
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  scales = scalr_finetune.layer_scales(params, depth, 3, decay)
  paths = jax.tree_util.tree_leaves_with_path(params)
  for (path, p), u, s in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(scales), strict=True):
    names = [str(getattr(k, "key", k)) for k in path]
    matrix = p.ndim - ("layers" in names) >= 2
    # Adam's first step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps) ~ 1.
    expected = -lr * s * (1.0 / (1.0 + 1e-8) + (wd * p if matrix else 0.0))
    expected = np.broadcast_to(expected, u.shape)
    np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-9, err_msg=str(names))
  np.testing.assert_allclose(float(schedules["head"](0)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(schedules["encoder"](0)), lr * decay, rtol=1e-6)


def test_a_linear_probe_leaves_the_encoder_unchanged():
  params = _params()
  tx, schedules = _optimizer(
    6, "linear", lr=1e-2, weight_decay=0.0, layer_decay=0.95, clip_norm=1.0
  )
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["encoder"]))
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates["head"]))
  assert float(schedules["encoder"](5)) == 0.0
