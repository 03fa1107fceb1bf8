"""CLIP's BPE tokenizer against transformers' CLIPTokenizer and the `regex` pattern.

No CLIP vocabulary ships with the repository, so the tests learn a small one:
a few hundred BPE merges on part of the prompts, written in OpenAI's layout
(bytes, bytes + `</w>`, one token per merge, the two special tokens) both as
`vocab.json` + `merges.txt` and as a `bpe_simple_vocab_16e6.txt.gz`. Words
outside the training text fall back to shorter pieces and single bytes.
"""

import collections
import gzip
import html
import json
import pathlib

import numpy as np
import pytest

from reldistill_jax import classes
from reldistill_jax.models import clip_tokenizer
from reldistill_jax.models.checkpoints import CheckpointError

# A part of CLIP's ImageNet templates and the project's scene templates.
TEMPLATES = (
  "a photo of a {}.",
  "a bad photo of the {}.",
  "a photo of many {}.",
  "a sculpture of a {}.",
  "a rendering of a {}.",
  "graffiti of a {}.",
  "a cropped photo of the {}.",
  "a tattoo of a {}.",
  "a bright photo of a {}.",
  "a photo of a clean {}.",
  "a photo of a dirty {}.",
  "a dark photo of the {}.",
  "a drawing of a {}.",
  "a photo of my {}.",
  "the plastic {}.",
  "a close-up photo of a {}.",
  "a black and white photo of the {}.",
  "a painting of the {}.",
  "a pixelated photo of the {}.",
  "a jpeg corrupted photo of a {}.",
  "a blurry photo of the {}.",
  "itap of a {}.",
  "a {} in a video game.",
  "art of the {}.",
  "a toy {}.",
  "there is a {} in the scene.",
  "there is the {} in the scene.",
  "this is a {} in the scene.",
)
CLASS_NAMES = classes.NUSCENES_CLASSES + ("fire hydrant", "teddy bear", "hot-dog", "T-shirt")

HARD = (
  "",
  " ",
  "A Photo Of A CAR.",
  "Don't stop, it's 3.14 o'clock! We'll see; they've gone, I'm here, you're there, he'd go.",
  "''s 'S 'tis rock'n'roll",
  "2024-06-01 12:30:45 +0100 #42 $19.99 100%",
  "1234567890 0.5 1e-3 -7",
  "...!!!???,;:()[]{}<>@^_`~|\\/*+=",
  "  lots\t of \n\n white\u3000space\u00a0here  ",
  "café naïve résumé Straße Ærøskøbing",
  "e\u0301 (decomposed e acute) and \u00e9",
  "東京タワー 北京 서울 Москва Αθήνα",
  "emoji 🚗🚲🛴 🏳️‍🌈 👍🏽",
  "½ x² Ⅻ ① ١٢٣ ४२ ﬁ ligature",
  "मोटरसाइकिल on the road",
  "a photo of a <|endoftext|> token",
  "<|startoftext|>a photo<|endoftext|>",
  "mixed CASE Words With-Hyphens and_under_scores",
  "tab\tseparated\tvalues",
  "a very long caption " * 30,
  "x" * 300,
  "unseen vocabulary: zebra crossing, lamppost, scaffolding, wheelchair",
)


