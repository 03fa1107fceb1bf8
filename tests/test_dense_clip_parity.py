"""Parity of the dense outputs of text-aligned towers (CLIP, SigLIP) with PyTorch restatements.

Each rule replaces the last encoder layer, applied to that layer's input x, with
the layer's own torch modules (h = layer_norm1(x), q, k, v per head, s = head_dim ** -0.5,
attention over all tokens, the class token included):

  * maskclip: out_proj(v), no attention, residual nor MLP;
  * sclip (Wang et al. 2024): x + out_proj((softmax(q q^T s) + softmax(k k^T s)) v), then
    the layer's residual MLP;
  * clearclip (Lan et al. 2024): out_proj(softmax(q q^T s) v);
  * naclip (Hajimiri et al. 2025): out_proj(softmax(k k^T s + omega) v), omega a Gaussian
    of the distance between patches on the grid (0 at the class token).

CLIP maps the result through post_layernorm and visual_projection; SigLIP through
post_layernorm and its attention-pooling head with each token attending only to itself
(the head's value projection, out_proj, then its residual MLP). The restatement itself
is checked first: its ordinary last layer reproduces `transformers`, its per-token head
reproduces the pooling head on one-token sequences, and its MaskCLIP the existing one.
"""

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from reldistill_jax.models import vit, vit_import

# The optional `parity` extra.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # relative: max |ours - ref| / max |ref|
SELF_TOL = 1e-6  # the torch restatement against the torch modules
RULES = ("maskclip", "sclip", "clearclip", "naclip")
SIZES = ((32, 32), (32, 48))


def _images(shape, seed=0):
  """Random normalised images: (NHWC numpy for JAX, NCHW torch tensor)."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _apply(config, params, images):
  with jax.default_matmul_precision("float32"):
    features, aux = jax.jit(vit.ViT(config).apply)({"params": params}, images)
  return np.asarray(features), {k: np.asarray(v) for k, v in aux.items()}


def _rel_err(ours, ref) -> float:
  ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
  ours = ours.detach().numpy() if hasattr(ours, "detach") else np.asarray(ours)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert ours.dtype == np.float32 and ref.dtype == np.float32, (ours.dtype, ref.dtype)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _perturb(model):
  """Moves LayerNorms, biases and position embeddings away from their init.

  Random init leaves LayerNorms at identity and most biases at zero, which
  would hide a missing bias (the key bias matters to k k^T attention) or norm.
  """
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
    model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.5)


def _save(model, tmp_path_factory, name):
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """A tiny random CLIPModel (vision: width 64, 2 heads, 2 layers, patch 8, image 32)."""
  torch.manual_seed(10)
  config = transformers.CLIPConfig(
    text_config=dict(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ),
    vision_config=dict(
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=128,
      patch_size=8,
      image_size=32,
    ),
    projection_dim=24,
  )
  model = transformers.CLIPModel(config).eval()
  _perturb(model)
  return _save(model, tmp_path_factory, "clip")


def tiny_siglip(seed: int):
  """A tiny random SiglipModel (vision: width 96, 2 heads, 2 layers, patch 8, image 32)."""
  torch.manual_seed(seed)
  config = transformers.SiglipConfig(
    text_config=dict(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=64,
      vocab_size=1000,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
    ),
    vision_config=dict(
      hidden_size=96,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=160,
      patch_size=8,
      image_size=32,
    ),
  )
  return transformers.SiglipModel(config).eval()


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  model = tiny_siglip(11)
  _perturb(model)
  return _save(model, tmp_path_factory, "siglip")


@pytest.fixture(scope="module")
def towers(clip, siglip):
  return {"clip": clip, "siglip": siglip}


def _neighbourhood(grid, prefix, std):
  """NACLIP's omega (T, T): exp(-d^2 / (2 std^2)) between patches, 0 at prefix tokens."""
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])  # row-major patch order
  d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
  omega = np.zeros((prefix + d2.shape[0],) * 2)
  omega[prefix:, prefix:] = np.exp(-d2 / (2.0 * std**2))
  return torch.from_numpy(omega.astype(np.float32))


