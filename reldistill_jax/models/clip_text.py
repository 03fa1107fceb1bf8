r"""The CLIP text tower in JAX: tokenizer, transformer and checkpoint import.

Tokenizer. CLIP's byte-level BPE, as OpenAI's `simple_tokenizer.py`:
  1. cleanup: `ftfy.fix_text` (mojibake, typographic quotes, fullwidth forms,
     ligatures, control characters, NFC), HTML entities unescaped twice,
     whitespace runs (Python's `\s`) collapsed to one space, ends stripped,
     lowercased. transformers' `CLIPTokenizer` (5.x) applies only NFC,
     whitespace and lowercasing, so it differs from OpenAI's on such text;
  2. pre-tokenisation with OpenAI's pattern and flags (the `regex` package,
     IGNORECASE)
     `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`;
  3. each piece's UTF-8 bytes mapped to printable characters (GPT-2's
     byte-to-unicode table), the last one suffixed with `</w>`, then merged
     pair by pair in merge-rank order;
  4. `<|startoftext|>` + ids + `<|endoftext|>`, truncated to the context
     length (the end token kept) and padded.
Tested equal to OpenAI's `SimpleTokenizer` on over 10,000 strings, and to
transformers' `CLIPTokenizer` on the cleaned text (`tests/test_clip_tokenizer_parity.py`).
The vocabulary comes from `vocab.json` + `merges.txt` (transformers layout) or
is rebuilt from `bpe_simple_vocab_16e6.txt.gz` (OpenAI/open_clip layout: 256
byte tokens, their `</w>` forms, one token per merge, the two special tokens).

Transformer. Token + learned position embeddings, pre-LN causal self-attention
blocks, a final LayerNorm, the features at the end-of-text token, and a linear
projection without bias: `CLIPModel.get_text_features` of transformers (and
`encode_text` of OpenAI/open_clip), before any normalisation. The end-of-text
position is the first position holding `eos_token_id` when the transformers
config names one other than 2, else the argmax of the ids (the end token has
the largest id); open_clip always takes the argmax.

Checkpoints. `load_clip_text(path)` reads a transformers folder
(`config.json` + `model.safetensors`, `text_model.*` and
`text_projection.weight`) or an open_clip `.safetensors` file (or a folder
holding one), whose sizes are read from the tensor shapes.
"""

import dataclasses
import functools
import gzip
import html
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import ftfy
import jax
import jax.numpy as jnp
import numpy as np
import regex

from reldistill_jax.models import checkpoints
from reldistill_jax.models.checkpoints import CheckpointError

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
# Merges OpenAI's tokenizer keeps from `bpe_simple_vocab_16e6.txt.gz` (lines
# 1..48894 after the header); with 512 byte tokens and 2 specials: 49408 ids.
OPENAI_NUM_MERGES = 49152 - 256 - 2
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

