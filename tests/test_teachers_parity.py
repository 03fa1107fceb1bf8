"""`teachers.load` for CLIP, SigLIP 2, DINOv2 and DINOv3 against transformers, and feature stores
that record their dense rule."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import SYNTHETIC_BUILDER  # noqa: E402
from test_clip_text_parity import _hf_features, _tiny_clip  # noqa: E402
from test_siglip_text_parity import _gemma_style_tokenizer, _hf_ids, write_tokenizer  # noqa: E402

from data_prep import teacher_features, text_embeddings  # noqa: E402
from data_prep.builders import data_source  # noqa: E402
from reldistill_jax import errors, feature_store, records, teachers  # noqa: E402
from reldistill_jax.models import vit  # noqa: E402


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip_teacher")
  model = _tiny_clip(folder, eos_token_id=2, hidden_act="quick_gelu", seed=3)
  return model, folder


def _pixels(images: np.ndarray, mean, std) -> "torch.Tensor":
  x = (images.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_clip_teacher_matches_transformers(clip):
  model, folder = clip
  teacher = teachers.load("clip", folder)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
  dense = teacher.dense_features(images)
  assert dense.shape == (2, 2, 3, 32) and dense.dtype == np.float32
  assert teacher.patch_size == 16 and teacher.feature_dim == 32
  with torch.no_grad():
    ref = model.get_image_features(
      pixel_values=_pixels(images, vit.CLIP_MEAN, vit.CLIP_STD), interpolate_pos_encoding=True
    )
  ref = getattr(ref, "pooler_output", ref).numpy()
  np.testing.assert_allclose(teacher.image_embedding(images), ref, atol=1e-4)
  texts = ["a photo of a car.", "there is a traffic cone in the scene."]
  np.testing.assert_allclose(
    teacher.text_embedding(texts), _hf_features(model, folder, texts), atol=1e-4
  )
  assert len(teacher.weights_sha256) == 64


def test_named_teachers_check_the_architecture(clip):
  _, folder = clip
  with pytest.raises(ValueError, match="clip_vitb16 expects patch 16, width 768"):
    teachers.load("clip_vitb16", folder)
  with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
    teachers.load("clip", folder / "nope")
  with pytest.raises(ValueError, match="needs weights_path"):
    teachers.load("dinov2_vitb14")


def test_dinov2_teacher(tmp_path):
  config = transformers.Dinov2Config(
    hidden_size=48, num_hidden_layers=1, num_attention_heads=4, patch_size=8, image_size=40
  )
  torch.manual_seed(0)
  model = transformers.Dinov2Model(config).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  teacher = teachers.load("dinov2", tmp_path)
  images = np.random.default_rng(1).integers(0, 256, (1, 40, 64, 3), dtype=np.uint8)
  dense = teacher.dense_features(images)
  with torch.no_grad():
    out = model(
      pixel_values=_pixels(images, vit.IMAGENET_MEAN, vit.IMAGENET_STD), output_hidden_states=True
    )
  # ScaLR's choice: the last block's patch tokens before the final norm.
  ref = out.hidden_states[-1][:, 1:].numpy().reshape(1, 5, 8, 48)
  np.testing.assert_allclose(dense, ref, atol=1e-4)
  with pytest.raises(errors.ConfigError, match="not a CLIP-type model"):
    teacher.text_embedding(["a car"])
  with pytest.raises(errors.ConfigError, match="dense rule 'naclip' is not one of dinov2's"):
    teachers.load("dinov2", tmp_path, dense="naclip")


def test_clip_feature_store_and_text_embeddings(clip, pipeline, tmp_path):
  """The store writer decodes the world's JPEGs, resizes, and encodes with CLIP."""
  _, folder = clip
  teacher = teachers.load("clip", folder)
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "val")
  teacher_features.write_store(
    teacher, source, str(tmp_path / "store"), SYNTHETIC_BUILDER, "val", (32, 48), 12, 1
  )
  store = feature_store.FeatureStore(
    tmp_path / "store", {"teacher": "clip", "dense": "maskclip", "grid": [2, 3]}
  )
  with pytest.raises(
    records.ConfigMismatchError, match="dense: stored 'maskclip', wanted 'naclip'"
  ):
    feature_store.FeatureStore(tmp_path / "store", {"teacher": "clip", "dense": "naclip"})
  record = store[0]
  images = np.stack(
    [teacher_features.decode_resized(jpeg, (32, 48), "test") for jpeg in source[0]["images"]]
  )
  np.testing.assert_allclose(
    record["features"].astype(np.float32), teacher.dense_features(images), rtol=2e-3, atol=2e-3
  )
  out = text_embeddings.write_text_embeddings(teacher, "nuscenes", tmp_path / "text.npz")
  with np.load(out) as data:
    assert data["embeddings"].shape == (16, 32)
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, rtol=1e-5)


