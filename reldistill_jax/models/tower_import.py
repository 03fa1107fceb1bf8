"""What the image-tower importers share: a tensor reader that checks shapes and
use, Hugging Face safetensors folders, the check of an imported tree against
the model's own, and the torch names of a transformer block.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from reldistill_jax.models import checkpoints, vit
from reldistill_jax.models.checkpoints import CheckpointError


class Reader:
  """`checkpoints.take` that remembers which tensors were consumed."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self.tensors = tensors
    self.source = source
    self.used: set[str] = set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    value = checkpoints.take(self.tensors, name, shape, self.source)
    self.used.add(name)
    return value

  def dense(self, name: str, din: int, dout: int, bias: bool = True) -> dict[str, np.ndarray]:
    """A torch Linear (out, in) as a Flax Dense (kernel (in, out))."""
    params = {"kernel": self.take(f"{name}.weight", (dout, din)).T}
    if bias:
      params["bias"] = self.take(f"{name}.bias", (dout,))
    return params

  def norm(self, name: str, dim: int) -> dict[str, np.ndarray]:
    return {"scale": self.take(f"{name}.weight", (dim,)), "bias": self.take(f"{name}.bias", (dim,))}

  def conv(self, name: str, config: vit.ViTConfig) -> np.ndarray:
    """A torch Conv2d kernel (C, 3, p, p) as a Flax NHWC kernel (p, p, 3, C)."""
    p = config.patch_size
    return self.take(name, (config.width, 3, p, p)).transpose(2, 3, 1, 0)

  def check_all_used(self, prefix: str, ignore: tuple[str, ...] = ()) -> None:
    left = sorted(
      k
      for k in self.tensors
      if k.startswith(prefix) and k not in self.used and not any(i in k for i in ignore)
    )
    if left:
      raise CheckpointError(
        f"{self.source}: {len(left)} tensors of an unsupported variant were not imported, "
        f"e.g. {left[:4]}"
      )


def read_hf_tensors(folder: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
  """The tensors of a Hugging Face folder (single or sharded safetensors)."""
  single = folder / "model.safetensors"
  index = folder / "model.safetensors.index.json"
  if single.is_file():
    return checkpoints.read_safetensors(single), str(single)
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors |= checkpoints.read_safetensors(folder / shard)
    return tensors, str(index)
  raise CheckpointError(f"{folder}: model.safetensors not found (nor a sharded index)")


def describe(config_json: dict) -> str:
  return f"model_type {config_json.get('model_type')!r}, architectures {config_json.get('architectures')}"


def to_jax(config: vit.ViTConfig, params: dict, source: str) -> dict:
  """The imported tree as jax arrays, checked against the model's own tree."""
  p = config.patch_size
  images = jax.ShapeDtypeStruct((1, config.pos_grid[0] * p, config.pos_grid[1] * p, 3), jnp.float32)
  expected = jax.eval_shape(vit.ViT(config).init, jax.random.key(0), images)["params"]
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(expected)}
  have = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(params)}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))
    raise CheckpointError(f"{source}: imported parameters do not fit the model: {diff[:4]}")
  return jax.tree.map(jnp.asarray, params)


def block(reader: Reader, config: vit.ViTConfig, names: dict[str, str]) -> dict:
  """One block from torch names ({ours: theirs} for the Linear/LayerNorm layers)."""
  c, m = config.width, config.mlp_dim
  params = {"ln_1": reader.norm(names["ln_1"], c), "ln_2": reader.norm(names["ln_2"], c)}
  for ours, bias in zip(("query", "key", "value"), config.qkv_bias, strict=True):
    params[ours] = reader.dense(names[ours], c, c, bias)
  params["out"] = reader.dense(names["out"], c, c, config.out_bias)
  mlp = ("mlp_fc", "mlp_gate") if config.gated_mlp else ("mlp_fc",)
  for ours in mlp:
    params[ours] = reader.dense(names[ours], c, m, config.mlp_bias)
  params["mlp_proj"] = reader.dense(names["mlp_proj"], m, c, config.mlp_bias)
  if config.layer_scale:
    params["ls_1"] = reader.take(names["ls_1"], (c,))
    params["ls_2"] = reader.take(names["ls_2"], (c,))
  return params


def pixel_stats(folder: pathlib.Path, mean, std) -> dict[str, tuple[float, ...]]:
  """pixel_mean/pixel_std from the folder's `preprocessor_config.json`, else the family's."""
  path = folder / "preprocessor_config.json"
  if path.is_file():
    processor = json.loads(path.read_text())
    mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
  return {"pixel_mean": tuple(mean), "pixel_std": tuple(std)}


def clip_block_names(layer: str) -> dict[str, str]:
  """Torch names of a CLIP / SigLIP encoder layer."""
  return {
    "ln_1": f"{layer}.layer_norm1",
    "query": f"{layer}.self_attn.q_proj",
    "key": f"{layer}.self_attn.k_proj",
    "value": f"{layer}.self_attn.v_proj",
    "out": f"{layer}.self_attn.out_proj",
    "ln_2": f"{layer}.layer_norm2",
    "mlp_fc": f"{layer}.mlp.fc1",
    "mlp_proj": f"{layer}.mlp.fc2",
  }
