"""The SigLIP text towers and SigLIP 2's tokenizer against transformers.

No Gemma vocabulary ships with the repository, so a small Gemma-style
`tokenizer.json` is learned here with the `tokenizers` library (BPE with byte
fallback, `<0xNN>` byte tokens, the `Replace(" ", "▁")` normaliser, special
tokens <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4), next to the
`tokenizer_config.json` a SigLIP 2 checkpoint ships (transformers'
convert_siglip2_to_hf.py saves Gemma's tokenizer with add_bos_token=False,
add_eos_token=True, padding_side="right", model_input_names=["input_ids"];
model_max_length 64). Our rows must equal those of transformers'
`Siglip2Tokenizer` called as the SigLIP 2 processor calls it, and tiny random
`SiglipModel` / `Siglip2Model` text towers loaded with `load_clip_text` must
reproduce `get_text_features(input_ids=...)` to 1e-5 relative in float32.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from safetensors.numpy import save_file  # noqa: E402
from test_clip_tokenizer_parity import BLOCKS, REPAIRS  # noqa: E402

from reldistill_jax import classes, prompts  # noqa: E402
from reldistill_jax.models import checkpoints, clip_text, siglip_tokenizer  # noqa: E402
from reldistill_jax.models.checkpoints import CheckpointError  # noqa: E402

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
LENGTH = 64
RTOL = 1e-5
# The tokenizer_config.json of a SigLIP 2 checkpoint (the keys that matter here).
SHIPPED_CONFIG = {
  "add_bos_token": False,
  "add_eos_token": True,
  "bos_token": "<bos>",
  "eos_token": "<eos>",
  "pad_token": "<pad>",
  "unk_token": "<unk>",
  "mask_token": "<mask>",
  "model_max_length": LENGTH,
  "padding_side": "right",
  "model_input_names": ["input_ids"],
  "tokenizer_class": "GemmaTokenizer",
  "clean_up_tokenization_spaces": False,
  "added_tokens_decoder": {
    str(i): {
      "content": t, "lstrip": False, "normalized": False, "rstrip": False,
      "single_word": False, "special": True,
    }
    for i, t in enumerate(SPECIALS)
  },
}  # fmt: skip
WORDS = [c for c in classes.NUSCENES_CLASSES] + ["the", "a", "photo", "of", "street", "Car's"]


def _corpus() -> list[str]:
  texts = [t.format(c) for t in prompts.TEMPLATES for c in classes.NUSCENES_CLASSES]
  texts += [t.upper() for t in texts[::7]] + [t.title() for t in texts[::5]]
  return texts + list(REPAIRS) + ["Фото автомобиля, 汽车的照片, 車の写真, Straße, Ærø"] * 5


def _gemma_style_tokenizer() -> tokenizers.Tokenizer:
  """A BPE learned on the corpus, laid out as Gemma's: specials, 256 byte tokens, merges."""
  from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

  learner = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  learner.normalizer = normalizers.Replace(" ", "▁")
  learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
  learner.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=800, show_progress=False))
  learned = json.loads(learner.to_str())["model"]
  vocab = {t: i for i, t in enumerate(SPECIALS)}
  vocab |= {f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)}
  for token in sorted(learned["vocab"], key=learned["vocab"].get):
    vocab.setdefault(token, len(vocab))
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
  model = models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.normalizer = normalizers.Replace(" ", "▁")
  tokenizer.decoder = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  )
  tokenizer.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS]
  )
  return tokenizer


def _template(single: str) -> tokenizers.processors.TemplateProcessing:
  ids = {t: i for i, t in enumerate(SPECIALS)}
  specials = [(t, ids[t]) for t in SPECIALS if t in single]
  pair = f"{single} {single.replace('$A', '$B').replace(':0', ':1')}"
  return tokenizers.processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def write_tokenizer(folder: pathlib.Path, base, post="$A:0 <eos>:0", config=None, padding=None):
  """Writes tokenizer.json (with a post-processor and saved padding) and tokenizer_config.json."""
  folder.mkdir(parents=True, exist_ok=True)
  tokenizer = tokenizers.Tokenizer.from_str(base.to_str())
  if post:
    tokenizer.post_processor = _template(post)
  if padding:
    tokenizer.enable_padding(direction=padding, pad_id=0, pad_token="<pad>", length=LENGTH)
  tokenizer.save(str(folder / "tokenizer.json"))
  config = SHIPPED_CONFIG if config is None else config
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return tokenizer.get_vocab_size()


