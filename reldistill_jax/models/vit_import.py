"""Importing CLIP, SigLIP, DINOv2 and DINOv3 image towers into `vit.ViT` from local files.

Three layouts are read, all with `checkpoints.read_safetensors` (no torch):

  * Hugging Face CLIP: a folder with `config.json` and `model.safetensors`
    (or a sharded `model.safetensors.index.json`) of a `CLIPModel` (its
    `vision_config` and `visual_projection`), a `CLIPVisionModelWithProjection`
    or a `CLIPVisionModel` (no projection: no pooled embedding, no MaskCLIP).
  * open_clip: a `*.safetensors` file (or a folder holding one) with the
    `visual.*` tensors. It has no config: width, layers, patch size, MLP size,
    position grid and projection come from the tensor shapes, heads are
    width // 64 (open_clip's head width). The activation is not recorded in
    the weights: it is read from an `open_clip_config.json` beside the file,
    or must be given (OpenAI weights use QuickGELU, LAION/DataComp ones GELU).
  * Hugging Face DINOv2: `Dinov2Model` or `Dinov2WithRegistersModel`.
  * Hugging Face SigLIP / SigLIP 2 at a fixed resolution: `SiglipModel` or
    `SiglipVisionModel` (with its attention-pooling head).
  * Hugging Face DINOv3: `DINOv3ViTModel` (RoPE, registers, LayerScale).

Each loader returns `(config, params)`: a `vit.ViTConfig` and the Linen
parameter pytree, used as `ViT(config).apply({"params": params}, images)`.
The imported tree is checked against the model's own (`jax.eval_shape`), and
every tensor of the image tower must be consumed, so an unsupported variant
(e.g. DINOv2's SwiGLU MLP) fails loudly instead of loading partially.
"""

import json
import pathlib
import re

import numpy as np

from reldistill_jax.models import checkpoints, tower_import, vit
from reldistill_jax.models.checkpoints import CheckpointError

_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def load_clip_vision(
  path: str | pathlib.Path, activation: str | None = None
) -> tuple[vit.ViTConfig, dict]:
  """A CLIP image tower from a Hugging Face folder or an open_clip file.

  Args:
    path: a folder with `config.json` (Hugging Face layout); otherwise an
      open_clip `*.safetensors` file or a folder holding one.
    activation: only for open_clip files (see `load_open_clip_vision`).

  Returns:
    (config, params) with `dense_output="maskclip"` when there is a projection.

  Raises:
    CheckpointError: for missing files, another architecture (naming what was
      found) or a parameter whose shape the config does not predict.
  """
  path = pathlib.Path(path)
  if path.is_dir() and (path / "config.json").is_file():
    return _load_hf_clip(path)
  if path.is_file() or (path.is_dir() and list(path.glob("*.safetensors"))):
    return load_open_clip_vision(path, activation)
  raise CheckpointError(
    f"{path}: no config.json (Hugging Face layout) and no open_clip *.safetensors found"
  )


