"""Parity of the JAX image towers with the PyTorch ones of `transformers`.

Tiny random CLIP and DINOv2 models are built with `transformers`, saved as
safetensors, imported with `vit_import`, and compared on random images at the
native size and at non-square sizes that need position-embedding resampling.
The torch-free tests (grid sizes, pixel-to-cell, normalisation) are in test_vit.py.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax.models import positions, vit, vit_import
from reldistill_jax.models.checkpoints import CheckpointError

# The optional `parity` extra.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _images(shape, seed=0):
  """Random normalised images: (NHWC numpy for JAX, NCHW torch tensor)."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _apply(config, params, images, dtype=jnp.float32):
  features, aux = jax.jit(vit.ViT(config, dtype=dtype).apply)({"params": params}, images)
  return np.asarray(features, np.float32), {k: np.asarray(v, np.float32) for k, v in aux.items()}


def _max_diff(a, b) -> float:
  b = b.detach().numpy() if hasattr(b, "detach") else b
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """A tiny random CLIPModel (vision: width 128, 2 heads, 2 layers, patch 8, image 32).

  Its heads have 64 channels, as open_clip assumes, so the same weights serve
  the open_clip layout test.
  """
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
    text_config=dict(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ),
    vision_config=dict(
      hidden_size=128,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=256,
      patch_size=8,
      image_size=32,
    ),
    projection_dim=32,
  )
  model = transformers.CLIPModel(config).eval()
  # Random init leaves LayerNorms at identity and position embeddings small;
  # perturb them so that both are tested (resampling errors would show).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
    model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.5)
  folder = tmp_path_factory.mktemp("clip")
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
  """A tiny random Dinov2Model (width 48, 2 layers, patch 8, image 40: 5x5 grid)."""
  torch.manual_seed(1)
  config = transformers.Dinov2Config(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=8,
    image_size=40,
    layerscale_value=0.5,
  )
  model = transformers.Dinov2Model(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "lambda1" in name:
        p.add_(0.1 * torch.randn_like(p))
    model.embeddings.position_embeddings.normal_(0, 0.5)
  folder = tmp_path_factory.mktemp("dinov2")
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


def _maskclip_reference(model, pixels, interpolate):
  """MaskCLIP restated with the torch modules: the last layer's value path only."""
  layer = model.vision_model.encoder.layers[-1]
  captured = {}

  def hook(module, args, kwargs):
    captured["x"] = args[0] if args else kwargs["hidden_states"]

  handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
  with torch.no_grad():
    model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=interpolate)
    handle.remove()
    x = captured["x"][:, 1:]
    v = layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(x)))
    dense = model.visual_projection(model.vision_model.post_layernorm(v))
  b, _, h, w = pixels.shape
  p = model.config.vision_config.patch_size
  return dense.reshape(b, h // p, w // p, -1)


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (24, 40)])
def test_clip_matches_transformers(clip, size):
  model, folder = clip
  config, params = vit_import.load_clip_vision(folder)
  assert config.pos_grid == (4, 4) and config.proj_dim == 32 and config.heads == 2
  images, pixels = _images((2, *size, 3))
  features, aux = _apply(config, params, images)
  interpolate = size != (32, 32)
  with torch.no_grad():
    ref = model.get_image_features(
      pixel_values=pixels, interpolate_pos_encoding=interpolate, output_hidden_states=True
    )
  assert _max_diff(aux["image_embeds"], ref.pooler_output) < TOL
  assert _max_diff(aux["tokens"], ref.last_hidden_state) < TOL
  assert _max_diff(features, _maskclip_reference(model, pixels, interpolate)) < TOL
  assert features.shape == (2, size[0] // 8, size[1] // 8, 32)


def test_clip_bfloat16_close_to_float32(clip):
  _, folder = clip
  config, params = vit_import.load_clip_vision(folder)
  images, _ = _images((1, 32, 48, 3))
  full, _ = _apply(config, params, images)
  half, _ = _apply(config, params, images, dtype=jnp.bfloat16)
  assert np.abs(half - full).max() < 0.05 * np.abs(full).max()


def _open_clip_tensors(model) -> dict[str, np.ndarray]:
  """The CLIP image tower of `model` renamed to open_clip's layout."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  pre = "vision_model."
  out = {
    "visual.conv1.weight": sd[f"{pre}embeddings.patch_embedding.weight"],
    "visual.class_embedding": sd[f"{pre}embeddings.class_embedding"],
    "visual.positional_embedding": sd[f"{pre}embeddings.position_embedding.weight"],
    "visual.proj": sd["visual_projection.weight"].T.copy(),
    # Text-tower and logit-scale tensors live beside the image tower in open_clip files.
    "logit_scale": sd["logit_scale"],
    "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
  }
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    for kind in ("weight", "bias"):
      out[f"visual.{ours}.{kind}"] = sd[f"{pre}{theirs}.{kind}"]
  for i in range(model.config.vision_config.num_hidden_layers):
    src, dst = f"{pre}encoder.layers.{i}", f"visual.transformer.resblocks.{i}"
    for kind in ("weight", "bias"):
      qkv = [sd[f"{src}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
      out[f"{dst}.attn.in_proj_{kind}"] = np.concatenate(qkv, axis=0)
      for ours, theirs in (
        ("attn.out_proj", "self_attn.out_proj"),
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
      ):
        out[f"{dst}.{ours}.{kind}"] = sd[f"{src}.{theirs}.{kind}"]
  return out


def test_open_clip_layout_matches_transformers(clip, tmp_path):
  from safetensors.numpy import save_file

  model, hf_folder = clip
  save_file(_open_clip_tensors(model), str(tmp_path / "open_clip_model.safetensors"))
  with pytest.raises(CheckpointError, match="activation"):
    vit_import.load_open_clip_vision(tmp_path)
  (tmp_path / "open_clip_config.json").write_text(
    json.dumps({"model_cfg": {"embed_dim": 32, "quick_gelu": True}})
  )
  config, params = vit_import.load_clip_vision(tmp_path)
  hf_config, _ = vit_import.load_clip_vision(hf_folder)
  assert config == hf_config
  for size in [(32, 32), (32, 48)]:
    images, pixels = _images((2, *size, 3), seed=1)
    features, aux = _apply(config, params, images)
    interpolate = size != (32, 32)
    with torch.no_grad():
      ref = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=interpolate)
    assert _max_diff(aux["image_embeds"], ref.pooler_output) < TOL
    assert _max_diff(features, _maskclip_reference(model, pixels, interpolate)) < TOL


@pytest.mark.parametrize("size", [(40, 40), (40, 64), (24, 56)])
def test_dinov2_matches_transformers(dinov2, size):
  model, folder = dinov2
  config, params = vit_import.load_dinov2(folder)
  assert (
    config.pos_grid == (5, 5) and config.layer_scale and config.dense_output == "tokens_prenorm"
  )
  images, pixels = _images((2, *size, 3), seed=2)
  features, aux = _apply(config, params, images)
  with torch.no_grad():
    ref = model(pixel_values=pixels, output_hidden_states=True)
  grid = (size[0] // 8, size[1] // 8)
  assert _max_diff(aux["tokens_normed"], ref.last_hidden_state) < TOL
  assert _max_diff(aux["tokens"], ref.hidden_states[-1]) < TOL
  assert _max_diff(aux["pooled"], ref.pooler_output) < TOL
  prenorm = ref.hidden_states[-1][:, 1:].reshape(2, *grid, 48)
  assert _max_diff(features, prenorm) < TOL
  post_config = dataclasses.replace(config, dense_output="tokens_postnorm")
  post, _ = _apply(post_config, params, images)
  assert _max_diff(post, ref.last_hidden_state[:, 1:].reshape(2, *grid, 48)) < TOL


def test_dinov2_with_registers_matches_transformers(tmp_path):
  torch.manual_seed(2)
  config = transformers.Dinov2WithRegistersConfig(
    hidden_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    patch_size=8,
    image_size=40,
    num_register_tokens=2,
  )
  model = transformers.Dinov2WithRegistersModel(config).eval()
  with torch.no_grad():
    model.embeddings.register_tokens.normal_()
    model.embeddings.position_embeddings.normal_(0, 0.5)
  model.save_pretrained(tmp_path, safe_serialization=True)
  ours, params = vit_import.load_dinov2(tmp_path)
  assert ours.num_registers == 2 and ours.pos_interpolation_antialias
  for size in [(40, 40), (40, 64)]:
    images, pixels = _images((1, *size, 3), seed=3)
    features, aux = _apply(ours, params, images)
    with torch.no_grad():
      ref = model(pixel_values=pixels, output_hidden_states=True)
    assert _max_diff(aux["tokens_normed"], ref.last_hidden_state) < TOL
    grid = (size[0] // 8, size[1] // 8)
    assert _max_diff(features, ref.hidden_states[-1][:, 3:].reshape(1, *grid, 48)) < TOL


SIZES = [
  ((5, 5), (5, 8)),
  ((4, 4), (3, 7)),
  ((14, 14), (14, 26)),
  ((37, 37), (16, 30)),
  ((6, 6), (6, 6)),
]


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matches_torch_interpolate(antialias):
  rng = np.random.default_rng(4)
  for (h0, w0), (h, w) in SIZES:
    x = rng.normal(size=(1, 3, h0, w0)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
      torch.from_numpy(x), size=(h, w), mode="bicubic", align_corners=False, antialias=antialias
    )
    rows = positions.torch_bicubic_weights(h0, h, antialias=antialias)
    cols = positions.torch_bicubic_weights(w0, w, antialias=antialias)
    assert _max_diff(np.einsum("ih,jw,bchw->bcij", rows, cols, x), ref) < 1e-5, ((h0, w0), (h, w))
    # The original DINOv2 passes scale_factor = (g + 0.1) / g0, which moves the samples.
    scale = ((h + 0.1) / h0, (w + 0.1) / w0)
    ref = torch.nn.functional.interpolate(
      torch.from_numpy(x),
      scale_factor=scale,
      mode="bicubic",
      align_corners=False,
      antialias=antialias,
    )
    rows = positions.torch_bicubic_weights(h0, h, scale[0], antialias)
    cols = positions.torch_bicubic_weights(w0, w, scale[1], antialias)
    assert _max_diff(np.einsum("ih,jw,bchw->bcij", rows, cols, x), ref) < 1e-5, ((h0, w0), (h, w))


def test_pos_interpolation_offset_follows_original_dinov2():
  config = vit.dinov2_config(48, 1, 4, pos_grid=(6, 6), pos_interpolation_offset=0.1)
  pos = np.random.default_rng(5).normal(size=(36, 8)).astype(np.float32)
  for grid in [(6, 6), (4, 9)]:
    ours = vit.resample_pos_embed(jnp.asarray(pos), config, grid, square_image=False)
    table = torch.from_numpy(pos.reshape(1, 6, 6, 8).transpose(0, 3, 1, 2).copy())
    scale = ((grid[0] + 0.1) / 6, (grid[1] + 0.1) / 6)
    ref = torch.nn.functional.interpolate(
      table, scale_factor=scale, mode="bicubic", align_corners=False
    )
    assert _max_diff(np.asarray(ours), ref[0].permute(1, 2, 0).reshape(-1, 8)) < 1e-5


def test_load_dispatches_on_the_family(clip, dinov2):
  for (_, folder), family in [
    (clip, vit_import.load_clip_vision),
    (dinov2, vit_import.load_dinov2),
  ]:
    config, params = vit_import.load(folder)
    expected_config, expected = family(folder)
    assert config == expected_config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, expected))


def test_dinov2_in_memory_names_load_alike(dinov2, tmp_path):
  """Files saved with transformers 5's renamed attention layers (q_proj, o_proj) load alike."""
  from safetensors.numpy import save_file

  from reldistill_jax.models import checkpoints

  _, folder = dinov2
  renames = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
  }
  tensors = {}
  for name, value in checkpoints.read_safetensors(folder / "model.safetensors").items():
    for old, new in renames.items():
      name = name.replace(old, new)
    tensors[name] = value
  save_file(tensors, str(tmp_path / "model.safetensors"))
  shutil.copy(folder / "config.json", tmp_path)
  _, renamed = vit_import.load_dinov2(tmp_path)
  _, original = vit_import.load_dinov2(folder)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), renamed, original))


