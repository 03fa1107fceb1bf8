"""The JAX CLIP text tower against transformers' CLIPModel.get_text_features.

Tiny random CLIP models (hidden 64, 2 layers, 4 heads, projection 32) with
the vocabulary of `test_clip_tokenizer.py`, saved in the transformers layout
and rewritten in open_clip's, are loaded with `clip_text.load_clip_text`; the
projected features of the same texts must agree to 1e-4 in float32.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import save_file  # noqa: E402
from test_clip_tokenizer import CLASS_NAMES, HARD, TEMPLATES, write_vocabulary  # noqa: E402

from reldistill_jax.models import checkpoints, clip_text, clip_tokenizer  # noqa: E402
from reldistill_jax.models.checkpoints import CheckpointError  # noqa: E402

TEXTS = [t.format(c) for t in TEMPLATES[::3] for c in CLASS_NAMES[::2]] + list(HARD)
ATOL = 1e-4


def _tiny_clip(folder: pathlib.Path, eos_token_id: int, hidden_act: str, seed: int):
  """A random transformers CLIPModel saved to folder with the test vocabulary."""
  vocab_size = write_vocabulary(folder)
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=vocab_size,
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=77,
      hidden_act=hidden_act,
      bos_token_id=vocab_size - 2,
      eos_token_id=eos_token_id,
      pad_token_id=vocab_size - 1,
      projection_dim=32,
    ),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=32,
      patch_size=16,
    ),
    projection_dim=32,
  )
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # weights far from the initialisation, LayerNorms included
    for name, p in model.named_parameters():
      scale = 0.3 if "embedding" in name else 0.15
      p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and "weight" in name else 0.0))
  model.save_pretrained(folder)
  return model


def _hf_features(model, folder: pathlib.Path, texts) -> np.ndarray:
  """transformers' text features of the texts after OpenAI's cleanup (ftfy, HTML), which its
  CLIPTokenizer does not apply (tests/test_clip_tokenizer_parity.py)."""
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
  inputs = tokenizer(
    [clip_tokenizer.clean_text(t) for t in texts], padding="max_length", max_length=77,
    truncation=True, return_tensors="pt",
  )  # fmt: skip
  with torch.no_grad():
    out = model.get_text_features(**inputs)
  return out.pooler_output.numpy()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A tiny CLIP pooling at eos_token_id (current configs), quick_gelu."""
  folder = tmp_path_factory.mktemp("clip_eos")
  vocab_size = write_vocabulary(folder)
  return _tiny_clip(folder, eos_token_id=vocab_size - 1, hidden_act="quick_gelu", seed=0), folder


def test_transformers_layout_matches_get_text_features(hf_model):
  model, folder = hf_model
  config, params, tokenizer = clip_text.load_clip_text(folder)
  assert config.eos_token_id == tokenizer.eot_id == model.config.text_config.eos_token_id
  assert config.hidden_act == "quick_gelu"
  assert (config.width, config.layers, config.heads, config.embed_dim) == (64, 2, 4, 32)
  ours = clip_text.encode_text(params, config, tokenizer, TEXTS, batch_size=16)
  expected = _hf_features(model, folder, TEXTS)
  assert ours.shape == (len(TEXTS), 32) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)
  assert np.abs(expected).max() > 0.5  # not a near-zero output that any model would match


def test_legacy_eos_id_2_pools_at_argmax_with_gelu(tmp_path):
  """Configs with eos_token_id 2 pool at the largest id, as transformers does."""
  model = _tiny_clip(tmp_path, eos_token_id=2, hidden_act="gelu", seed=1)
  config, params, tokenizer = clip_text.load_clip_text(tmp_path)
  assert config.eos_token_id is None and config.hidden_act == "gelu"
  ours = clip_text.encode_text(params, config, tokenizer, TEXTS)
  np.testing.assert_allclose(ours, _hf_features(model, tmp_path, TEXTS), atol=ATOL, rtol=0)


def test_module_outputs_and_text_only_checkpoint(tmp_path):
  """TextTransformer.apply on tokenizer ids; CLIPTextModelWithProjection layout."""
  vocab_size = write_vocabulary(tmp_path / "full")
  model = _tiny_clip(tmp_path / "full", vocab_size - 1, "quick_gelu", seed=2)
  text_model = transformers.CLIPTextModelWithProjection(model.config.text_config).eval()
  text_model.text_model.load_state_dict(model.text_model.state_dict())
  text_model.text_projection.load_state_dict(model.text_projection.state_dict())
  text_model.save_pretrained(tmp_path / "text")
  # transformers 5 writes its tokenizer as tokenizer.json only.
  transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "full")).save_pretrained(
    str(tmp_path / "text")
  )
  config, params, tokenizer = clip_text.load_clip_text(tmp_path / "text")
  ids = tokenizer(TEXTS[:8])
  features, aux = clip_text.TextTransformer(config).apply(params, ids)
  assert aux["tokens"].shape == (8, 77, 64) and aux["pooled"].shape == (8, 64)
  with torch.no_grad():
    expected = text_model(input_ids=torch.from_numpy(ids.astype(np.int64)))
  np.testing.assert_allclose(features, expected.text_embeds.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(aux["tokens"], expected.last_hidden_state.numpy(), atol=ATOL, rtol=0)
  # bfloat16 compute keeps float32 parameters and output, close to float32.
  half, _ = clip_text.TextTransformer(config, dtype=jnp.bfloat16).apply(params, ids)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, features, atol=0.1 * np.abs(features).max())


