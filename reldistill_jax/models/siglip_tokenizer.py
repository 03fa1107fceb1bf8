"""SigLIP 2's tokenizer: Gemma's SentencePiece BPE, read from `tokenizer.json`.

The vocabulary, merges and added tokens come from the checkpoint's
`tokenizer.json` through the `tokenizers` library; the pipeline around them is
set as transformers 5 sets it for SigLIP 2 (`Siglip2Tokenizer`,
models/siglip2/tokenization_siglip2.py, which subclasses `GemmaTokenizer`), so
the rows equal those of
`processor(text=..., padding="max_length", max_length=64, truncation=True)`:

  1. model: BPE with `fuse_unk=True`, `byte_fallback=True`, no dropout, the
     unknown token of the settings (`Siglip2Tokenizer.__init__` rebuilds the
     BPE with exactly these from the file's vocabulary and merges, whatever
     the file says), so characters outside the vocabulary become `<0xNN>`
     byte tokens;
  2. normaliser: `Lowercase` then `Replace(" ", "▁")`. The lowercasing is the
     SigLIP 2 training default ("Gemma tokenizer + SigLIP2 training default:
     lowercase normalization", the class docstring; the `Lowercase` is
     prepended at the end of `__init__`). It is applied to every SigLIP
     folder: transformers 5 picks `Siglip2Tokenizer` for `siglip2` folders
     (NaFlex) because their hub `tokenizer_class` is listed as incorrect
     (models/auto/tokenization_auto.py, `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`),
     but takes the declared `GemmaTokenizer`, which does not lowercase, for the
     fixed-resolution SigLIP 2 checkpoints of model_type `siglip`; those were
     trained on lowercased text as well;
  3. pre-tokeniser: `Split(" ", merged_with_previous)`, as the class sets it
     (a no-op after the normaliser has replaced every space);
  4. special tokens at the ends: the post-processor saved in `tokenizer.json`
     (SigLIP 2's appends `<eos>`), or none if the file has none. transformers 5
     drops `add_bos_token` / `add_eos_token` of `tokenizer_config.json`
     whenever a `tokenizer.json` exists (tokenization_utils_base.py
     `_from_pretrained`, "init_kwargs.pop('add_bos_token')"), so they are
     ignored here too;
  5. truncation to L tokens, special tokens included (the end token stays),
     on the `truncation_side` (default right), then padding to L with the pad
     token on the `padding_side`. SigLIP 2 checkpoints say `right`; the class
     default, used when neither `tokenizer_config.json` nor the padding saved in
     `tokenizer.json` says, is `left`.
Token names (`bos_token`, `eos_token`, `pad_token`, `unk_token`, `mask_token`)
come from `tokenizer_config.json`, or from `special_tokens_map.json` when the
config has no `added_tokens_decoder` (transformers reads that file only then,
tokenization_utils_base.py `_from_pretrained`), else the class defaults
`<bos>`, `<eos>`, `<pad>`, `<unk>`, `<mask>`. Every named special token is an
added special token (matched in the raw text, before normalisation), as
transformers adds those the file lacks, and so are the tokens of the config's
`added_tokens_decoder`. SigLIP's text tower pools the last position without an
attention mask, so padding side and pad id change the features.
"""

import json
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import normalizers, pre_tokenizers

from reldistill_jax.models.checkpoints import CheckpointError

# Siglip2Tokenizer's defaults for the named special tokens and its padding side.
DEFAULT_TOKENS = {
  "bos_token": "<bos>",
  "eos_token": "<eos>",
  "pad_token": "<pad>",
  "unk_token": "<unk>",
  "mask_token": "<mask>",
}
DEFAULT_PADDING_SIDE = "left"


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _content(token) -> str | None:
  """A token setting's string: a plain string or an AddedToken dict's content."""
  return token.get("content") if isinstance(token, dict) else token


def _special_tokens(config: dict, tokens_map: dict) -> dict[str, str]:
  """Named special tokens in transformers' precedence (see the module docstring)."""
  names = dict(DEFAULT_TOKENS)
  names.update({k: _content(config[k]) for k in DEFAULT_TOKENS if config.get(k) is not None})
  if "added_tokens_decoder" not in config:
    names.update({k: _content(tokens_map[k]) for k in DEFAULT_TOKENS if tokens_map.get(k)})
  return names


