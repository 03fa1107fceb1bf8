"""The synthetic teacher, the feature store and the text embeddings on a synthetic world."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SYNTHETIC_BUILDER

from data_prep import teacher_features, text_embeddings
from data_prep.builders import data_source
from reldistill_jax import classes, errors, feature_store, prompts, records, teachers


@pytest.fixture(scope="module")
def teacher(pipeline):
  return teachers.load("synthetic", pipeline["world"])


@pytest.fixture(scope="module")
def camera_tokens(pipeline):
  return [
    t.decode()
    for r in data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "val")
    for t in r["camera_tokens"]
  ]


@pytest.fixture(scope="module")
def store(pipeline, teacher, tmp_path_factory):
  out = tmp_path_factory.mktemp("store") / "features"
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")
  teacher_features.write_store(
    teacher, source, str(out), SYNTHETIC_BUILDER, "train", records_per_shard=3
  )
  return out


def _pure_cells(teacher, camera_tokens) -> tuple[float, float]:
  """(accuracy, share of the errors inside the true class's group) of the nearest prototype
  on the cells one class covers, over `camera_tokens`."""
  grid = (14, 26)
  feats = teacher.dense_features(
    np.zeros((len(camera_tokens), 224, 416, 3), np.uint8), camera_tokens
  )
  assert feats.shape == (len(camera_tokens), 14, 26, 512) and feats.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
  group_of = {c - 1: g for g, group in enumerate(teachers.SYNTHETIC_GROUPS) for c in group}
  right = wrong_in_group = wrong = 0
  for token, feat in zip(camera_tokens, feats, strict=True):
    fractions = teacher.class_fractions(teacher.classmap(token), grid)
    pure = (fractions.max(-1) > 0.95) & (fractions.argmax(-1) < 16)
    truth = fractions.argmax(-1)[pure]
    pred = (feat[pure] @ teacher.prototypes.T).argmax(-1)
    right += np.sum(pred == truth)
    for t, p in zip(truth[pred != truth], pred[pred != truth], strict=True):
      wrong += 1
      wrong_in_group += group_of.get(int(p)) == group_of[int(t)]
  assert wrong > 0
  return right / (right + wrong), wrong_in_group / wrong


def test_synthetic_features_are_separable_with_designed_confusions(teacher, camera_tokens):
  """Cells covered by one class are nearest their class prototype; errors stay in the group."""
  accuracy, in_group = _pure_cells(teacher, camera_tokens)
  assert accuracy > 0.85
  assert in_group > 0.8  # confusions follow the designed groups


def test_a_more_imperfect_teacher_confuses_more_within_the_groups(pipeline, teacher, camera_tokens):
  weak = teachers.load("synthetic", pipeline["world"], imperfection={"confusion": 1.0})
  assert (weak.confusion, weak.noise) == (1.0, teachers.SYNTHETIC_IMPERFECTION["noise"])
  assert weak.weights_sha256 != teacher.weights_sha256  # its stores are not the default's
  accuracy, in_group = _pure_cells(weak, camera_tokens)
  assert accuracy < _pure_cells(teacher, camera_tokens)[0] - 0.1
  assert in_group > 0.9  # the added errors are confusions between group-mates
  with pytest.raises(errors.ConfigError, match="only `synthetic` takes settings"):
    teachers.load("clip_vitb16", pipeline["world"], imperfection={"noise": 0.5})


def test_prototypes_encode_the_groups(teacher):
  protos = teacher.prototypes
  cos = protos @ protos.T
  car, truck, vegetation = 4 - 1, 10 - 1, 16 - 1
  assert cos[car, truck] == pytest.approx(0.7, abs=0.1)
  assert abs(cos[car, vegetation]) < 0.2


def test_features_follow_the_class_map(teacher, camera_tokens):
  """The pixel -> cell mapping of the anisotropic resize: a cell's dominant class is its pixels'."""
  token = camera_tokens[0]
  classmap = teacher.classmap(token)  # (225, 400) raw ids, 1/4 of 1600x900
  fractions = teacher.class_fractions(classmap, (14, 26))
  # Native pixel (u, v) = (1000, 700) -> classmap (175, 250) -> cell (700*14/900, 1000*26/1600).
  cell = (int(700 * 14 / 900), int(1000 * 26 / 1600))
  rows = slice(cell[0] * 225 // 14 + 1, (cell[0] + 1) * 225 // 14)
  cols = slice(cell[1] * 400 // 26 + 1, (cell[1] + 1) * 400 // 26)
  ids, counts = np.unique(teacher._row_of_raw[classmap[rows, cols]], return_counts=True)
  assert fractions[cell].argmax() == ids[counts.argmax()]
  np.testing.assert_allclose(fractions.sum(-1), 1.0)


def test_text_embeddings_are_the_prototypes(teacher, tmp_path):
  out = text_embeddings.write_text_embeddings(teacher, "nuscenes", tmp_path / "text.npz")
  with np.load(out) as data:
    assert data["embeddings"].shape == (16, 512)
    assert list(data["classes"]) == list(classes.NUSCENES_CLASSES)
    np.testing.assert_allclose(data["embeddings"], teacher.prototypes[:16], atol=1e-6)
    assert len(data["templates"]) == len(prompts.TEMPLATES) == 85
  # Word matching: "cartoon" does not name a car.
  np.testing.assert_array_equal(teacher.text_embedding(["a cartoon bus."]), teacher.prototypes[[2]])
  with pytest.raises(ValueError, match="knows only its class names"):
    teacher.text_embedding(["a photo of a giraffe."])
  # Same teacher and classes: kept; another class list: refused.
  assert text_embeddings.write_text_embeddings(teacher, "nuscenes", out) == out
  with pytest.raises(FileExistsError, match="not overwriting"):
    text_embeddings.write_text_embeddings(teacher, "semantic_kitti", out)


def test_store_records_and_manifest(store, pipeline, teacher):
  reader = feature_store.FeatureStore(store, {"teacher": "synthetic", "image_size": [224, 416]})
  config = json.loads((store / "manifest.json").read_text())["config"]
  assert (
    config["grid"] == [14, 26] and config["feature_dim"] == 512 and config["dtype"] == "float16"
  )
  assert config["weights_sha256"] == teacher.weights_sha256
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")
  assert reader.tokens == [r["token"].decode() for r in source]
  record = reader.get(reader.tokens[1])
  assert record["features"].shape == (6, 14, 26, 512) and record["features"].dtype == np.float16
  cams = [t.decode() for t in source[1]["camera_tokens"]]
  expected = teacher.dense_features(np.zeros((6, 224, 416, 3), np.uint8), cams)
  np.testing.assert_allclose(record["features"].astype(np.float32), expected, atol=2e-3)


def test_store_refusals(store, pipeline, teacher):
  with pytest.raises(records.ConfigMismatchError, match="teacher"):
    feature_store.FeatureStore(store, {"teacher": "clip_vitb16"})
  with pytest.raises(KeyError, match="no features for sample nope"):
    feature_store.FeatureStore(store).get("nope")
  # Writing into it with another image size is refused, and nothing is lost.
  before = sorted(p.name for p in store.iterdir())
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")
  with pytest.raises(records.ConfigMismatchError, match="image_size"):
    teacher_features.write_store(
      teacher, source, str(store), SYNTHETIC_BUILDER, "train", (224, 448), 24, 3
    )
  assert sorted(p.name for p in store.iterdir()) == before
  with pytest.raises(ValueError, match="not a multiple of synthetic's patch size 16; use 224x416"):
    feature_store.store_config(teacher, (224, 410), SYNTHETIC_BUILDER, "train", 4, 3)


def test_teacher_flag_help_lists_the_teachers():
  done = subprocess.run(
    [sys.executable, "-m", "data_prep.teacher_features", "--help"], capture_output=True, text=True
  )
  assert done.returncode in (0, 1) and "Traceback" not in done.stderr  # absl exits 1 on --help
  assert all(name in done.stdout for name in teachers.TEACHERS), done.stdout[-2000:]


def test_store_with_wrong_record_shape_is_refused(tmp_path, teacher):
  config = feature_store.store_config(teacher, (224, 416), SYNTHETIC_BUILDER, "x", 1, 1)
  writer = records.ShardedWriter(str(tmp_path), config, 1, name=feature_store.STORE_NAME)
  writer.write_shard(0, [{"token": "t", "features": np.zeros((6, 14, 26, 256), np.float16)}])
  writer.finalize()
  with pytest.raises(records.RecordError, match=r"record t holds features \(6, 14, 26, 256\)"):
    feature_store.FeatureStore(tmp_path)[0]


def test_synthetic_teacher_needs_its_world(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a synthetic world"):
    teachers.load("synthetic", tmp_path)
  (tmp_path / "synthetic").mkdir()
  (tmp_path / "synthetic" / "meta.json").write_text('{"cameras": []}')  # a lidar-only world
  with pytest.raises(errors.DataError, match="without cameras"):
    teachers.load("synthetic", tmp_path)
  with pytest.raises(ValueError, match="unknown teacher 'sam'"):
    teachers.load("sam")


class _OverflowingTeacher:
  """The synthetic teacher with its features scaled past float16's range on one camera,
  as an unnormalised teacher output can be; everything else is the real teacher's."""

  def __init__(self, teacher, camera: int):
    self._teacher, self._camera = teacher, camera

  def __getattr__(self, name):
    return getattr(self._teacher, name)

  def dense_features(self, images, camera_tokens):
    feats = self._teacher.dense_features(images, camera_tokens)
    feats[self._camera :: len(classes.NUSCENES_CAMERAS)] *= 1e6  # beyond 65504
    return feats


def test_non_finite_features_are_refused_at_write_and_read(pipeline, teacher, tmp_path):
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "val")
  token = source[0]["token"].decode()
  with pytest.raises(records.RecordError, match=f"sample {token} holds non-finite.*CAM_BACK_RIGHT"):
    teacher_features.write_store(
      _OverflowingTeacher(teacher, 2), source, str(tmp_path / "a"), SYNTHETIC_BUILDER, "val"
    )
  assert not list((tmp_path / "a").glob("*.array_record"))
  # A store that holds NaN (written by older code, or altered) is refused by the reader.
  config = feature_store.store_config(teacher, (224, 416), SYNTHETIC_BUILDER, "x", 1, 1)
  writer = records.ShardedWriter(str(tmp_path / "b"), config, 1, name=feature_store.STORE_NAME)
  features = np.zeros((6, 14, 26, 512), np.float16)
  features[5, 3, 4, 100] = np.nan
  writer.write_shard(0, [{"token": "t", "features": features}])
  writer.finalize()
  with pytest.raises(records.RecordError, match=f"{tmp_path / 'b'}: sample t .*CAM_FRONT_LEFT"):
    feature_store.FeatureStore(tmp_path / "b").get("t")


def test_a_rerun_of_the_writer_repairs_a_damaged_shard(store, pipeline, teacher, tmp_path, caplog):
  copy = tmp_path / "features"
  shutil.copytree(store, copy)
  shard = sorted(copy.glob("*.array_record"))[0]
  intact = shard.read_bytes()
  damaged = bytearray(intact)
  damaged[len(damaged) // 2] ^= 0xFF
  shard.write_bytes(bytes(damaged))
  caplog.set_level("WARNING")
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")
  teacher_features.write_store(
    teacher, source, str(copy), SYNTHETIC_BUILDER, "train", records_per_shard=3
  )
  assert f"shard {shard.name} does not match the sha256" in caplog.text
  assert shard.read_bytes() == intact