def _relative(a, b) -> float:
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
  """A tiny SiglipModel (the layout of the fixed-resolution SigLIP 2 checkpoints) whose text
  projection matches the vision width, with a Gemma-style tokenizer.json."""
  folder = tmp_path_factory.mktemp("siglip2_teacher")
  vocab_size = write_tokenizer(folder, _gemma_style_tokenizer())
  torch.manual_seed(5)
  config = transformers.SiglipConfig(
    text_config=dict(
      vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=64, projection_size=64,
      pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ),
    vision_config=dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
      image_size=32, patch_size=16,
    ),
  )  # fmt: skip
  model = transformers.SiglipModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "probe" in name or "position_embedding" in name:
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  return model, folder


def test_siglip2_teacher_matches_transformers(siglip2):
  """Image and text embeddings equal get_image_features / get_text_features; dense rules."""
  model, folder = siglip2
  teacher = teachers.load("siglip2", folder)
  assert (teacher.dense, teacher.patch_size, teacher.feature_dim) == ("maskclip", 16, 64)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
  pixels = _pixels(images, vit.SIGLIP_MEAN, vit.SIGLIP_STD)
  with torch.no_grad():
    ref = model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
  assert _relative(teacher.image_embedding(images), ref.pooler_output.numpy()) < 1e-5
  texts = ["a photo of a car.", "there is a traffic cone in the scene."]
  with torch.no_grad():
    ref = model.get_text_features(input_ids=torch.from_numpy(_hf_ids(folder, texts)))
  assert _relative(teacher.text_embedding(texts), ref.pooler_output.numpy()) < 1e-5
  dense = {rule: teachers.load("siglip2", folder, rule) for rule in vit.TEXT_DENSE}
  maps = {rule: t.dense_features(images) for rule, t in dense.items()}
  assert all(m.shape == (2, 2, 3, 64) and m.dtype == np.float32 for m in maps.values())
  np.testing.assert_array_equal(maps["maskclip"], teacher.dense_features(images))
  for rule in ("sclip", "clearclip", "naclip"):
    assert dense[rule].dense == rule and np.abs(maps[rule] - maps["maskclip"]).max() > 1e-3
  with pytest.raises(ValueError, match="siglip2_b16 expects patch 16, width 768"):
    teachers.load("siglip2_b16", folder)


def test_dinov3_teacher(tmp_path):
  """DINOv3's dense features are the normed patch tokens, registers and class token dropped."""
  config = transformers.DINOv3ViTConfig(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    patch_size=8, image_size=32, num_register_tokens=4,
  )  # fmt: skip
  torch.manual_seed(1)
  model = transformers.DINOv3ViTModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "lambda1" in name:
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  teacher = teachers.load("dinov3", tmp_path)
  assert teacher.dense == "tokens_postnorm" and teacher.feature_dim == 48
  images = np.random.default_rng(2).integers(0, 256, (1, 40, 64, 3), dtype=np.uint8)
  with torch.no_grad():
    out = model(pixel_values=_pixels(images, vit.IMAGENET_MEAN, vit.IMAGENET_STD))
  ref = out.last_hidden_state[:, 5:].numpy().reshape(1, 5, 8, 48)
  assert _relative(teacher.dense_features(images), ref) < 1e-5
  with pytest.raises(errors.ConfigError, match="not a CLIP-type model"):
    teacher.image_embedding(images)