@pytest.mark.parametrize("name", sorted(vit.VARIANTS))
def test_variants_match_transformers_architectures(name):
  """Parameter counts of the named sizes equal those of the public architectures."""
  config = vit.VARIANTS[name]
  sizes = dict(
    hidden_size=config.width,
    num_hidden_layers=config.layers,
    num_attention_heads=config.heads,
    patch_size=config.patch_size,
    image_size=config.pos_grid[0] * config.patch_size,
  )
  with torch.device("meta"):
    if name.startswith("clip"):
      vision = transformers.CLIPVisionConfig(
        **sizes, intermediate_size=config.mlp_dim, projection_dim=config.proj_dim
      )
      model = transformers.CLIPVisionModelWithProjection(vision)
      skip = ()
    elif name.startswith("siglip"):
      vision = transformers.SiglipVisionConfig(**sizes, intermediate_size=config.mlp_dim)
      model = transformers.SiglipVisionModel(vision)
      skip = ()
    elif name.startswith("dinov3"):
      vision = transformers.DINOv3ViTConfig(
        **sizes, intermediate_size=config.mlp_dim, num_register_tokens=config.num_registers
      )
      model = transformers.DINOv3ViTModel(vision)
      skip = ("embeddings.mask_token",)
    else:
      model = transformers.Dinov2Model(transformers.Dinov2Config(**sizes))
      skip = ("embeddings.mask_token",)
  expected = sum(p.numel() for n, p in model.named_parameters() if n not in skip)
  assert vit.param_count(config) == expected