def _load_hf_clip(folder: pathlib.Path) -> tuple[vit.ViTConfig, dict]:
  config_json = checkpoints.read_config(folder)
  model_type = config_json.get("model_type")
  if model_type == "clip":
    vision = config_json.get("vision_config", {})
  elif model_type == "clip_vision_model":
    vision = config_json
  else:
    raise CheckpointError(
      f"{folder}: expected a CLIP checkpoint (model_type 'clip' or 'clip_vision_model'), "
      f"found {tower_import.describe(config_json)}"
    )
  tensors, source = tower_import.read_hf_tensors(folder)
  # CLIPModel and older CLIPVisionModel files prefix the tower with `vision_model.`.
  pre = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
  has_proj = "visual_projection.weight" in tensors
  if model_type == "clip" and not has_proj:
    raise CheckpointError(f"{source}: parameter visual_projection.weight not found")
  # Defaults are CLIPVisionConfig's, for configs that store only non-defaults.
  width = vision.get("hidden_size", 768)
  patch = vision.get("patch_size", 32)
  grid = vision.get("image_size", 224) // patch
  proj_dim = config_json.get("projection_dim", 512) if has_proj else None
  activation = vision.get("hidden_act", "quick_gelu")
  if activation not in vit.ACTIVATIONS:
    raise CheckpointError(f"{folder}: activation {activation!r} is not supported")
  config = vit.clip_config(
    width,
    vision.get("num_hidden_layers", 12),
    patch,
    grid,
    proj_dim,
    heads=vision.get("num_attention_heads", 12),
    mlp_dim=vision.get("intermediate_size", 3072),
    activation=activation,
    layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
    dense_output="maskclip" if has_proj else "tokens_prenorm",
  )
  reader = tower_import.Reader(tensors, source)
  emb = f"{pre}embeddings"
  params = {
    "patch_embed": {"kernel": reader.conv(f"{emb}.patch_embedding.weight", config)},
    "cls_token": reader.take(f"{emb}.class_embedding", (width,)),
    "pos_embed": reader.take(f"{emb}.position_embedding.weight", (grid * grid + 1, width)),
    "ln_pre": reader.norm(f"{pre}pre_layrnorm", width),
    "ln_post": reader.norm(f"{pre}post_layernorm", width),
  }
  for i in range(config.layers):
    names = tower_import.clip_block_names(f"{pre}encoder.layers.{i}")
    params[f"block{i}"] = tower_import.block(reader, config, names)
  if has_proj:
    params["proj"] = reader.dense("visual_projection", width, proj_dim, bias=False)
  reader.check_all_used(f"{pre}embeddings", ("position_ids",))
  reader.check_all_used(f"{pre}encoder")
  return config, tower_import.to_jax(config, params, source)


def _find_open_clip_file(path: pathlib.Path) -> pathlib.Path:
  if path.is_file():
    return path
  if not path.is_dir():
    raise CheckpointError(f"{path}: open_clip checkpoint not found")
  for name in _OPEN_CLIP_FILES:
    if (path / name).is_file():
      return path / name
  found = sorted(path.glob("*.safetensors"))
  if len(found) != 1:
    raise CheckpointError(
      f"{path}: expected one open_clip *.safetensors file ({_OPEN_CLIP_FILES[0]}), "
      f"found {[f.name for f in found]}"
    )
  return found[0]


def _open_clip_settings(folder: pathlib.Path, activation: str | None) -> tuple[str, dict]:
  """Activation and pixel statistics from an `open_clip_config.json`, if any."""
  config_path = folder / "open_clip_config.json"
  settings = json.loads(config_path.read_text()) if config_path.is_file() else {}
  pixels = {}
  preprocess = settings.get("preprocess_cfg", {})
  if "mean" in preprocess and "std" in preprocess:
    pixels = {"pixel_mean": tuple(preprocess["mean"]), "pixel_std": tuple(preprocess["std"])}
  if activation is None:
    if "model_cfg" not in settings:
      raise CheckpointError(
        f"{folder}: open_clip weights do not record their activation and there is no "
        "open_clip_config.json; pass activation='quick_gelu' (OpenAI weights) or 'gelu'"
      )
    activation = "quick_gelu" if settings["model_cfg"].get("quick_gelu", False) else "gelu"
  return activation, pixels


