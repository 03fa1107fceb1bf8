"""Parity of the JAX SigLIP and DINOv3 image towers with the PyTorch ones of `transformers`.

Tiny random `SiglipModel`, `SiglipVisionModel` and `DINOv3ViTModel` models are
saved as safetensors, imported with `vit_import` and compared on random images,
square and not. SigLIP has learned position embeddings, resampled (bicubic) for
any input but the native square one, no class token and an attention-pooling head;
DINOv3 has a class token, register tokens, LayerScale and RoPE on the patch tokens,
with patch centres normalised to [-1, 1] along each axis separately.
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from reldistill_jax.models import checkpoints, vit_import
from reldistill_jax.models.checkpoints import CheckpointError

# The optional `parity` extra.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_dense_clip_parity import _apply, _images, _rel_err, tiny_siglip  # noqa: E402

TOL = 1e-5  # relative: max |ours - ref| / max |ref|


def _perturb(model, extra=()):
  """Moves LayerNorms, biases (zero at init) and the `extra` parameters away from init."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or any(e in name for e in extra):
        p.add_(0.1 * torch.randn_like(p))


def _same_params(a, b) -> bool:
  return jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))


# --- SigLIP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  """The tiny SiglipModel of the dense-rule tests, perturbed here."""
  model = tiny_siglip(20)
  _perturb(model.vision_model, extra=("probe",))
  with torch.no_grad():
    model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.5)
  folder = tmp_path_factory.mktemp("siglip")
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


@pytest.fixture(scope="module")
def siglip_vision(tmp_path_factory):
  """A vision-only SiglipVisionModel (width 64, 4 heads, patch 8, image 40: a 5x5 grid).

  Its LayerNorm epsilon and activation are not SigLIP's defaults, so that they
  are read from the config.
  """
  torch.manual_seed(21)
  config = transformers.SiglipVisionConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    patch_size=8,
    image_size=40,
    layer_norm_eps=1e-3,
    hidden_act="gelu",
  )
  model = transformers.SiglipVisionModel(config).eval()
  _perturb(model, extra=("probe",))
  with torch.no_grad():
    model.embeddings.position_embedding.weight.normal_(0, 0.5)
  folder = tmp_path_factory.mktemp("siglip_vision")
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


def _siglip_maskclip(vision, hidden_states):
  """SigLIP's default dense map, (B, T, C): the value paths of the last layer and the head."""
  layer, head = vision.encoder.layers[-1], vision.head
  x = hidden_states[-2]  # the input of the last layer
  t = vision.post_layernorm(layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(x))))
  c = t.shape[-1]
  u = head.attention.out_proj(
    t @ head.attention.in_proj_weight[2 * c :].T + head.attention.in_proj_bias[2 * c :]
  )
  return u + head.mlp(head.layernorm(u))