class Tokenizer:
  """SigLIP 2's tokenizer with the call interface of the CLIP one.

  Attributes:
    backend: the configured `tokenizers.Tokenizer`.
    context_length: L, the length of every tokenised row.
    pad_id, eos_id: ids of the pad and end tokens.
  """

  def __init__(self, backend: tokenizers.Tokenizer, settings: dict, context_length: int = 64):
    """Configures a tokenizer read from `tokenizer.json`.

    Args:
      backend: the file's tokenizer (a BPE); it is modified in place.
      settings: `tokenizer_config.json` merged with the special token names
        (`_settings`).
      context_length: default L of the rows `__call__` returns (>= 2).

    Raises:
      CheckpointError: if the file is not a BPE.
    """
    if not isinstance(backend.model, tokenizers.models.BPE):
      raise CheckpointError(
        f"tokenizer.json holds a {type(backend.model).__name__} model, not SigLIP 2's Gemma BPE"
      )
    if context_length < 2:
      raise ValueError(f"context_length must leave room for the end token, got {context_length}")
    tokens = settings["special_tokens"]
    model = backend.model
    model.unk_token, model.fuse_unk, model.byte_fallback = tokens["unk_token"], True, True
    model.dropout, model.ignore_merges = None, False
    model.continuing_subword_prefix = model.end_of_word_suffix = None
    backend.normalizer = normalizers.Sequence(
      [normalizers.Lowercase(), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    self._add_tokens(backend, settings)
    backend.encode_special_tokens = bool(settings.get("split_special_tokens", False))
    backend.no_padding()
    backend.no_truncation()
    self.backend = backend
    self.context_length = context_length
    self.pad_id = backend.token_to_id(tokens["pad_token"])
    self.eos_id = backend.token_to_id(tokens["eos_token"])
    self.pad_token = tokens["pad_token"]
    self.padding_side = settings.get("padding_side", DEFAULT_PADDING_SIDE)
    self.truncation_side = settings.get("truncation_side", "right")

  @staticmethod
  def _add_tokens(backend: tokenizers.Tokenizer, settings: dict) -> None:
    """Adds the config's added tokens and the named special tokens the file lacks."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    for entry in settings.get("added_tokens_decoder", {}).values():
      entry = {k: v for k, v in entry.items() if k != "__type"}
      if entry["content"] not in present:
        content = entry.pop("content")
        backend.add_tokens([tokenizers.AddedToken(content, **entry)])
        present.add(content)
    missing = [t for t in settings["special_tokens"].values() if t and t not in present]
    backend.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
    )

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, with the end token, without truncation or padding."""
    return self.backend.encode(text).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids, special tokens and padding dropped."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """Tokenises texts into fixed-length rows.

    Args:
      texts: one text or a sequence of T texts.
      context_length: L; the tokenizer's own by default.

    Returns:
      (T, L) int32: each text's tokens and end token, cut to L on the
      truncation side (the end token kept), padded with `pad_id` on the
      padding side.
    """
    if isinstance(texts, str):
      texts = [texts]
    length = context_length or self.context_length
    if len(texts) == 0:
      return np.zeros((0, length), np.int32)
    self.backend.enable_truncation(
      length, stride=0, strategy="longest_first", direction=self.truncation_side
    )
    self.backend.enable_padding(
      direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad_token, length=length
    )
    try:
      encodings = self.backend.encode_batch(list(texts), add_special_tokens=True)
    finally:
      self.backend.no_padding()
      self.backend.no_truncation()
    return np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), length)


def _settings(folder: pathlib.Path, backend: tokenizers.Tokenizer) -> dict:
  """`tokenizer_config.json` with the special token names and the sides resolved."""
  config = _read_json(folder / "tokenizer_config.json")
  tokens_map = _read_json(folder / "special_tokens_map.json")
  settings = dict(config)
  settings["special_tokens"] = _special_tokens(config, tokens_map)
  # Padding and truncation saved in tokenizer.json fill in what the config leaves out.
  if "padding_side" not in settings and backend.padding:
    settings["padding_side"] = backend.padding["direction"]
  if "truncation_side" not in settings and backend.truncation:
    settings["truncation_side"] = backend.truncation["direction"]
  for key in ("padding_side", "truncation_side"):
    if settings.get(key, "right") not in ("left", "right"):
      raise CheckpointError(f"{folder}: {key} {settings[key]!r} is neither 'left' nor 'right'")
  return settings


def load_tokenizer(path: str | pathlib.Path, context_length: int = 64) -> Tokenizer:
  """SigLIP 2's tokenizer from a checkpoint folder's `tokenizer.json`.

  Args:
    path: the folder (`tokenizer.json`, with `tokenizer_config.json` and
      optionally `special_tokens_map.json`).
    context_length: L of the tokenised rows (SigLIP 2: 64).

  Raises:
    CheckpointError: no `tokenizer.json` (a SigLIP v1 `spiece.model` is named),
      or files that are not a Gemma-style BPE.
  """
  folder = pathlib.Path(path)
  file = folder / "tokenizer.json"
  if not file.is_file():
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hint = (
      " (spiece.model is SigLIP v1's SentencePiece tokenizer, which is not supported)"
      if "spiece.model" in found
      else ""
    )
    raise CheckpointError(
      f"{file}: not found; SigLIP text towers need SigLIP 2's Gemma tokenizer.json in the "
      f"checkpoint folder{hint}; found {found}"
    )
  try:
    backend = tokenizers.Tokenizer.from_file(str(file))
  except Exception as e:  # the Rust parser raises plain Exceptions
    raise CheckpointError(f"{file}: unreadable tokenizer file ({e})") from e
  settings = _settings(folder, backend)
  try:
    return Tokenizer(backend, settings, context_length)
  except CheckpointError as e:
    raise CheckpointError(f"{folder}: {e}") from e