def _open_clip_state(model) -> dict[str, np.ndarray]:
  """The text tower of a transformers CLIPModel renamed to open_clip's CLIP names."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  t = "text_model."
  out = {
    "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
    "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
    "ln_final.weight": sd[t + "final_layer_norm.weight"],
    "ln_final.bias": sd[t + "final_layer_norm.bias"],
    "text_projection": sd["text_projection.weight"].T.copy(),  # (width, embed), x @ P
    "attn_mask": np.triu(np.full((77, 77), -np.inf, np.float32), 1),
    "logit_scale": np.array(4.6, np.float32),
    "visual.proj": np.zeros((32, 32), np.float32),
  }
  for i in range(model.config.text_config.num_hidden_layers):
    hf, oc = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
    qkv = ("q", "k", "v")
    out[oc + "attn.in_proj_weight"] = np.concatenate(
      [sd[f"{hf}self_attn.{n}_proj.weight"] for n in qkv]
    )
    out[oc + "attn.in_proj_bias"] = np.concatenate(
      [sd[f"{hf}self_attn.{n}_proj.bias"] for n in qkv]
    )
    pairs = {
      "attn.out_proj": "self_attn.out_proj",
      "ln_1": "layer_norm1",
      "ln_2": "layer_norm2",
      "mlp.c_fc": "mlp.fc1",
      "mlp.c_proj": "mlp.fc2",
    }
    for ours, theirs in pairs.items():
      for leaf in ("weight", "bias"):
        out[f"{oc}{ours}.{leaf}"] = sd[f"{hf}{theirs}.{leaf}"]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def test_open_clip_layout_matches(tmp_path):
  """open_clip names, fused q/k/v, (width, embed) projection, the OpenAI gz tokenizer."""
  vocab_size = write_vocabulary(tmp_path / "hf")
  model = _tiny_clip(tmp_path / "hf", vocab_size - 1, "quick_gelu", seed=3)
  expected = _hf_features(model, tmp_path / "hf", TEXTS)
  folder = tmp_path / "open_clip"
  folder.mkdir()
  save_file(_open_clip_state(model), str(folder / "open_clip_model.safetensors"))
  gz = tmp_path / "hf" / clip_tokenizer.OPENAI_BPE_FILE
  (folder / clip_tokenizer.OPENAI_BPE_FILE).write_bytes(gz.read_bytes())
  # Heads are not in the shapes: from the argument, then from open_clip_config.json.
  config, params, tokenizer = clip_text.load_clip_text(folder, heads=4)
  assert config.eos_token_id is None and tokenizer.pad_id == 0
  assert (config.vocab_size, config.width, config.layers, config.mlp_dim) == (
    vocab_size,
    64,
    2,
    128,
  )
  ours = clip_text.encode_text(params, config, tokenizer, TEXTS)
  np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)
  (folder / "open_clip_config.json").write_text(
    json.dumps({"model_cfg": {"quick_gelu": True, "text_cfg": {"heads": 4, "width": 64}}})
  )
  config, params, tokenizer = clip_text.load_clip_text(folder / "open_clip_model.safetensors")
  assert config.heads == 4 and config.hidden_act == "quick_gelu"
  np.testing.assert_allclose(
    clip_text.encode_text(params, config, tokenizer, TEXTS), expected, atol=ATOL, rtol=0
  )
  # Without quick_gelu in its config, open_clip builds nn.GELU: a different model.
  (folder / "open_clip_config.json").write_text(
    json.dumps({"model_cfg": {"text_cfg": {"heads": 4}}})
  )
  config, params, tokenizer = clip_text.load_clip_text(folder)
  assert config.hidden_act == "gelu"
  assert np.abs(clip_text.encode_text(params, config, tokenizer, TEXTS) - expected).max() > 1e-2


def test_errors_name_the_problem(tmp_path, hf_model):
  _, good = hf_model
  with pytest.raises(CheckpointError, match="not found"):
    clip_text.load_clip_text(tmp_path / "absent")
  # A DINOv2 folder: the error says what it found.
  dino = tmp_path / "dinov2"
  dino.mkdir()
  (dino / "config.json").write_text(
    json.dumps({"model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": 384})
  )
  save_file(
    {"embeddings.cls_token": np.zeros((1, 1, 384), np.float32)}, str(dino / "model.safetensors")
  )
  with pytest.raises(CheckpointError, match="found model_type 'dinov2'.*Dinov2Model"):
    clip_text.load_clip_text(dino)
  with pytest.raises(CheckpointError, match="no token_embedding.weight.*embeddings"):
    clip_text.load_clip_text(dino / "model.safetensors")
  # A weight of the wrong shape: named with both shapes.
  bad = tmp_path / "bad"
  bad.mkdir()
  for name in ("config.json", "vocab.json", "merges.txt"):
    (bad / name).write_bytes((good / name).read_bytes())
  tensors = checkpoints.read_safetensors(good / "model.safetensors")
  name = "text_model.encoder.layers.1.mlp.fc1.weight"
  tensors[name] = tensors[name][:100]
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(CheckpointError, match=rf"{name} has shape \(100, 64\).*\(128, 64\)"):
    clip_text.load_clip_text(bad)
  tensors = checkpoints.read_safetensors(good / "model.safetensors")
  del tensors["text_projection.weight"]
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(CheckpointError, match="text_projection.weight not found"):
    clip_text.from_transformers(bad)
  # Weights without a tokenizer.
  (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
  (bad / "vocab.json").unlink()
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    clip_text.load_clip_text(bad)
  # The model pools at an id that is not the tokenizer's end token.
  cfg = json.loads((good / "config.json").read_text())
  cfg["text_config"]["eos_token_id"] = 7
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="pools at eos_token_id 7"):
    clip_text.load_clip_text(bad, tokenizer_path=good)