def _restated_last_layer(layer, x, rule, grid, prefix, std=5.0):
  """The last encoder layer under a dense rule ("standard": as the layer itself).

  Args:
    layer: a CLIPEncoderLayer or SiglipEncoderLayer.
    x: (B, T, C) its input, T = prefix + grid[0] * grid[1].
    rule: "standard" or one of RULES.
    grid: (h, w) patch grid.
    prefix: 1 with a class token (CLIP), 0 without (SigLIP).
    std: NACLIP's Gaussian standard deviation, in patches.

  Returns:
    (B, T, C), the layer's output under the rule.
  """
  b, t, c = x.shape
  attn = layer.self_attn
  heads = attn.num_heads
  split = lambda z: z.reshape(b, t, heads, c // heads).transpose(1, 2)  # (B, heads, T, hd)
  h = layer.layer_norm1(x)
  q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
  s = (c // heads) ** -0.5
  logits = lambda a, b: a @ b.transpose(-1, -2) * s  # (B, heads, T, T)
  weights = {
    "maskclip": None,
    "standard": lambda: torch.softmax(logits(q, k), -1),
    "sclip": lambda: torch.softmax(logits(q, q), -1) + torch.softmax(logits(k, k), -1),
    "clearclip": lambda: torch.softmax(logits(q, q), -1),
    "naclip": lambda: torch.softmax(logits(k, k) + _neighbourhood(grid, prefix, std), -1),
  }[rule]
  mixed = v if weights is None else weights() @ v
  y = attn.out_proj(mixed.transpose(1, 2).reshape(b, t, c))
  if rule in ("standard", "sclip"):
    y = x + y
    y = y + layer.mlp(layer.layer_norm2(y))
  return y


def _siglip_head_per_token(head, t):
  """SigLIP's pooling head with each token attending to itself: (B, T, C) -> (B, T, C)."""
  c = t.shape[-1]
  w_v = head.attention.in_proj_weight[2 * c :]  # the value third of the packed projection
  b_v = head.attention.in_proj_bias[2 * c :]
  u = head.attention.out_proj(t @ w_v.T + b_v)
  return u + head.mlp(head.layernorm(u))


def _hidden_states(model, pixels):
  """The vision tower's hidden states (input of layer 0, ..., output of the last layer)."""
  interpolate = pixels.shape[-2:] != (32, 32)
  out = model.vision_model(
    pixel_values=pixels, interpolate_pos_encoding=interpolate, output_hidden_states=True
  )
  assert len(out.hidden_states) == model.vision_model.config.num_hidden_layers + 1
  return out.hidden_states


def _dense_reference(tower, model, pixels, rule, std=5.0):
  """(B, h, w, D) dense features of a rule, from the torch modules."""
  b, _, height, width = pixels.shape
  vision = model.vision_model
  p = vision.config.patch_size
  grid = (height // p, width // p)
  prefix = 1 if tower == "clip" else 0
  with torch.no_grad():
    x = _hidden_states(model, pixels)[-2]  # the input of the last layer
    y = _restated_last_layer(vision.encoder.layers[-1], x, rule, grid, prefix, std)
    t = vision.post_layernorm(y)
    if tower == "clip":
      dense = model.visual_projection(t)[:, 1:]
    else:
      dense = _siglip_head_per_token(vision.head, t)
  return dense.reshape(b, *grid, -1)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("size", SIZES)
def test_restated_last_layer_reproduces_transformers(towers, tower, size):
  model, _ = towers[tower]
  _, pixels = _images((2, *size, 3), seed=1)
  p = model.vision_model.config.patch_size
  grid = (size[0] // p, size[1] // p)
  with torch.no_grad():
    hidden = _hidden_states(model, pixels)
    y = _restated_last_layer(
      model.vision_model.encoder.layers[-1], hidden[-2], "standard", grid, int(tower == "clip")
    )
  assert _rel_err(y, hidden[-1]) <= SELF_TOL


def test_siglip_head_per_token_is_the_head_on_one_token(siglip):
  model, _ = siglip
  _, pixels = _images((2, 32, 48, 3), seed=2)
  head = model.vision_model.head
  with torch.no_grad():
    t = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    alone = torch.stack([head(t[:, i : i + 1]) for i in range(t.shape[1])], dim=1)
    per_token = _siglip_head_per_token(head, t)
  assert _rel_err(per_token, alone) <= SELF_TOL


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_rules_are_far_apart(towers, tower):
  """The rules (and NACLIP's window) differ far beyond the tolerance, so a swap would fail."""
  model, _ = towers[tower]
  _, pixels = _images((1, 32, 48, 3), seed=3)
  refs = {rule: _dense_reference(tower, model, pixels, rule) for rule in RULES}
  refs["naclip_std2"] = _dense_reference(tower, model, pixels, "naclip", std=2.0)
  for a, b in itertools.combinations(refs, 2):
    assert _rel_err(refs[a], refs[b]) > 1e3 * TOL, (a, b)


@pytest.mark.parametrize("size", SIZES)
def test_clip_maskclip_restatement_matches_existing(clip, size):
  model, folder = clip
  config, params = vit_import.load_clip_vision(folder)
  assert config.dense_output == "maskclip"
  images, pixels = _images((2, *size, 3), seed=4)
  features, aux = _apply(config, params, images)
  ref = _dense_reference("clip", model, pixels, "maskclip")
  assert _rel_err(features, ref) <= TOL
  if "maskclip" in aux:  # the default features, also kept under their name by some versions
    assert _rel_err(aux["maskclip"], ref) <= TOL


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
  "rule, std", [*((r, None) for r in RULES), ("naclip", 2.0)], ids=[*RULES, "naclip_std2"]
)
def test_dense_rule_matches_restatement(towers, tower, size, rule, std):
  model, folder = towers[tower]
  config, params = vit_import.load(folder)
  if std is None:
    assert config.naclip_std == 5.0
    config = dataclasses.replace(config, dense_output=rule)
  else:
    config = dataclasses.replace(config, dense_output=rule, naclip_std=std)
  images, pixels = _images((2, *size, 3), seed=5)
  features, _ = _apply(config, params, images)
  ref = _dense_reference(tower, model, pixels, rule, std=config.naclip_std)
  channels = 24 if tower == "clip" else 96  # CLIP's projection_dim, SigLIP's width
  assert features.shape == (2, size[0] // 8, size[1] // 8, channels)
  assert _rel_err(features, ref) <= TOL
