"""Official WaffleIron / ScaLR PyTorch state dicts into `waffleiron.Model`'s variables.

`waffleiron.load_torch_checkpoint` is the entry point. The official
`Segmenter.state_dict()` (valeoai/WaffleIron `waffleiron/segmenter.py`,
`embedding.py`, `backbone.py`; ScaLR's copy) maps as follows (L layers, P
planes; official layer d is plane i = d % P of scan step g = d // P, whose
arrays are stacked on a leading axis of length L / P):

  official                                  Flax (params / batch_stats)
  embed.norm (BatchNorm1d)                  embed/norm {scale, bias / mean, var}
  embed.conv1 (Conv1d C->F)                 embed/conv1 {kernel, bias}
  embed.conv2.0 (BatchNorm2d C)             embed/neighbor_norm_in
  embed.conv2.1 (Conv2d 1x1 C->F, no bias)  embed/neighbor_conv_in {kernel}
  embed.conv2.2 (BatchNorm2d F)             embed/neighbor_norm_hidden
  embed.conv2.4 (Conv2d 1x1 F->F, no bias)  embed/neighbor_conv_out {kernel}
  embed.final (Conv1d 2F->F)                embed/final {kernel, bias}
  waffleiron.spatial_mix.{d}.norm           layers/spatial_mix_{i}/norm/{bn | ln}
  waffleiron.spatial_mix.{d}.ffn.0, .ffn.2  layers/spatial_mix_{i}/ffn_0, ffn_1 {kernel, bias}
  waffleiron.spatial_mix.{d}.scale          layers/spatial_mix_{i}/scale
  waffleiron.channel_mix.{d}.norm           layers/channel_mix_{i}/norm/{bn | ln}
  waffleiron.channel_mix.{d}.mlp.0, .mlp.2  layers/channel_mix_{i}/mlp_0, mlp_1 {kernel, bias}
  waffleiron.channel_mix.{d}.scale          layers/channel_mix_{i}/scale
  classif (Conv1d F->K)                     classif {kernel, bias}
  classif.0, classif.2 (ScaLR+'s MLP head)  classif_0, classif_1

BatchNorm's `num_batches_tracked` is dropped (momentum is fixed). Every key
must be consumed and every shape must equal the model's, so a checkpoint of
another size or layout fails loudly instead of loading partially.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reldistill_jax.models import waffleiron


def _torch_layout(norm: str, head_hidden: int) -> tuple[list, list]:
  """(the embedding's and head's rows, a layer's rows): (official prefix, Flax path, kind);
  a layer's prefixes hold {d} (the official layer), its paths {i} (the plane in the group)."""
  outer = [
    ("embed.norm", ("embed", "norm"), "bn"),
    ("embed.conv1", ("embed", "conv1"), "dense"),
    ("embed.conv2.0", ("embed", "neighbor_norm_in"), "bn"),
    ("embed.conv2.1", ("embed", "neighbor_conv_in"), "dense"),
    ("embed.conv2.2", ("embed", "neighbor_norm_hidden"), "bn"),
    ("embed.conv2.4", ("embed", "neighbor_conv_out"), "dense"),
    ("embed.final", ("embed", "final"), "dense"),
  ]
  if head_hidden:
    outer += [("classif.0", ("classif_0",), "dense"), ("classif.2", ("classif_1",), "dense")]
  else:
    outer += [("classif", ("classif",), "dense")]
  kind = "bn" if norm == "batch" else "ln"
  norm_path = ("norm", kind)
  layer = []
  for mix, parts in (("spatial_mix", ("ffn.0", "ffn.2")), ("channel_mix", ("mlp.0", "mlp.2"))):
    block = f"{mix}_{{i}}"
    layer += [
      (f"waffleiron.{mix}.{{d}}.norm", (block, *norm_path), kind),
      (f"waffleiron.{mix}.{{d}}.{parts[0]}", (block, parts[0].replace(".0", "_0")), "dense"),
      (f"waffleiron.{mix}.{{d}}.{parts[1]}", (block, parts[1].replace(".2", "_1")), "dense"),
      (f"waffleiron.{mix}.{{d}}.scale", (block, "scale"), "scale"),
    ]
  return outer, layer


def _set(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = np.asarray(value, np.float32)


def _convert(state: dict, prefix: str, path: tuple, kind: str, out: dict) -> None:
  """Moves one official layer's arrays from `state` to out["params"] / out["batch_stats"].

  Conv weights (out, in, 1) or (out, in, 1, 1) -> Dense (in, out); the FFN's
  grouped (F, 1, 3, 3) -> HWIO (3, 3, 1, F); LayerScale (F, 1, 1) -> (F,).
  """
  take = lambda name: state.pop(f"{prefix}.{name}")
  if kind in ("bn", "ln"):
    _set(out, ("params", *path, "scale"), take("weight"))
    _set(out, ("params", *path, "bias"), take("bias"))
    if kind == "bn":
      _set(out, ("batch_stats", *path, "mean"), take("running_mean"))
      _set(out, ("batch_stats", *path, "var"), take("running_var"))
      state.pop(f"{prefix}.num_batches_tracked", None)
  elif kind == "dense":
    weight = take("weight")
    if weight.shape[1:] == (1, 3, 3):  # the FFN's grouped conv: HWIO
      weight = weight.transpose(2, 3, 1, 0)
    else:
      weight = weight.reshape(weight.shape[:2]).T
    _set(out, ("params", *path, "kernel"), weight)
    if f"{prefix}.bias" in state:
      _set(out, ("params", *path, "bias"), take("bias"))
  else:
    _set(out, ("params", *path), take("weight").reshape(-1))


def _state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
  """The official state dict as numpy arrays: a file of torch.save, or a mapping; the
  trainers' wrappers ("net", "model_point", "state_dict") and DDP's "module." are removed."""
  state = path_or_state_dict
  if isinstance(state, str | os.PathLike):
    import torch  # only to read a PyTorch file

    state = torch.load(state, map_location="cpu", weights_only=True)
  is_model = lambda s: any(str(k).removeprefix("module.").startswith("embed.") for k in s)
  while isinstance(state, Mapping) and not is_model(state):
    inner = [state[k] for k in ("net", "model_point", "state_dict") if k in state]
    if not inner:
      raise ValueError("no WaffleIron state dict (keys embed.*, waffleiron.*, classif.*) found")
    state = inner[0]
  to_numpy = lambda v: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
  return {k.removeprefix("module."): to_numpy(v) for k, v in state.items()}


def load(path_or_state_dict, model: waffleiron.Model) -> dict[str, Any]:
  """The variables of `model` from an official state dict (`waffleiron.load_torch_checkpoint`)."""
  state = _state_dict(path_or_state_dict)
  if "embed.norm.weight" not in state:
    raise ValueError("the state dict lacks embed.norm.weight")
  # The batch's channels: x, y, z, intensity, or the embedding's input as it is.
  channels = 4 if model.input_feat is not None else len(state["embed.norm.weight"])
  depth, _, _, grids = model.sizes()
  outer, layer = _torch_layout(model.norm, model.head_hidden)
  out: dict = {}
  groups: list[dict] = [{} for _ in range(depth // len(grids))]
  rows = [(prefix, path, kind, out) for prefix, path, kind in outer]
  for d in range(depth):  # layer d is plane i of scan step g
    g, i = divmod(d, len(grids))
    rows += [
      (prefix.format(d=d), tuple(p.format(i=i) for p in path), kind, groups[g])
      for prefix, path, kind in layer
    ]
  for prefix, path, kind, tree in rows:
    try:
      _convert(state, prefix, path, kind, tree)
    except KeyError as e:
      raise ValueError(f"the state dict lacks {e.args[0]} (a {kind} layer)") from None
  for collection, stacked in jax.tree.map(lambda *a: np.stack(a), *groups).items():
    out[collection]["layers"] = stacked
  if state:
    raise ValueError(f"keys of no layer of this model: {sorted(state)[:8]}")
  expected = jax.eval_shape(model.init, jax.random.key(0), waffleiron.example_batch(channels))
  want = _shapes({k: expected[k] for k in ("params", "batch_stats") if k in expected})
  got = _shapes(out)
  bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
  if bad:
    shown = ", ".join(f"{k} {got.get(k)} (model {want.get(k)})" for k in bad[:4])
    raise ValueError(f"the state dict's layers do not match the model's: {shown}")
  return jax.tree.map(jnp.asarray, out)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {
    jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(tree)
  }