def _strings() -> list[str]:
  """Prompts, mixed case, Unicode from several blocks, special-token text, long captions."""
  rng = np.random.default_rng(0)
  texts = [t.format(c) for t in prompts.TEMPLATES for c in classes.SEMANTIC_KITTI_CLASSES[::2]]
  texts += list(REPAIRS) + ["", " ", "  a  photo \t of\na car  ", "a <mask> of a <eos> <EOS> <bos>"]
  while len(texts) < 2_100:
    kind = len(texts) % 4
    if kind == 0:  # random code points from the blocks
      lo, hi = BLOCKS[rng.integers(len(BLOCKS))]
      texts.append("".join(map(chr, rng.integers(lo, hi + 1, rng.integers(1, 25)))))
    elif kind == 1:  # prompts in random case
      text = prompts.TEMPLATES[rng.integers(len(prompts.TEMPLATES))].format(
        WORDS[rng.integers(len(WORDS))]
      )
      flips = rng.random(len(text)) < 0.3
      texts.append("".join(c.upper() if f else c for c, f in zip(text, flips, strict=True)))
    elif kind == 2:  # words mixed with the repairs' characters
      parts = [WORDS[i] for i in rng.integers(len(WORDS), size=rng.integers(1, 8))]
      parts.insert(int(rng.integers(len(parts) + 1)), REPAIRS[rng.integers(len(REPAIRS))])
      texts.append(" ".join(parts))
    else:  # long captions, beyond 64 tokens
      parts = [WORDS[i] for i in rng.integers(len(WORDS), size=rng.integers(40, 120))]
      texts.append(" ".join(parts) + ".")
  return texts


def _hf_ids(folder: pathlib.Path, texts, cls=None) -> np.ndarray:
  """transformers' ids, as the SigLIP 2 processor asks for them."""
  tokenizer = (cls or transformers.Siglip2Tokenizer).from_pretrained(str(folder))
  out = tokenizer(list(texts), padding="max_length", max_length=LENGTH, truncation=True)
  return np.asarray(out["input_ids"])


@pytest.fixture(scope="module")
def gemma():
  return _gemma_style_tokenizer()


@pytest.fixture(scope="module")
def shipped(gemma, tmp_path_factory):
  folder = tmp_path_factory.mktemp("siglip2_tokenizer")
  write_tokenizer(folder, gemma)
  return folder


def test_equals_transformers_on_2000_strings(shipped):
  texts = _strings()
  assert len(texts) >= 2_000
  ours = siglip_tokenizer.load_tokenizer(shipped)(texts)
  expected = _hf_ids(shipped, texts)
  assert ours.shape == (len(texts), LENGTH) and ours.dtype == np.int32
  mismatched = [t for t, a, b in zip(texts, ours, expected, strict=True) if (a != b).any()]
  assert not mismatched, (len(mismatched), mismatched[:5])
  # What the rows hold: the end token after every text (kept when cut), padding on the right,
  # and the byte tokens for characters outside the vocabulary.
  assert (ours == 1).any(axis=1).all()
  assert (ours[:, -1] == 1).sum() > 300 and (ours[:, -1] == 0).sum() > 1_000
  assert ((ours >= len(SPECIALS)) & (ours < len(SPECIALS) + 256)).any(axis=1).sum() > 300


def test_lowercases_and_decodes(shipped):
  tokenizer = siglip_tokenizer.load_tokenizer(shipped)
  rows = tokenizer(["A Photo Of The CAR.", "a photo of the car."])
  np.testing.assert_array_equal(rows[0], rows[1])
  assert tokenizer.decode(rows[0]) == "a photo of the car."
  assert tokenizer.encode("a photo")[-1] == tokenizer.eos_id == 1 and tokenizer.pad_id == 0
  assert tokenizer(["x" * 10], 8).shape == (1, 8)


