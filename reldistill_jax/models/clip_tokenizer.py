r"""CLIP's byte-level BPE tokenizer, as OpenAI's `simple_tokenizer.py`.

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
"""

import functools
import gzip
import html
import json
import pathlib
import re
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

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