def _check_siglip(vision, config, params, size, native, image_features=None):
  """Compares our tower with the torch one (`vision`: a SiglipVisionModel) at (H, W) `size`."""
  images, pixels = _images((2, *size, 3), seed=size[0] + size[1])
  features, aux = _apply(config, params, images)
  interpolate = tuple(size) != (native, native)
  with torch.no_grad():
    ref = vision(
      pixel_values=pixels, interpolate_pos_encoding=interpolate, output_hidden_states=True
    )
    dense = _siglip_maskclip(vision, ref.hidden_states)
    embeds = image_features(pixels, interpolate) if image_features else ref.pooler_output
  assert len(ref.hidden_states) == vision.config.num_hidden_layers + 1
  grid = (size[0] // 8, size[1] // 8)
  width = vision.config.hidden_size
  assert config.dense_output == "maskclip"
  assert features.shape == (2, *grid, width)
  assert _rel_err(features, dense.reshape(2, *grid, width)) <= TOL
  assert _rel_err(aux["tokens"], ref.hidden_states[-1]) <= TOL
  assert _rel_err(aux["tokens_normed"], ref.last_hidden_state) <= TOL
  assert _rel_err(aux["pooled"], ref.pooler_output) <= TOL
  assert _rel_err(aux["image_embeds"], embeds) <= TOL


# (16, 64) has the native number of patches (2 x 8 = 4 x 4) but is not square:
# transformers resamples the table for it all the same.
@pytest.mark.parametrize("size", [(32, 32), (32, 48), (16, 64), (48, 48)])
def test_siglip_matches_transformers(siglip, size):
  model, folder = siglip
  config, params = vit_import.load_siglip_vision(folder)
  assert config.pos_grid == (4, 4) and config.heads == 2 and config.width == 96

  def image_features(pixels, interpolate):
    return model.get_image_features(
      pixel_values=pixels, interpolate_pos_encoding=interpolate
    ).pooler_output

  _check_siglip(model.vision_model, config, params, size, 32, image_features)


@pytest.mark.parametrize("size", [(40, 40), (40, 64), (24, 56)])
def test_siglip_vision_model_matches_transformers(siglip_vision, size):
  model, folder = siglip_vision
  config, params = vit_import.load_siglip_vision(folder)
  assert config.pos_grid == (5, 5) and config.heads == 4 and config.layer_norm_eps == 1e-3
  _check_siglip(model, config, params, size, 40)


def test_siglip_vision_prefixed_names_load_alike(siglip_vision, tmp_path):
  """A vision-only file whose tensors carry `vision_model.` (transformers 4's layout) loads alike."""
  from safetensors.numpy import save_file

  _, folder = siglip_vision
  tensors = checkpoints.read_safetensors(folder / "model.safetensors")
  save_file(
    {f"vision_model.{k}": v for k, v in tensors.items()}, str(tmp_path / "model.safetensors")
  )
  shutil.copy(folder / "config.json", tmp_path)
  renamed_config, renamed = vit_import.load_siglip_vision(tmp_path)
  config, original = vit_import.load_siglip_vision(folder)
  assert renamed_config == config and _same_params(renamed, original)


# --- DINOv3 ------------------------------------------------------------------------------

# Two tiny DINOv3ViTModels. `base` follows the public ViT-S/B settings (patch 16,
# no key bias, GELU MLP, 4 registers); `gated` the ViT-H+/7B ones (SwiGLU-style
# gated MLP with SiLU) with every setting the importer must read moved off its
# default: the biases, RoPE's theta, the LayerNorm epsilon, the patch size.
# Both enable the training-only RoPE augmentations, which eval mode must ignore.
DINOV3 = {
  "base": dict(
    patch_size=16,
    num_attention_heads=4,
    intermediate_size=128,
    layerscale_value=0.5,
    pos_embed_shift=0.2,
    pos_embed_jitter=1.5,
  ),
  "gated": dict(
    patch_size=8,
    num_attention_heads=2,
    intermediate_size=96,
    use_gated_mlp=True,
    hidden_act="silu",
    query_bias=False,
    key_bias=True,
    value_bias=False,
    proj_bias=False,
    mlp_bias=False,
    rope_theta=1000.0,
    layer_norm_eps=1e-6,
    layerscale_value=0.1,
    pos_embed_rescale=4.0,
  ),
}


@pytest.fixture(scope="module", params=sorted(DINOV3))
def dinov3(request, tmp_path_factory):
  torch.manual_seed(30)
  config = transformers.DINOv3ViTConfig(
    hidden_size=64,
    num_hidden_layers=2,
    image_size=64,
    num_register_tokens=4,
    **DINOV3[request.param],
  )
  model = transformers.DINOv3ViTModel(config).eval()
  _perturb(model, extra=("lambda1",))
  with torch.no_grad():
    model.embeddings.cls_token.normal_()
    model.embeddings.register_tokens.normal_()
    # Sharper attention than the 0.02 init, so that RoPE shows: normalising the
    # coordinates by the longer side instead of per axis then moves the output
    # by ~3e-2 relative on a 3 x 5 grid (~2e-4 at init).
    for layer in model.model.layer:
      layer.attention.q_proj.weight.normal_(0, 0.2)
      layer.attention.k_proj.weight.normal_(0, 0.2)
  folder = tmp_path_factory.mktemp(f"dinov3_{request.param}")
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (5, 3)])
def test_dinov3_matches_transformers(dinov3, grid):
  model, folder = dinov3
  config, params = vit_import.load_dinov3(folder)
  p = model.config.patch_size
  assert config.patch_size == p and config.num_registers == 4 and config.class_token
  images, pixels = _images((2, grid[0] * p, grid[1] * p, 3), seed=grid[0] * grid[1])
  features, aux = _apply(config, params, images)
  with torch.no_grad():
    ref = model(pixel_values=pixels, output_hidden_states=True)
  assert len(ref.hidden_states) == model.config.num_hidden_layers + 1
  assert features.shape == (2, *grid, 64)
  assert _rel_err(features, ref.last_hidden_state[:, 5:].reshape(2, *grid, 64)) <= TOL
  assert _rel_err(aux["tokens"], ref.hidden_states[-1]) <= TOL
  assert _rel_err(aux["tokens_normed"], ref.last_hidden_state) <= TOL
  assert _rel_err(aux["pooled"], ref.pooler_output) <= TOL