# Settings read from the files, each against transformers: (post-processor saved in
# tokenizer.json, padding saved there, tokenizer_config.json, special_tokens_map.json).
NO_SIDE = {k: v for k, v in SHIPPED_CONFIG.items() if k != "padding_side"}
VARIANTS = {
  # The template saved in tokenizer.json wins over add_bos_token / add_eos_token.
  "file_template_kept": ("<bos>:0 $A:0", None, SHIPPED_CONFIG, None),
  # No padding side anywhere: the class default, left.
  "left_padding_by_default": ("<bos>:0 $A:0 <eos>:0", None, NO_SIDE, None),
  # The padding side saved in tokenizer.json; no template: no special tokens.
  "file_padding_side_no_template": (None, "right", {**NO_SIDE, "add_bos_token": True}, None),
  # Without added_tokens_decoder, special_tokens_map.json names the tokens (here: pad with <unk>).
  "special_tokens_map": (
    "$A:0 <eos>:0", None,
    {k: v for k, v in SHIPPED_CONFIG.items() if k not in ("added_tokens_decoder", "pad_token")},
    {"pad_token": {"content": "<unk>", "special": True}},
  ),
}  # fmt: skip
# What each variant's first (short) row starts and ends with.
ENDS = {
  "file_template_kept": (2, 0),
  "left_padding_by_default": (0, 1),
  "file_padding_side_no_template": (None, 0),
  "special_tokens_map": (None, 3),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_settings_read_from_the_files(gemma, tmp_path, variant):
  post, padding, config, tokens_map = VARIANTS[variant]
  write_tokenizer(tmp_path, gemma, post=post, config=config, padding=padding)
  if tokens_map:
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(tokens_map))
  texts = _strings()[::8]
  ours = siglip_tokenizer.load_tokenizer(tmp_path)(texts)
  np.testing.assert_array_equal(ours, _hf_ids(tmp_path, texts))
  first, last = ENDS[variant]
  assert ours[0, -1] == last and (first is None or ours[0, 0] == first)
  if variant == "file_padding_side_no_template":
    assert not np.isin(ours, [1, 2]).any()


def _perturb(model, seed: int):
  """Weights far from the initialisation: LayerNorms, position embeddings, the head's bias."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.3 if "embedding" in name else 0.15
      p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and "weight" in name else 0.0))


def _tiny_siglip(folder: pathlib.Path, gemma, model_type: str, seed: int):
  """A random SiglipModel or Siglip2Model (text: width 64, 2 layers, 4 heads, head 48) saved
  to folder with the tokenizer files."""
  vocab_size = write_tokenizer(folder, gemma)
  text = dict(
    vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=LENGTH, projection_size=48,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
  )  # fmt: skip
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  if model_type == "siglip":
    config = transformers.SiglipConfig(
      text_config=text, vision_config={**vision, "image_size": 32, "patch_size": 16}
    )
    model = transformers.SiglipModel(config)
  else:
    config = transformers.Siglip2Config(
      text_config=text, vision_config={**vision, "num_patches": 16, "patch_size": 16}
    )
    model = transformers.Siglip2Model(config)
  model.eval()
  _perturb(model, seed)
  model.save_pretrained(folder, safe_serialization=True)
  return model


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def siglip(request, gemma, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  return request.param, _tiny_siglip(folder, gemma, request.param, seed=len(request.param)), folder


def _relative(a: np.ndarray, b: np.ndarray) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / np.abs(b).max())


TEXTS = _strings()[:40:3] + ["a photo of a Car.", " ".join(WORDS * 6), "", "ÉCOLE İstanbul 🚗"]


def test_get_text_features(siglip):
  """encode_text equals get_text_features(input_ids=...) on the processor's ids, long text too."""
  model_type, model, folder = siglip
  config, params, tokenizer = clip_text.load_clip_text(folder)
  assert (config.causal, config.pool, config.projection_bias) == (False, "last", True)
  assert (config.width, config.layers, config.heads, config.embed_dim) == (64, 2, 4, 48)
  assert (config.context_length, config.hidden_act) == (LENGTH, "gelu_pytorch_tanh")
  assert isinstance(tokenizer, siglip_tokenizer.Tokenizer)
  ids = _hf_ids(folder, TEXTS)
  np.testing.assert_array_equal(tokenizer(TEXTS), ids)
  assert (ids[:, -1] == 1).sum() == 1  # one text fills the context
  ours = clip_text.encode_text(params, config, tokenizer, TEXTS, batch_size=8)
  with torch.no_grad():
    expected = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
  assert ours.shape == (len(TEXTS), 48) and ours.dtype == np.float32
  assert _relative(ours, expected) < RTOL, (model_type, _relative(ours, expected))
  assert np.abs(expected).max() > 0.5 and np.abs(expected[0] - expected[1]).max() > 1e-2