def load_open_clip_vision(
  path: str | pathlib.Path, activation: str | None = None
) -> tuple[vit.ViTConfig, dict]:
  """A CLIP image tower from an open_clip safetensors file.

  Args:
    path: the `*.safetensors` file, or a folder holding one (preferably named
      `open_clip_model.safetensors`).
    activation: `quick_gelu` or `gelu`; None reads `model_cfg.quick_gelu`
      from an `open_clip_config.json` beside the weights.

  Returns:
    (config, params), with `dense_output="maskclip"`.

  Raises:
    CheckpointError: for a missing file, weights of another layout, or
      inconsistent shapes (naming the parameter).
  """
  file = _find_open_clip_file(pathlib.Path(path))
  tensors = checkpoints.read_safetensors(file)
  source = str(file)
  if "visual.conv1.weight" not in tensors:
    hint = ""
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding")) for k in tensors):
      hint = " (this is a Hugging Face CLIP file: load its folder with config.json)"
    elif "embeddings.cls_token" in tensors:
      hint = " (this looks like a DINOv2 checkpoint)"
    raise CheckpointError(
      f"{source}: not an open_clip CLIP image tower, visual.conv1.weight not found{hint}; "
      f"tensors include {sorted(tensors)[:4]}"
    )
  for name in ("visual.positional_embedding", "visual.proj"):
    if name not in tensors:
      raise CheckpointError(f"{source}: parameter {name} not found")
  activation, pixels = _open_clip_settings(file.parent, activation)
  width, _, patch, _ = tensors["visual.conv1.weight"].shape
  num_pos = tensors["visual.positional_embedding"].shape[0]
  grid = int(round(np.sqrt(num_pos - 1)))
  if grid * grid != num_pos - 1:
    raise CheckpointError(
      f"{source}: visual.positional_embedding has {num_pos} rows, not 1 + a square grid"
    )
  blocks = {
    int(m.group(1))
    for k in tensors
    if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))
  }
  if blocks != set(range(len(blocks))) or not blocks:
    raise CheckpointError(
      f"{source}: transformer blocks are missing or misnumbered: {sorted(blocks)}"
    )
  c_fc = "visual.transformer.resblocks.0.mlp.c_fc.weight"
  config = vit.clip_config(
    width,
    len(blocks),
    patch,
    grid,
    tensors["visual.proj"].shape[1],
    mlp_dim=tensors[c_fc].shape[0] if c_fc in tensors else 4 * width,
    activation=activation,
    layer_scale="visual.transformer.resblocks.0.ls_1.gamma" in tensors,
    **pixels,
  )
  reader = tower_import.Reader(tensors, source)
  params = {
    "patch_embed": {"kernel": reader.conv("visual.conv1.weight", config)},
    "cls_token": reader.take("visual.class_embedding", (width,)),
    "pos_embed": reader.take("visual.positional_embedding", (num_pos, width)),
    "ln_pre": reader.norm("visual.ln_pre", width),
    "ln_post": reader.norm("visual.ln_post", width),
    "proj": {"kernel": reader.take("visual.proj", (width, config.proj_dim))},
  }
  for i in range(config.layers):
    block = f"visual.transformer.resblocks.{i}"
    # nn.MultiheadAttention packs the query, key and value rows in one matrix.
    in_w = reader.take(f"{block}.attn.in_proj_weight", (3 * width, width))
    in_b = reader.take(f"{block}.attn.in_proj_bias", (3 * width,))
    packed = {
      name: {"kernel": w.T, "bias": b}
      for name, w, b in zip(
        ("query", "key", "value"), np.split(in_w, 3), np.split(in_b, 3), strict=True
      )
    }
    params[f"block{i}"] = packed | {
      "ln_1": reader.norm(f"{block}.ln_1", width),
      "out": reader.dense(f"{block}.attn.out_proj", width, width),
      "ln_2": reader.norm(f"{block}.ln_2", width),
      "mlp_fc": reader.dense(f"{block}.mlp.c_fc", width, config.mlp_dim),
      "mlp_proj": reader.dense(f"{block}.mlp.c_proj", config.mlp_dim, width),
    }
    if config.layer_scale:
      params[f"block{i}"]["ls_1"] = reader.take(f"{block}.ls_1.gamma", (width,))
      params[f"block{i}"]["ls_2"] = reader.take(f"{block}.ls_2.gamma", (width,))
  reader.check_all_used("visual.")
  return config, tower_import.to_jax(config, params, source)