# OpenAI's pre-tokenisation pattern, compiled with its flags.
_PATTERN = (
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


# ----------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's table from the 256 byte values to printable characters.

  Printable Latin-1 bytes map to themselves; the others to U+0100 onwards, in
  byte order. The order of the values is the order of the first 256 tokens.
  """
  bs = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  cs = list(bs)
  extra = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def pretokenize_pattern() -> regex.Pattern:
  """CLIP's pre-tokenisation pattern, with OpenAI's IGNORECASE flag."""
  return regex.compile(_PATTERN, regex.IGNORECASE)


def clean_text(text: str) -> str:
  """OpenAI's cleanup: ftfy, HTML unescaped twice, whitespace collapsed and stripped, lowercase."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
  """CLIP's byte-level BPE tokenizer.

  Attributes:
    encoder: token string -> id.
    context_length: L, the length of every tokenised row.
    sot_id, eot_id: ids of `<|startoftext|>` and `<|endoftext|>`.
    pad_id: id written after the end token (0 for OpenAI/open_clip, the end
      token for transformers' CLIPTokenizer; the text features do not depend
      on it since attention is causal).
  """

  def __init__(
    self,
    encoder: dict[str, int],
    merges: Sequence[tuple[str, str]],
    context_length: int = 77,
    pad_id: int = 0,
  ):
    """Builds the tokenizer from a vocabulary and its ranked merges.

    Args:
      encoder: token string -> id; holds the 512 byte tokens (with and without
        `</w>`), every merge's result and the two special tokens.
      merges: pairs in rank order (first merges first).
      context_length: L of the rows `__call__` returns (>= 2).
      pad_id: id of the padding after the end token.

    Raises:
      ValueError: if the vocabulary lacks a token the merges or bytes produce.
    """
    if context_length < 2:
      raise ValueError(
        f"context_length must leave room for the two special tokens, got {context_length}"
      )
    self.encoder = dict(encoder)
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    self.context_length = context_length
    self.pad_id = pad_id
    bytes_tokens = list(self.byte_encoder.values())
    needed = [SOT, EOT, *bytes_tokens, *(t + "</w>" for t in bytes_tokens)]
    needed += ["".join(pair) for pair in self.ranks]
    missing = [t for t in needed if t not in self.encoder]
    if missing:
      raise ValueError(
        f"the vocabulary lacks {len(missing)} tokens its bytes and merges produce, e.g. {missing[:5]}"
      )
    self.sot_id = self.encoder[SOT]
    self.eot_id = self.encoder[EOT]
    self._pattern = pretokenize_pattern()
    self._cache = {SOT: (SOT,), EOT: (EOT,)}

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def bpe(self, piece: str) -> tuple[str, ...]:
    """Merges one byte-mapped piece into tokens; the last one ends in `</w>`."""
    if piece in self._cache:
      return self._cache[piece]
    word = (*piece[:-1], piece[-1] + "</w>")
    while len(word) > 1:
      pair = min(zip(word, word[1:], strict=False), key=lambda p: self.ranks.get(p, float("inf")))
      if pair not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    self._cache[piece] = word
    return word

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without the special tokens or any truncation."""
    ids = []
    for piece in self._pattern.findall(clean_text(text)):
      if piece not in (SOT, EOT):
        piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self.bpe(piece))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids (special tokens and padding after the end dropped)."""
    tokens = []
    for i in ids:
      if i == self.eot_id:
        break
      if i != self.sot_id:
        tokens.append(self.decoder[int(i)])
    text = bytearray(self.byte_decoder[c] for c in "".join(tokens))
    return text.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """Tokenises texts into fixed-length rows.

    Args:
      texts: one text or a sequence of T texts.
      context_length: L; the tokenizer's own by default.

    Returns:
      (T, L) int32: `<|startoftext|>`, at most L - 2 text tokens (longer texts
      are cut), `<|endoftext|>`, then `pad_id`.
    """
    if isinstance(texts, str):
      texts = [texts]
    length = context_length or self.context_length
    rows = np.full((len(texts), length), self.pad_id, np.int32)
    for row, text in zip(rows, texts, strict=True):
      ids = [self.sot_id, *self.encode(text)[: length - 2], self.eot_id]
      row[: len(ids)] = ids
    return rows


def read_merges(path: str | pathlib.Path, limit: int | None = None) -> list[tuple[str, str]]:
  """Ranked merges of a `merges.txt` or gzipped `bpe_simple_vocab_16e6.txt.gz`.

  Args:
    path: the file; a first line holding `#version` is skipped.
    limit: keep only the first `limit` merges (OpenAI keeps 48894 of the gz).

  Raises:
    CheckpointError: if the file is missing or a line is not a pair.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: BPE merges file not found")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  # transformers' merges.txt starts "#version: 0.2"; OpenAI's gz starts
  # "bpe_simple_vocab_16e6.txt#version: 0.2", a line that splits into two.
  skip = 1 if lines and "#version" in lines[0] else 0
  end = skip + limit if limit else None
  merges = []
  for number, line in enumerate(lines[skip:end], start=skip + 1):
    if not line.strip():
      continue
    pair = line.split()
    if len(pair) != 2:
      raise CheckpointError(f"{path}:{number}: expected a merge pair, got {line!r}")
    merges.append((pair[0], pair[1]))
  return merges


def openai_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """The vocabulary OpenAI's CLIP builds from its merges (ids in that order)."""
  tokens = list(bytes_to_unicode().values())
  tokens += [t + "</w>" for t in tokens]
  tokens += ["".join(pair) for pair in merges]
  tokens += [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}


def _pad_token(folder: pathlib.Path) -> str:
  """The pad token a transformers tokenizer folder declares (its default: EOT)."""
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = folder / name
    if path.is_file():
      token = json.loads(path.read_text()).get("pad_token")
      if isinstance(token, dict):
        token = token.get("content")
      if isinstance(token, str):
        return token
  return EOT


def _read_tokenizer_json(path: pathlib.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocabulary and merges of a transformers `tokenizer.json` (a BPE with `</w>`)."""
  model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
  if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
    raise CheckpointError(
      f"{path}: not CLIP's BPE (model type {model.get('type')!r}, "
      f"end_of_word_suffix {model.get('end_of_word_suffix')!r})"
    )
  # Merges are "a b" strings in older files, [a, b] pairs in newer ones.
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return model["vocab"], merges


def load_tokenizer(path: str | pathlib.Path, context_length: int = 77) -> Tokenizer:
  """The tokenizer of a checkpoint folder or of a BPE merges file.

  Args:
    path: a transformers folder (`vocab.json` + `merges.txt`, or the
      `tokenizer.json` transformers 5 writes; padding as its tokenizer config
      says, by default the end token), a folder with
      `bpe_simple_vocab_16e6.txt.gz`, or that file itself (OpenAI/open_clip;
      padding 0).
    context_length: L of the tokenised rows.

  Raises:
    CheckpointError: if no tokenizer files are found or they are inconsistent.
  """
  path = pathlib.Path(path)
  try:
    if path.is_dir() and (path / "vocab.json").is_file():
      encoder = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
      merges = read_merges(path / "merges.txt")
    elif path.is_dir() and (path / "tokenizer.json").is_file():
      encoder, merges = _read_tokenizer_json(path / "tokenizer.json")
    else:
      gz = path / OPENAI_BPE_FILE if path.is_dir() else path
      if path.is_dir() and not gz.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise CheckpointError(
          f"{path}: no tokenizer files (vocab.json + merges.txt, tokenizer.json or "
          f"{OPENAI_BPE_FILE}); found {found}"
        )
      merges = read_merges(gz, limit=OPENAI_NUM_MERGES)
      return Tokenizer(openai_vocabulary(merges), merges, context_length, pad_id=0)
    pad = _pad_token(path)
    if pad not in encoder:
      raise CheckpointError(f"{path}: pad token {pad!r} is not in the vocabulary")
    return Tokenizer(encoder, merges, context_length, pad_id=encoder[pad])
  except CheckpointError:
    raise
  except (ValueError, KeyError) as e:  # malformed JSON, vocabulary lacking tokens
    raise CheckpointError(f"{path}: invalid tokenizer files ({e})") from e


# --------------------------------------------------------------- transformer


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x), the activation of OpenAI's CLIP."""
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names of the activations CLIP checkpoints use.
ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Sizes of a CLIP text tower.

  Attributes:
    vocab_size: V, rows of the token embedding.
    width: W, the residual width.
    layers: number of transformer blocks.
    heads: attention heads (W divisible by it).
    mlp_dim: hidden width of the MLPs.
    context_length: L, rows of the position embedding.
    embed_dim: D, the projected output dimension.
    hidden_act: an `ACTIVATIONS` name.
    layer_norm_eps: epsilon of every LayerNorm.
    eos_token_id: pool at the first position holding this id; None to pool at
      the argmax of the ids (OpenAI, open_clip, transformers with id 2).
  """

  vocab_size: int = 49408
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  context_length: int = 77
  embed_dim: int = 512
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int | None = None


class SelfAttention(nn.Module):
  """Causal multi-head self-attention with separate q, k, v projections."""

  width: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, _ = x.shape  # x: (B, L, W)
    head_dim = self.width // self.heads
    dense = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)
    q, k, v = (
      dense(n)(x).reshape(b, length, self.heads, head_dim) for n in ("query", "key", "value")
    )
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, L, heads, head_dim)
    return dense("out")(out.reshape(b, length, self.width))


class Block(nn.Module):
  """Pre-LN residual block: x += Attn(LN(x)); x += MLP(LN(x))."""

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    norm = lambda name: nn.LayerNorm(
      cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name=name
    )
    x = x + SelfAttention(cfg.width, cfg.heads, self.dtype, name="attn")(norm("ln_1")(x))
    h = nn.Dense(cfg.mlp_dim, dtype=self.dtype, name="mlp_fc")(norm("ln_2")(x))
    h = ACTIVATIONS[cfg.hidden_act](h)
    return x + nn.Dense(cfg.width, dtype=self.dtype, name="mlp_proj")(h)


def pool_index(ids: jax.Array, eos_token_id: int | None) -> jax.Array:
  """(B,) position of each row's end token in ids (B, L), as transformers picks it."""
  if eos_token_id is None:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == eos_token_id, axis=-1)


class TextTransformer(nn.Module):
  """The CLIP text tower: ids -> projected text features.

  Attributes:
    config: the tower's sizes.
    dtype: compute dtype (parameters stay float32).
  """

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encodes token rows.

    Args:
      ids: (B, L') int token ids, L' <= context_length, one end token per row.

    Returns:
      (features, aux): features (B, embed_dim) float32, projected, not
      normalised; aux {"tokens": (B, L', W) after the final LayerNorm,
      "pooled": (B, W) the end-token features before the projection}.
    """
    cfg = self.config
    if ids.shape[-1] > cfg.context_length:
      raise ValueError(f"{ids.shape[-1]} tokens exceed the context length {cfg.context_length}")
    if cfg.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unknown activation {cfg.hidden_act!r}; choose from {sorted(ACTIVATIONS)}")
    x = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding")(ids)  # (B, L', W)
    pos = self.param(
      "position_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width)
    )
    x = (x + pos[: ids.shape[-1]]).astype(self.dtype)
    for i in range(cfg.layers):
      x = Block(cfg, self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(
      cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name="ln_final"
    )(x)
    pooled = x[jnp.arange(x.shape[0]), pool_index(ids, cfg.eos_token_id)]  # (B, W)
    projection = self.param(
      "text_projection", nn.initializers.normal(cfg.width**-0.5), (cfg.width, cfg.embed_dim)
    )
    features = jnp.dot(pooled, projection.astype(self.dtype)).astype(jnp.float32)
    return features, {"tokens": x, "pooled": pooled}


@functools.cache
def _encode_fn(config: TextConfig):
  model = TextTransformer(config)
  return jax.jit(lambda params, ids: model.apply(params, ids)[0])


def encode_text(
  params: Any,
  config: TextConfig,
  tokenizer: Tokenizer,
  texts: Sequence[str],
  batch_size: int = 256,
) -> np.ndarray:
  """Projected CLIP text features of texts, as `CLIPModel.get_text_features`.

  Runs in float32 with full-precision matmuls, in batches of a fixed size (the
  last one padded) so one compilation serves every call.

  Args:
    params: the tower's variables ({"params": ...}).
    config: its sizes.
    tokenizer: its tokenizer.
    texts: T texts.
    batch_size: rows per device call.

  Returns:
    (T, embed_dim) float32, not normalised.
  """
  ids = tokenizer(list(texts), config.context_length)  # (T, L)
  if len(ids) == 0:
    return np.zeros((0, config.embed_dim), np.float32)
  batch_size = min(batch_size, len(ids))
  pad = -len(ids) % batch_size
  ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
  fn = _encode_fn(config)
  params = jax.device_put(params)  # once, not per batch
  with jax.default_matmul_precision("float32"):
    out = [np.asarray(fn(params, ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)]
  return np.concatenate(out)[: len(ids) - pad]


# --------------------------------------------------------------- checkpoints


# Our attention Dense names and transformers' projection names.
_QKVO = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out"))


def _variables(blocks: list[dict], **top) -> dict:
  return {"params": {**top, **{f"block{i}": b for i, b in enumerate(blocks)}}}


def _dense(kernel: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
  return {"kernel": kernel, "bias": bias}


def _norm(scale: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
  return {"scale": scale, "bias": bias}


def _read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """`model.safetensors`, or the shards a `model.safetensors.index.json` lists."""
  index = folder / "model.safetensors.index.json"
  if index.is_file() and not (folder / "model.safetensors").is_file():
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
      tensors |= checkpoints.read_safetensors(folder / shard)
    return tensors
  return checkpoints.read_safetensors(folder / "model.safetensors")


def from_transformers(folder: str | pathlib.Path) -> tuple[TextConfig, dict]:
  """Text tower of a transformers `CLIPModel` / `CLIPTextModelWithProjection` folder.

  Returns:
    (config, params) with params {"params": ...} for `TextTransformer.apply`.

  Raises:
    CheckpointError: missing files, another architecture, or shape mismatches.
  """
  folder = pathlib.Path(folder)
  raw = checkpoints.read_config(folder)
  model_type = raw.get("model_type")
  if model_type == "clip_text_model":
    text = raw
  elif isinstance(raw.get("text_config"), dict) and model_type in ("clip", None):
    text = raw["text_config"]
  else:
    raise CheckpointError(
      f"{folder}: expected a CLIP checkpoint (config.json with model_type 'clip' and a "
      f"text_config), found model_type {model_type!r}, architectures {raw.get('architectures')}"
    )
  eos = text.get("eos_token_id", 49407)
  if not isinstance(eos, int):
    raise CheckpointError(f"{folder}: eos_token_id {eos!r} is not a single id")
  config = TextConfig(
    vocab_size=text.get("vocab_size", 49408),
    width=text.get("hidden_size", 512),
    layers=text.get("num_hidden_layers", 12),
    heads=text.get("num_attention_heads", 8),
    mlp_dim=text.get("intermediate_size", 2048),
    context_length=text.get("max_position_embeddings", 77),
    embed_dim=raw.get("projection_dim", 512),
    hidden_act=text.get("hidden_act", "quick_gelu"),
    layer_norm_eps=text.get("layer_norm_eps", 1e-5),
    eos_token_id=None if eos == 2 else eos,
  )
  if config.hidden_act not in ACTIVATIONS:
    raise CheckpointError(f"{folder}: unsupported hidden_act {config.hidden_act!r}")
  tensors = _read_weights(folder)
  source = str(folder / "model.safetensors")
  w, m = config.width, config.mlp_dim
  get = lambda name, shape: checkpoints.take(tensors, name, shape, source)
  linear = lambda name, n_in, n_out: _dense(
    get(f"{name}.weight", (n_out, n_in)).T, get(f"{name}.bias", (n_out,))
  )
  layer_norm = lambda name: _norm(get(f"{name}.weight", (w,)), get(f"{name}.bias", (w,)))
  blocks = []
  for i in range(config.layers):
    p = f"text_model.encoder.layers.{i}"
    attn = {n: linear(f"{p}.self_attn.{t}_proj", w, w) for n, t in _QKVO}
    blocks.append(
      {
        "ln_1": layer_norm(f"{p}.layer_norm1"),
        "attn": attn,
        "ln_2": layer_norm(f"{p}.layer_norm2"),
        "mlp_fc": linear(f"{p}.mlp.fc1", w, m),
        "mlp_proj": linear(f"{p}.mlp.fc2", m, w),
      }
    )
  if f"text_model.encoder.layers.{config.layers}.layer_norm1.weight" in tensors:
    raise CheckpointError(f"{source}: more text layers than num_hidden_layers={config.layers}")
  params = _variables(
    blocks,
    token_embedding={
      "embedding": get("text_model.embeddings.token_embedding.weight", (config.vocab_size, w))
    },
    position_embedding=get(
      "text_model.embeddings.position_embedding.weight", (config.context_length, w)
    ),
    ln_final=layer_norm("text_model.final_layer_norm"),
    text_projection=get("text_projection.weight", (config.embed_dim, w)).T,
  )
  return config, params


_OPEN_CLIP_BLOCK_KEYS = {
  "ln_1.weight",
  "ln_1.bias",
  "attn.in_proj_weight",
  "attn.in_proj_bias",
  "attn.out_proj.weight",
  "attn.out_proj.bias",
  "ln_2.weight",
  "ln_2.bias",
  "mlp.c_fc.weight",
  "mlp.c_fc.bias",
  "mlp.c_proj.weight",
  "mlp.c_proj.bias",
}


def _open_clip_settings(path: pathlib.Path) -> dict:
  """`model_cfg` of an `open_clip_config.json` beside the weights, if any."""
  cfg = path.parent / "open_clip_config.json"
  if not cfg.is_file():
    return {}
  return json.loads(cfg.read_text()).get("model_cfg", {})


def from_open_clip(
  path: str | pathlib.Path, hidden_act: str | None = None, heads: int | None = None
) -> tuple[TextConfig, dict]:
  """Text tower of an open_clip (or OpenAI) `CLIP` state dict in safetensors.

  Sizes come from the shapes. The two settings shapes do not fix come from an
  `open_clip_config.json` beside the file if present (`quick_gelu`,
  `text_cfg.heads`), else from the arguments, else OpenAI's (quick_gelu,
  64 channels per head).

  Args:
    path: the `.safetensors` file.
    hidden_act: overrides the activation (an `ACTIVATIONS` name).
    heads: overrides the number of attention heads.

  Returns:
    (config, params) with params {"params": ...} for `TextTransformer.apply`.

  Raises:
    CheckpointError: missing file, another architecture, or shape mismatches.
  """
  path = pathlib.Path(path)
  tensors = checkpoints.read_safetensors(path)
  prefix = "text." if "text.token_embedding.weight" in tensors else ""
  if prefix + "token_embedding.weight" not in tensors:
    found = sorted({k.split(".")[0] for k in tensors})
    raise CheckpointError(
      f"{path}: not an open_clip CLIP text tower (no token_embedding.weight); "
      f"top-level names found: {found[:12]}"
    )
  vocab_size, width = tensors[prefix + "token_embedding.weight"].shape
  layers = 0
  while f"{prefix}transformer.resblocks.{layers}.ln_1.weight" in tensors:
    layers += 1
  block0 = f"{prefix}transformer.resblocks.0."
  if layers == 0:
    raise CheckpointError(f"{path}: no {block0}ln_1.weight: not an open_clip text transformer")
  unsupported = {k[len(block0) :] for k in tensors if k.startswith(block0)} - _OPEN_CLIP_BLOCK_KEYS
  if unsupported:
    raise CheckpointError(f"{path}: unsupported text block parameters {sorted(unsupported)}")
  if prefix + "text_projection" not in tensors:
    raise CheckpointError(
      f"{path}: parameter {prefix}text_projection not found (wrong architecture?)"
    )
  settings = _open_clip_settings(path)
  if settings:  # open_clip's own default is nn.GELU unless the config says quick_gelu
    default_act = "quick_gelu" if settings.get("quick_gelu", False) else "gelu"
  else:  # a bare state dict: OpenAI's weights
    default_act = "quick_gelu"
  config = TextConfig(
    vocab_size=vocab_size,
    width=width,
    layers=layers,
    heads=heads or settings.get("text_cfg", {}).get("heads") or max(1, width // 64),
    mlp_dim=tensors[block0 + "mlp.c_fc.weight"].shape[0],
    context_length=tensors[prefix + "positional_embedding"].shape[0]
    if prefix + "positional_embedding" in tensors
    else 77,
    embed_dim=tensors[prefix + "text_projection"].shape[-1],
    hidden_act=hidden_act or default_act,
    eos_token_id=None,
  )
  if config.hidden_act not in ACTIVATIONS:
    raise CheckpointError(f"{path}: unsupported activation {config.hidden_act!r}")
  if width % config.heads:
    raise CheckpointError(f"{path}: width {width} is not divisible by {config.heads} heads")
  w, m = width, config.mlp_dim
  get = lambda name, shape: checkpoints.take(tensors, prefix + name, shape, str(path))
  linear = lambda name, n_in, n_out: _dense(
    get(f"{name}.weight", (n_out, n_in)).T, get(f"{name}.bias", (n_out,))
  )
  layer_norm = lambda name: _norm(get(f"{name}.weight", (w,)), get(f"{name}.bias", (w,)))
  blocks = []
  for i in range(layers):
    p = f"transformer.resblocks.{i}"
    in_w = get(f"{p}.attn.in_proj_weight", (3 * w, w))  # rows: q, k, v
    in_b = get(f"{p}.attn.in_proj_bias", (3 * w,))
    attn = {
      n: _dense(in_w[j * w : (j + 1) * w].T, in_b[j * w : (j + 1) * w])
      for j, n in enumerate(("query", "key", "value"))
    }
    attn["out"] = linear(f"{p}.attn.out_proj", w, w)
    blocks.append(
      {
        "ln_1": layer_norm(f"{p}.ln_1"),
        "attn": attn,
        "ln_2": layer_norm(f"{p}.ln_2"),
        "mlp_fc": linear(f"{p}.mlp.c_fc", w, m),
        "mlp_proj": linear(f"{p}.mlp.c_proj", m, w),
      }
    )
  params = _variables(
    blocks,
    token_embedding={"embedding": get("token_embedding.weight", (vocab_size, w))},
    position_embedding=get("positional_embedding", (config.context_length, w)),
    ln_final=layer_norm("ln_final"),
    text_projection=get("text_projection", (w, config.embed_dim)),  # used as x @ P
  )
  return config, params


def load_clip_text(
  path: str | pathlib.Path,
  tokenizer_path: str | pathlib.Path | None = None,
  hidden_act: str | None = None,
  heads: int | None = None,
) -> tuple[TextConfig, dict, Tokenizer]:
  """CLIP text tower and tokenizer from local files.

  Args:
    path: a transformers folder (`config.json`, `model.safetensors`,
      `vocab.json`, `merges.txt`), an open_clip `.safetensors` file, or a
      folder holding exactly one open_clip `.safetensors` (and its tokenizer
      files: `bpe_simple_vocab_16e6.txt.gz` or `vocab.json` + `merges.txt`).
    tokenizer_path: where the tokenizer files are, if elsewhere (a folder or
      the `.gz`).
    hidden_act, heads: open_clip only, see `from_open_clip`.

  Returns:
    (config, params, tokenizer); params {"params": ...} for
    `TextTransformer(config).apply`, the tokenizer's context length the
    model's.

  Raises:
    CheckpointError: missing files, another architecture, or shape mismatches.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: checkpoint not found")
  if path.is_dir() and (path / "config.json").is_file():
    config, params = from_transformers(path)
    tokenizer_dir = path
  else:
    weights = path
    if path.is_dir():
      candidates = sorted(path.glob("*.safetensors"))
      if len(candidates) != 1:
        found = sorted(p.name for p in path.iterdir())
        raise CheckpointError(
          f"{path}: expected config.json (transformers) or one open_clip .safetensors file; "
          f"found {found}"
        )
      weights = candidates[0]
    config, params = from_open_clip(weights, hidden_act=hidden_act, heads=heads)
    tokenizer_dir = weights.parent
  tokenizer = load_tokenizer(tokenizer_path or tokenizer_dir, config.context_length)
  if tokenizer.vocab_size > config.vocab_size:
    raise CheckpointError(
      f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model embeds {config.vocab_size}"
    )
  if config.eos_token_id is not None and config.eos_token_id != tokenizer.eot_id:
    raise CheckpointError(
      f"{path}: the model pools at eos_token_id {config.eos_token_id}, the tokenizer's "
      f"{EOT} is {tokenizer.eot_id}"
    )
  return config, params, tokenizer