def learn_merges(texts, num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE on the pre-tokenised texts (ties broken by the pair itself)."""
  byte_tokens = clip_tokenizer.bytes_to_unicode()
  words = collections.Counter()
  for text in texts:
    for piece in clip_tokenizer.pretokenize_pattern().findall(clip_tokenizer.clean_text(text)):
      chars = tuple(byte_tokens[b] for b in piece.encode("utf-8"))
      words[(*chars[:-1], chars[-1] + "</w>")] += 1
  known = set(byte_tokens.values()) | {c + "</w>" for c in byte_tokens.values()}
  merges = []
  while len(merges) < num_merges:
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:], strict=False):
        pairs[pair] += count
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    best = next((p for p, _ in ranked if p[0] + p[1] not in known), None)
    if best is None:
      break
    merges.append(best)
    known.add(best[0] + best[1])
    merged_words = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged_words[tuple(out)] += count
    words = merged_words
  return merges


def write_vocabulary(folder: pathlib.Path, num_merges: int = 300) -> int:
  """Writes vocab.json, merges.txt and bpe_simple_vocab_16e6.txt.gz; returns V."""
  corpus = [t.format(c) for t in TEMPLATES[::2] for c in CLASS_NAMES[::2]] + list(HARD[:14])
  merges = learn_merges(corpus, num_merges)
  assert len(merges) == num_merges
  vocab = clip_tokenizer.openai_vocabulary(merges)
  folder.mkdir(parents=True, exist_ok=True)
  lines = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (folder / "merges.txt").write_text(lines, encoding="utf-8")
  with gzip.open(folder / clip_tokenizer.OPENAI_BPE_FILE, "wt", encoding="utf-8") as f:
    f.write(lines)
  return len(vocab)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("clip_vocab")
  write_vocabulary(folder)
  return folder


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_dir):
  transformers = pytest.importorskip("transformers")
  return transformers.CLIPTokenizer.from_pretrained(str(vocab_dir))


def _hf_ids(hf_tokenizer, texts, length=77) -> np.ndarray:
  out = hf_tokenizer(list(texts), padding="max_length", max_length=length, truncation=True)
  return np.asarray(out["input_ids"], np.int32)


def test_prompts_match_transformers(vocab_dir, hf_tokenizer):
  tokenizer = clip_tokenizer.load_tokenizer(vocab_dir)
  prompts = [t.format(c) for t in TEMPLATES for c in CLASS_NAMES]
  ids = tokenizer(prompts)
  assert ids.shape == (len(prompts), 77) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, _hf_ids(hf_tokenizer, prompts))
  # Both seen and unseen words: some prompts need byte-level fallbacks.
  assert tokenizer.pad_id == tokenizer.eot_id == hf_tokenizer.eos_token_id


def _cleaned(texts) -> list[str]:
  """OpenAI's cleanup (ftfy, HTML), which transformers' CLIPTokenizer does not apply."""
  return [clip_tokenizer.clean_text(t) for t in texts]


def test_hard_strings_match_transformers(vocab_dir, hf_tokenizer):
  tokenizer = clip_tokenizer.load_tokenizer(vocab_dir)
  for text in HARD:
    np.testing.assert_array_equal(
      tokenizer([text]), _hf_ids(hf_tokenizer, _cleaned([text])), err_msg=repr(text)
    )
  for length in (5, 16, 77):
    np.testing.assert_array_equal(
      tokenizer(HARD, length), _hf_ids(hf_tokenizer, _cleaned(HARD), length)
    )
  # ftfy's repairs: the ligature of HARD is two letters to OpenAI, one symbol to transformers.
  assert "fi ligature" in clip_tokenizer.clean_text("ﬁ ligature")


def test_html_entities_are_unescaped_as_clip_does(vocab_dir, hf_tokenizer):
  """CLIP unescapes HTML twice; transformers' tokenizer does not unescape."""
  tokenizer = clip_tokenizer.load_tokenizer(vocab_dir)
  texts = ["fish &amp; chips", "&lt;3 &quot;car&quot;", "a&amp;amp;b", "&#233;t&eacute;"]
  unescaped = [html.unescape(html.unescape(t)) for t in texts]
  assert unescaped[2] == "a&b" and unescaped[3] == "été"
  np.testing.assert_array_equal(tokenizer(texts), _hf_ids(hf_tokenizer, unescaped))
  assert not np.array_equal(tokenizer(texts[:1]), _hf_ids(hf_tokenizer, texts[:1]))


def test_tokenizer_json_layout(tmp_path, vocab_dir, hf_tokenizer):
  """transformers 5 saves tokenizer.json (merges as pairs) and no vocab.json."""
  hf_tokenizer.save_pretrained(str(tmp_path))
  assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
  tokenizer = clip_tokenizer.load_tokenizer(tmp_path)
  assert tokenizer.encoder == clip_tokenizer.load_tokenizer(vocab_dir).encoder
  texts = [t.format(c) for t in TEMPLATES[:6] for c in CLASS_NAMES] + list(HARD)
  np.testing.assert_array_equal(tokenizer(texts), _hf_ids(hf_tokenizer, _cleaned(texts)))
  # Older tokenizer.json files write each merge as one "a b" string.
  data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
  data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
  (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
  assert clip_tokenizer.load_tokenizer(tmp_path).ranks == tokenizer.ranks
  data["model"]["type"] = "WordPiece"
  (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
  with pytest.raises(CheckpointError, match="not CLIP's BPE"):
    clip_tokenizer.load_tokenizer(tmp_path)


def test_truncation_keeps_the_end_token(vocab_dir):
  tokenizer = clip_tokenizer.load_tokenizer(vocab_dir, context_length=77)
  ids = tokenizer(["a very long caption " * 30, "a car"])
  assert ids[0, 0] == tokenizer.sot_id and ids[0, -1] == tokenizer.eot_id
  assert len(tokenizer.encode("a very long caption " * 30)) > 75
  np.testing.assert_array_equal(ids[0, 1:-1], tokenizer.encode("a very long caption " * 30)[:75])
  n = len(tokenizer.encode("a car"))
  assert ids[1, n + 1] == tokenizer.eot_id and np.all(ids[1, n + 2 :] == tokenizer.pad_id)
  assert tokenizer(["a car"], context_length=2).tolist() == [[tokenizer.sot_id, tokenizer.eot_id]]
  assert tokenizer.decode(ids[1]) == "a car"


def test_openai_gz_layout_equals_vocab_json(vocab_dir):
  from_json = clip_tokenizer.load_tokenizer(vocab_dir)
  from_gz = clip_tokenizer.load_tokenizer(vocab_dir / clip_tokenizer.OPENAI_BPE_FILE)
  assert from_gz.encoder == from_json.encoder
  assert from_gz.pad_id == 0  # OpenAI and open_clip pad with zeros
  texts = [t.format(c) for t in TEMPLATES[:4] for c in CLASS_NAMES] + list(HARD)
  for text in texts:
    assert from_gz.encode(text) == from_json.encode(text), text
  a, b = from_gz(texts), from_json(texts)
  for row, text in enumerate(texts):
    end = min(len(from_gz.encode(text)), 75) + 1  # the end token's position
    assert a[row, end] == from_gz.eot_id
    np.testing.assert_array_equal(a[row, : end + 1], b[row, : end + 1])
    assert np.all(a[row, end + 1 :] == 0) and np.all(b[row, end + 1 :] == from_json.eot_id)


def test_openai_gz_keeps_only_the_first_48894_merges(tmp_path):
  path = tmp_path / clip_tokenizer.OPENAI_BPE_FILE
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("bpe_simple_vocab_16e6.txt#version: 0.2\n")
    f.write("".join(f"a{i} b{i}\n" for i in range(48900)))
  merges = clip_tokenizer.read_merges(path, limit=clip_tokenizer.OPENAI_NUM_MERGES)
  assert len(merges) == 48894 and merges[-1] == ("a48893", "b48893")
  assert len(clip_tokenizer.openai_vocabulary(merges)) == 49408


def test_errors(tmp_path, vocab_dir):
  with pytest.raises(CheckpointError, match="no tokenizer files"):
    clip_tokenizer.load_tokenizer(tmp_path)
  with pytest.raises(CheckpointError, match="not found"):
    clip_tokenizer.load_tokenizer(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
  broken = tmp_path / "broken"
  broken.mkdir()
  vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
  merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8")
  del vocab["".join(merges.splitlines()[5].split())]
  (broken / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (broken / "merges.txt").write_text(merges, encoding="utf-8")
  with pytest.raises(CheckpointError, match="lacks 1 tokens"):
    clip_tokenizer.load_tokenizer(broken)
  (broken / "merges.txt").write_text(merges + "three part line\n", encoding="utf-8")
  with pytest.raises(CheckpointError, match=r"merges.txt:302: expected a merge pair"):
    clip_tokenizer.read_merges(broken / "merges.txt")