def load_dinov2(folder: str | pathlib.Path) -> tuple[vit.ViTConfig, dict]:
  """A DINOv2 tower from a Hugging Face folder (`Dinov2Model`, with or without registers).

  Args:
    folder: holds `config.json` and `model.safetensors`.

  Returns:
    (config, params), with `dense_output="tokens_prenorm"` (the last block's
    patch tokens before the final norm); use `dataclasses.replace(config,
    dense_output="tokens_postnorm")` for the normed ones. The position
    embeddings are resampled as `transformers` does (antialiased for the
    registers model).

  Raises:
    CheckpointError: for missing files, another architecture (naming what was
      found), an unsupported variant or a parameter of an unexpected shape.
  """
  folder = pathlib.Path(folder)
  config_json = checkpoints.read_config(folder)
  model_type = config_json.get("model_type")
  if model_type not in ("dinov2", "dinov2_with_registers"):
    raise CheckpointError(
      f"{folder}: expected a DINOv2 checkpoint (model_type 'dinov2' or "
      f"'dinov2_with_registers'), found {tower_import.describe(config_json)}"
    )
  if config_json.get("use_swiglu_ffn", False):
    raise CheckpointError(f"{folder}: the SwiGLU MLP (DINOv2 giant) is not supported")
  activation = config_json.get("hidden_act", "gelu")
  if activation not in vit.ACTIVATIONS:
    raise CheckpointError(f"{folder}: activation {activation!r} is not supported")
  tensors, source = tower_import.read_hf_tensors(folder)
  registers = model_type == "dinov2_with_registers"
  width = config_json.get("hidden_size", 768)
  patch = config_json.get("patch_size", 14)
  grid = config_json.get("image_size", 224) // patch
  config = vit.dinov2_config(
    width,
    config_json.get("num_hidden_layers", 12),
    config_json.get("num_attention_heads", 12),
    patch_size=patch,
    mlp_dim=int(width * config_json.get("mlp_ratio", 4)),
    pos_grid=(grid, grid),
    activation=activation,
    layer_norm_eps=config_json.get("layer_norm_eps", 1e-6),
    qkv_bias=config_json.get("qkv_bias", True),
    num_registers=config_json.get("num_register_tokens", 0) if registers else 0,
    pos_interpolation_antialias=registers,
  )
  reader = tower_import.Reader(tensors, source)
  params = {
    "patch_embed": {
      "kernel": reader.conv("embeddings.patch_embeddings.projection.weight", config),
      "bias": reader.take("embeddings.patch_embeddings.projection.bias", (width,)),
    },
    "cls_token": reader.take("embeddings.cls_token", (1, 1, width)).reshape(width),
    "pos_embed": reader.take("embeddings.position_embeddings", (1, grid * grid + 1, width))[0],
    "ln_post": reader.norm("layernorm", width),
  }
  if config.num_registers:
    params["register_tokens"] = reader.take(
      "embeddings.register_tokens", (1, config.num_registers, width)
    )[0]
  for i in range(config.layers):
    layer = f"encoder.layer.{i}"
    # Hub files use the `attention.attention.query` names; transformers 5
    # renames them to `attention.q_proj` in memory, and either may be saved.
    new_names = f"{layer}.attention.q_proj.weight" in tensors
    attn = f"{layer}.attention." + ("{new}" if new_names else "attention.{old}")
    qkv = {
      ours: attn.format(new=new, old=old)
      for ours, new, old in (
        ("query", "q_proj", "query"),
        ("key", "k_proj", "key"),
        ("value", "v_proj", "value"),
      )
    }
    names = qkv | {
      "ln_1": f"{layer}.norm1",
      "out": f"{layer}.attention." + ("o_proj" if new_names else "output.dense"),
      "ln_2": f"{layer}.norm2",
      "mlp_fc": f"{layer}.mlp.fc1",
      "mlp_proj": f"{layer}.mlp.fc2",
      "ls_1": f"{layer}.layer_scale1.lambda1",
      "ls_2": f"{layer}.layer_scale2.lambda1",
    }
    params[f"block{i}"] = tower_import.block(reader, config, names)
  # The mask token only serves masked-image pretraining.
  reader.check_all_used("", ("mask_token",))
  return config, tower_import.to_jax(config, params, source)


def _vision_section(folder: pathlib.Path, config_json: dict, family: str, types: tuple) -> dict:
  """The vision config of a two-tower (`vision_config`) or a vision-only config."""
  model_type = config_json.get("model_type")
  if model_type == types[0]:
    return config_json.get("vision_config", {})
  if model_type == types[1]:
    return config_json
  raise CheckpointError(
    f"{folder}: expected a {family} checkpoint (model_type {types[0]!r} or {types[1]!r}), "
    f"found {tower_import.describe(config_json)}"
  )