def test_load_errors(clip, dinov2, tmp_path):
  _, clip_folder = clip
  _, dinov2_folder = dinov2
  with pytest.raises(CheckpointError, match="no config.json"):
    vit_import.load_clip_vision(tmp_path)
  with pytest.raises(CheckpointError, match="config.json not found"):
    vit_import.load_dinov2(tmp_path)
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(dinov2_folder / "config.json", no_weights)
  with pytest.raises(CheckpointError, match="model.safetensors not found"):
    vit_import.load_dinov2(no_weights)
  with pytest.raises(CheckpointError, match=r"expected a CLIP checkpoint.*'dinov2'.*Dinov2Model"):
    vit_import.load_clip_vision(dinov2_folder)
  with pytest.raises(CheckpointError, match=r"expected a DINOv2 checkpoint.*'clip'"):
    vit_import.load_dinov2(clip_folder)
  with pytest.raises(CheckpointError, match="Hugging Face CLIP file"):
    vit_import.load_open_clip_vision(clip_folder / "model.safetensors", activation="quick_gelu")
  wrong = tmp_path / "wrong_shape"
  shutil.copytree(clip_folder, wrong)
  config = json.loads((wrong / "config.json").read_text())
  config["vision_config"]["intermediate_size"] = 96
  (wrong / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    CheckpointError, match=r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight.*\(256, 128\)"
  ):
    vit_import.load_clip_vision(wrong)