def test_dinov3_rope_normalises_each_axis_and_eval_ignores_augmentation(dinov3):
  """Restates transformers' RoPE tables for a 3 x 5 grid; eval mode turns the augmentation off."""
  model, _ = dinov3
  cfg = model.config
  p, head_dim = cfg.patch_size, cfg.hidden_size // cfg.num_attention_heads
  _, pixels = _images((1, 3 * p, 5 * p, 3))
  rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
  # Patch centres in [-1, 1], each axis by its own number of patches (not the longer side).
  coords = np.stack([(rows + 0.5) / 3, (cols + 0.5) / 5], -1).reshape(-1, 2) * 2 - 1
  inv_freq = cfg.rope_theta ** -np.arange(0, 1, 4 / head_dim)  # (head_dim / 4,)
  angles = 2 * np.pi * (coords[:, :, None] * inv_freq).reshape(15, -1)  # (y freqs, x freqs)
  angles = np.tile(angles, 2)  # (15, head_dim): rotate_half pairs channel i with i + head_dim / 2
  with torch.no_grad():
    cos, sin = model.rope_embeddings(pixels)
    model.train()
    augmented, _ = model.rope_embeddings(pixels)
    model.eval()
  assert np.abs(cos.numpy() - np.cos(angles)).max() < 1e-5
  assert np.abs(sin.numpy() - np.sin(angles)).max() < 1e-5
  assert np.abs(augmented.numpy() - cos.numpy()).max() > 1e-3


# --- Dispatch and errors -----------------------------------------------------------------


def test_load_dispatches_on_the_family(siglip, siglip_vision, dinov3):
  for (_, folder), family in [
    (siglip, vit_import.load_siglip_vision),
    (siglip_vision, vit_import.load_siglip_vision),
    (dinov3, vit_import.load_dinov3),
  ]:
    config, params = vit_import.load(folder)
    expected_config, expected = family(folder)
    assert config == expected_config and _same_params(params, expected)


def _copy_with_model_type(source, folder, model_type):
  shutil.copytree(source, folder)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(config | {"model_type": model_type}))
  return folder


def test_load_errors_name_the_folder(siglip, dinov3, tmp_path):
  _, siglip_folder = siglip
  _, dinov3_folder = dinov3
  named = lambda folder: re.escape(str(folder))
  with pytest.raises(CheckpointError, match=named(dinov3_folder)):
    vit_import.load_siglip_vision(dinov3_folder)
  with pytest.raises(CheckpointError, match=named(siglip_folder)):
    vit_import.load_dinov3(siglip_folder)
  # The NaFlex SigLIP 2 and DINOv3's ConvNeXt are other architectures.
  naflex = _copy_with_model_type(siglip_folder, tmp_path / "naflex", "siglip2")
  convnext = _copy_with_model_type(dinov3_folder, tmp_path / "convnext", "dinov3_convnext")
  for folder, loader in [
    (naflex, vit_import.load_siglip_vision),
    (naflex, vit_import.load),
    (convnext, vit_import.load_dinov3),
    (convnext, vit_import.load),
  ]:
    with pytest.raises(CheckpointError, match=named(folder)):
      loader(folder)
  empty = tmp_path / "empty"
  empty.mkdir()
  for loader in (vit_import.load_siglip_vision, vit_import.load_dinov3):
    with pytest.raises(CheckpointError, match=named(empty)):
      loader(empty)
  for source in (siglip_folder, dinov3_folder):
    no_weights = tmp_path / f"no_weights_{source.name}"
    no_weights.mkdir()
    shutil.copy(source / "config.json", no_weights)
    with pytest.raises(CheckpointError, match=named(no_weights)):
      vit_import.load(no_weights)