def load_siglip_vision(folder: str | pathlib.Path) -> tuple[vit.ViTConfig, dict]:
  """A SigLIP / SigLIP 2 image tower from a Hugging Face folder (fixed resolution).

  Reads a `SiglipModel` (model_type `siglip`, the layout of the
  fixed-resolution SigLIP 2 checkpoints, e.g. siglip2-base-patch16-224) or a
  `SiglipVisionModel`. Pixel statistics come from `preprocessor_config.json`
  (default 0.5, 0.5).

  Returns:
    (config, params) with `dense_output="maskclip"` (the head's value path)
    when the tower has its pooling head, `tokens_postnorm` otherwise.

  Raises:
    CheckpointError: for missing files, another architecture (the NaFlex
      `siglip2` layout included) or a parameter of an unexpected shape.
  """
  folder = pathlib.Path(folder)
  config_json = checkpoints.read_config(folder)
  if config_json.get("model_type") in ("siglip2", "siglip2_vision_model"):
    raise CheckpointError(
      f"{folder}: the SigLIP 2 NaFlex layout (model_type {config_json['model_type']!r}) is not "
      "supported; use a fixed-resolution SigLIP 2 checkpoint (e.g. siglip2-base-patch16-224)"
    )
  vision = _vision_section(folder, config_json, "SigLIP", ("siglip", "siglip_vision_model"))
  tensors, source = tower_import.read_hf_tensors(folder)
  width = vision.get("hidden_size", 768)
  patch = vision.get("patch_size", 16)
  grid = vision.get("image_size", 224) // patch
  use_head = vision.get("vision_use_head", True)
  config = vit.siglip_config(
    width,
    vision.get("num_hidden_layers", 12),
    vision.get("num_attention_heads", 12),
    vision.get("intermediate_size", 3072),
    patch,
    grid,
    activation=vision.get("hidden_act", "gelu_pytorch_tanh"),
    layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
    head="map" if use_head else None,
    dense_output="maskclip" if use_head else "tokens_postnorm",
    **tower_import.pixel_stats(folder, vit.SIGLIP_MEAN, vit.SIGLIP_STD),
  )
  if config.activation not in vit.ACTIVATIONS:
    raise CheckpointError(f"{folder}: activation {config.activation!r} is not supported")
  reader = tower_import.Reader(tensors, source)
  # SiglipModel files prefix the tower; transformers 5 saves a SiglipVisionModel without it.
  pre = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
  params = {
    "patch_embed": {
      "kernel": reader.conv(f"{pre}embeddings.patch_embedding.weight", config),
      "bias": reader.take(f"{pre}embeddings.patch_embedding.bias", (width,)),
    },
    "pos_embed": reader.take(f"{pre}embeddings.position_embedding.weight", (grid * grid, width)),
    "ln_post": reader.norm(f"{pre}post_layernorm", width),
  }
  for i in range(config.layers):
    layer = f"{pre}encoder.layers.{i}"
    params[f"block{i}"] = tower_import.block(reader, config, tower_import.clip_block_names(layer))
  if use_head:
    params["head"] = _siglip_head(reader, config, f"{pre}head")
  reader.check_all_used(pre, ("position_ids",))
  return config, tower_import.to_jax(config, params, source)


def _siglip_head(reader: tower_import.Reader, config: vit.ViTConfig, head: str) -> dict:
  """SigLIP's pooling head; torch's MultiheadAttention packs q, k, v in one matrix."""
  c, m = config.width, config.mlp_dim
  packed = reader.take(f"{head}.attention.in_proj_weight", (3 * c, c))
  packed_bias = reader.take(f"{head}.attention.in_proj_bias", (3 * c,))
  params = {
    name: {"kernel": packed[i * c : (i + 1) * c].T, "bias": packed_bias[i * c : (i + 1) * c]}
    for i, name in enumerate(("query", "key", "value"))
  }
  return params | {
    "probe": reader.take(f"{head}.probe", (1, 1, c)).reshape(c),
    "out": reader.dense(f"{head}.attention.out_proj", c, c),
    "ln": reader.norm(f"{head}.layernorm", c),
    "mlp_fc": reader.dense(f"{head}.mlp.fc1", c, m),
    "mlp_proj": reader.dense(f"{head}.mlp.fc2", m, c),
  }