def test_module_outputs(siglip):
  """TextTransformer.apply: tokens after the final LayerNorm, last-position pooling, bfloat16."""
  _, model, folder = siglip
  config, params, tokenizer = clip_text.load_clip_text(folder)
  ids = tokenizer(TEXTS[:4])
  features, aux = jax.jit(clip_text.TextTransformer(config).apply)(params, ids)
  with torch.no_grad():
    out = model.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)))
  assert aux["tokens"].shape == (4, LENGTH, 64) and aux["pooled"].shape == (4, 64)
  assert _relative(np.asarray(aux["tokens"]), out.last_hidden_state.numpy()) < RTOL
  np.testing.assert_array_equal(aux["pooled"], aux["tokens"][:, -1])
  assert _relative(np.asarray(features), out.pooler_output.numpy()) < RTOL
  half, _ = jax.jit(clip_text.TextTransformer(config, dtype=jnp.bfloat16).apply)(params, ids)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, features, atol=0.1 * np.abs(features).max())


def test_fixed_resolution_layout_lowercases_unlike_gemma_tokenizer(siglip):
  """transformers picks Siglip2Tokenizer for siglip2 folders and the declared GemmaTokenizer
  (no lowercasing) for siglip ones; ours lowercases for both and equals Gemma's on lowercase."""
  model_type, _, folder = siglip
  auto = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert (
    type(auto).__name__ == {"siglip": "GemmaTokenizer", "siglip2": "Siglip2Tokenizer"}[model_type]
  )
  tokenizer = siglip_tokenizer.load_tokenizer(folder)
  lower = [t.lower() for t in TEXTS]
  gemma_ids = _hf_ids(folder, lower, cls=transformers.GemmaTokenizer)
  np.testing.assert_array_equal(tokenizer(TEXTS), gemma_ids)
  assert (_hf_ids(folder, TEXTS, cls=transformers.GemmaTokenizer) != gemma_ids).any()


def test_errors_name_the_file(siglip, tmp_path):
  _, _, good = siglip
  folder = tmp_path / "siglip_v1"
  folder.mkdir()
  for name in ("config.json", "model.safetensors"):
    (folder / name).write_bytes((good / name).read_bytes())
  (folder / "spiece.model").write_bytes(b"\x00")
  with pytest.raises(
    CheckpointError, match=r"tokenizer.json: not found.*spiece.model is SigLIP v1"
  ):
    clip_text.load_clip_text(folder)
  (folder / "spiece.model").unlink()
  with pytest.raises(CheckpointError, match=r"tokenizer.json: not found; SigLIP text towers need"):
    clip_text.load_clip_text(folder)
  # A tokenizer.json of another model type (SigLIP v1's converted SentencePiece is a Unigram).
  unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([("<pad>", 0.0), ("a", -1.0)], 0))
  unigram.save(str(folder / "tokenizer.json"))
  with pytest.raises(CheckpointError, match="holds a Unigram model, not SigLIP 2's Gemma BPE"):
    clip_text.load_clip_text(folder)
  (folder / "tokenizer.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="tokenizer.json: unreadable tokenizer file"):
    siglip_tokenizer.load_tokenizer(folder)
  # A head without its bias, and a model that embeds fewer tokens than the tokenizer has.
  (folder / "tokenizer.json").write_bytes((good / "tokenizer.json").read_bytes())
  tensors = checkpoints.read_safetensors(good / "model.safetensors")
  del tensors["text_model.head.bias"]
  save_file(tensors, str(folder / "model.safetensors"))
  with pytest.raises(CheckpointError, match="text_model.head.bias not found"):
    clip_text.load_clip_text(folder)
  (folder / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
  (folder / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<new_mask>"}))
  with pytest.raises(CheckpointError, match=r"the tokenizer has \d+ tokens, the model embeds"):
    clip_text.load_clip_text(folder)
