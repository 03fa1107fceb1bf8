"""`teachers.load` for CLIP and DINOv2 against transformers, and a CLIP feature store."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import SYNTHETIC_BUILDER  # noqa: E402
from test_clip_text_parity import _hf_features, _tiny_clip  # noqa: E402

from data_prep import teacher_features, text_embeddings  # noqa: E402
from data_prep.builders import data_source  # noqa: E402
from reldistill_jax import feature_store, teachers  # noqa: E402
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
  with pytest.raises(ValueError, match="DINOv2 is not a CLIP model"):
    teacher.text_embedding(["a car"])


def test_clip_feature_store_and_text_embeddings(clip, pipeline, tmp_path):
  """The store writer decodes the world's JPEGs, resizes, and encodes with CLIP."""
  _, folder = clip
  teacher = teachers.load("clip", folder)
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "val")
  teacher_features.write_store(
    teacher, source, str(tmp_path / "store"), SYNTHETIC_BUILDER, "val", (32, 48), 12, 1
  )
  store = feature_store.FeatureStore(tmp_path / "store", {"teacher": "clip", "grid": [2, 3]})
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