def load_dinov3(folder: str | pathlib.Path) -> tuple[vit.ViTConfig, dict]:
  """A DINOv3 ViT from a Hugging Face folder (`DINOv3ViTModel`).

  Returns:
    (config, params), with `dense_output="tokens_postnorm"` (the patch tokens
    of `last_hidden_state`; the class token and the registers are dropped).
    Pixel statistics come from `preprocessor_config.json` (default ImageNet's).

  Raises:
    CheckpointError: for missing files, another architecture or a parameter
      of an unexpected shape.
  """
  folder = pathlib.Path(folder)
  config_json = checkpoints.read_config(folder)
  if config_json.get("model_type") != "dinov3_vit":
    raise CheckpointError(
      f"{folder}: expected a DINOv3 ViT checkpoint (model_type 'dinov3_vit'), "
      f"found {tower_import.describe(config_json)}"
    )
  tensors, source = tower_import.read_hf_tensors(folder)
  width = config_json.get("hidden_size", 384)
  patch = config_json.get("patch_size", 16)
  get = config_json.get
  config = vit.dinov3_config(
    width,
    get("num_hidden_layers", 12),
    get("num_attention_heads", 6),
    patch_size=patch,
    mlp_dim=get("intermediate_size", 1536),
    pos_grid=(get("image_size", 224) // patch,) * 2,
    activation=get("hidden_act", "gelu"),
    layer_norm_eps=get("layer_norm_eps", 1e-5),
    num_registers=get("num_register_tokens", 0),
    qkv_bias=(get("query_bias", True), get("key_bias", False), get("value_bias", True)),
    out_bias=get("proj_bias", True),
    mlp_bias=get("mlp_bias", True),
    gated_mlp=get("use_gated_mlp", False),
    rope_theta=get("rope_theta", 100.0),
    **tower_import.pixel_stats(folder, vit.IMAGENET_MEAN, vit.IMAGENET_STD),
  )
  if config.activation not in vit.ACTIVATIONS:
    raise CheckpointError(f"{folder}: activation {config.activation!r} is not supported")
  reader = tower_import.Reader(tensors, source)
  params = {
    "patch_embed": {
      "kernel": reader.conv("embeddings.patch_embeddings.weight", config),
      "bias": reader.take("embeddings.patch_embeddings.bias", (width,)),
    },
    "cls_token": reader.take("embeddings.cls_token", (1, 1, width)).reshape(width),
    "ln_post": reader.norm("norm", width),
  }
  if config.num_registers:
    params["register_tokens"] = reader.take(
      "embeddings.register_tokens", (1, config.num_registers, width)
    )[0]
  # transformers 5 nests the layers under `model.`; the hub files do not.
  stack = "model.layer" if any(k.startswith("model.layer.") for k in tensors) else "layer"
  for i in range(config.layers):
    layer = f"{stack}.{i}"
    names = {
      "ln_1": f"{layer}.norm1",
      "query": f"{layer}.attention.q_proj",
      "key": f"{layer}.attention.k_proj",
      "value": f"{layer}.attention.v_proj",
      "out": f"{layer}.attention.o_proj",
      "ln_2": f"{layer}.norm2",
      "mlp_fc": f"{layer}.mlp.up_proj",
      "mlp_gate": f"{layer}.mlp.gate_proj",
      "mlp_proj": f"{layer}.mlp.down_proj",
      "ls_1": f"{layer}.layer_scale1.lambda1",
      "ls_2": f"{layer}.layer_scale2.lambda1",
    }
    params[f"block{i}"] = tower_import.block(reader, config, names)
  # The mask token only serves masked-image pretraining.
  reader.check_all_used("", ("mask_token",))
  return config, tower_import.to_jax(config, params, source)


def load(path: str | pathlib.Path, activation: str | None = None) -> tuple[vit.ViTConfig, dict]:
  """Any supported tower: the family is read from `config.json`, else open_clip.

  Args:
    path: a Hugging Face folder (CLIP or DINOv2), or an open_clip file/folder.
    activation: only for open_clip files (see `load_open_clip_vision`).

  Returns:
    (config, params) as the family's loader returns them.

  Raises:
    CheckpointError: as the family's loader, or for an unknown model_type.
  """
  path = pathlib.Path(path)
  if path.is_dir() and (path / "config.json").is_file():
    config_json = checkpoints.read_config(path)
    model_type = str(config_json.get("model_type", ""))
    if model_type.startswith("clip"):
      return _load_hf_clip(path)
    if model_type.startswith("dinov2"):
      return load_dinov2(path)
    if model_type.startswith("siglip"):
      return load_siglip_vision(path)
    if model_type == "dinov3_vit":
      return load_dinov3(path)
    raise CheckpointError(
      f"{path}: not a CLIP, SigLIP, DINOv2 or DINOv3 checkpoint "
      f"({tower_import.describe(config_json)})"
    )
  return load_clip_vision(path, activation)
