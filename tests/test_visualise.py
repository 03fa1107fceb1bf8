"""The notebooks' pictures: scans joined by token, per-point values, PCA colours,
prompt scores and pair features, against direct numpy restatements."""

import jax
import numpy as np
import pytest
from conftest import SYNTHETIC_BUILDER
from PIL import Image

from data_prep.builders import data_source
from reldistill_jax import classes, feature_store, input_pipeline, records, report, visualise
from reldistill_jax.evaluators import structural_gap
from reldistill_jax.models import point_encoder

PATCH = 128


@pytest.fixture(scope="module")
def scan(small_training_data, pipeline):
  buckets = records.ShardedReader(str(small_training_data["buckets"]))
  return visualise.load_scan(data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train"), buckets, 1)


@pytest.fixture(scope="module")
def student(small_training_data):
  buckets = records.ShardedReader(str(small_training_data["buckets"]))
  model = point_encoder.Model(variant="tiny", out_dim=512, patch_size=PATCH)
  transform = input_pipeline.Transform(0, 1 / 255)
  example = input_pipeline.one_scan_batch(transform(buckets[0]), PATCH)
  return model, model.init(jax.random.key(0), example), transform


def test_load_scan_joins_record_and_bucket_by_token(scan, pipeline, small_training_data):
  record = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")[1]
  assert scan.token == record["token"].decode()
  n = len(record["points"])
  assert scan.points.shape == (n, 3) and scan.points.dtype == np.float32
  np.testing.assert_array_equal(scan.points, record["points"][:, :3])
  assert scan.labels.shape == (n,) and scan.point_to_voxel.shape == (n,)
  assert scan.bucket["token"] == scan.token
  m = len(record["pairs_point"])
  assert scan.pairs_uv.shape == (m, 2) and scan.pairs_camera.shape == (m,)
  assert len(scan.images) == 6 and scan.image(0).shape == (900, 1600, 3)
  # The kept point of every valid voxel is one of the scan's points in that voxel.
  valid = scan.point_to_voxel >= 0
  assert valid.all()
  kept = scan.bucket["features"][scan.point_to_voxel, :3]
  assert np.abs(kept - scan.points).max() < 0.4 * np.sqrt(3) + 1e-5  # within one 0.4 m voxel


def test_load_scan_refuses_a_bucket_of_another_scan(small_training_data, pipeline):
  buckets = records.ShardedReader(str(small_training_data["buckets"]))
  source = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")

  class Swapped:
    path = buckets.path

    def get(self, token):
      other = next(t for t in buckets.tokens if t != token)
      return buckets.get(other)

  with pytest.raises(ValueError, match="points"):
    visualise.load_scan(source, Swapped(), 0)
  with pytest.raises(KeyError):
    visualise.load_scan(source, records.ShardedReader(str(small_training_data["val_buckets"])), 0)


def test_point_values(scan):
  per_voxel = np.arange(scan.bucket["num_voxels"], dtype=np.float32)
  values = visualise.point_values(scan, per_voxel)
  np.testing.assert_array_equal(values, scan.point_to_voxel.astype(np.float32))
  values = visualise.point_values(scan, per_voxel[:, None].repeat(2, 1))
  assert values.shape == (len(scan.point_to_voxel), 2)


def test_pca_colours_follow_the_principal_axis():
  rng = np.random.default_rng(0)
  t = np.linspace(-1, 1, 500)
  direction = rng.normal(size=16)
  x = t[:, None] * direction + 0.01 * rng.normal(size=(500, 16))
  mask = np.ones(500, bool)
  mask[::50] = False
  rgb = visualise.pca_colours(x, mask)
  assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1
  # Channel 0 is the first component: monotonic along t (up to its sign).
  corr = np.corrcoef(rgb[mask, 0], t[mask])[0, 1]
  assert abs(corr) > 0.99
  np.testing.assert_allclose(rgb[~mask], np.tile([200 / 255] * 3, (10, 1)))
  with pytest.raises(ValueError, match="at least 3"):
    visualise.pca_colours(x[:2])


def test_prompt_scores_are_cosines():
  rng = np.random.default_rng(1)
  x, text = rng.normal(size=(7, 4, 32)), rng.normal(size=(1, 32))
  expected = np.einsum("abd,d->ab", x, text[0]) / (
    np.linalg.norm(x, axis=-1) * np.linalg.norm(text)
  )
  np.testing.assert_allclose(visualise.prompt_scores(x, text), expected, rtol=1e-12)
  with pytest.raises(ValueError, match="text embedding"):
    visualise.prompt_scores(x, text[:, :8])


def test_class_colours():
  labels = np.array([0, 1, 16, 4])
  rgb = visualise.class_colours(labels, classes.NUSCENES_CLASSES)
  palette = report.class_palette(classes.NUSCENES_CLASSES)
  np.testing.assert_allclose(rgb[1:], palette[[0, 15, 3]])
  assert rgb[0].tolist() == [200 / 255] * 3
  with pytest.raises(ValueError, match="outside"):
    visualise.class_colours(np.array([17]), classes.NUSCENES_CLASSES)


def test_plot_scan_writes_a_picture(scan, student, tmp_path):
  model, params, transform = student
  features = visualise.voxel_features(model, params, scan.bucket, transform, PATCH)
  assert features.shape == (scan.bucket["num_voxels"], 512) and features.dtype == np.float32
  rgb = visualise.pca_colours(visualise.point_values(scan, features))
  path = visualise.plot_scan(scan, rgb, tmp_path / "pca.png", cameras=(0, 3))
  assert Image.open(path).size[0] > 1500
  scores = visualise.point_values(scan, visualise.prompt_scores(features, features[0]))
  visualise.plot_scan(scan, scores, tmp_path / "scores.png", colourbar_label="cosine")
  with pytest.raises(ValueError, match="colours for the"):
    visualise.plot_scan(scan, rgb[:10], tmp_path / "bad.png")


def test_pair_features_match_the_store(small_training_data, student, tmp_path):
  model, params, _ = student
  buckets = records.ShardedReader(str(small_training_data["buckets"]))
  store = feature_store.FeatureStore(small_training_data["features"])
  joined = input_pipeline.JoinedSource(buckets, store)[0]
  grid = tuple(store.config["grid"])
  transform = input_pipeline.Transform(512, 1 / 255, grid=grid)
  k, q, labels = visualise.pair_features(model, params, joined, transform, PATCH)
  m = min(512, len(joined["pairs_voxel"]))
  assert k.shape == (m, 512) and q.shape == (m, 512) and labels.shape == (m,)
  np.testing.assert_allclose(np.linalg.norm(k, axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, rtol=1e-5)
  np.testing.assert_array_equal(labels, joined["labels"][joined["pairs_voxel"][:m]])
  # Teacher features of the pairs: the nearest cell's map value, up to the
  # bilinear blend with its neighbours (cosine > 0.5 for the smooth maps).
  maps = np.asarray(joined["teacher"], np.float32)
  cam = joined["pairs_camera"][:m].astype(int)
  h, w = grid
  sizes = joined["image_sizes"][cam]
  uv = joined["pairs_uv"][:m]
  rows = np.clip((uv[:, 1] * h / sizes[:, 0]).astype(int), 0, h - 1)
  cols = np.clip((uv[:, 0] * w / sizes[:, 1]).astype(int), 0, w - 1)
  nearest = maps[cam, rows, cols]
  nearest /= np.linalg.norm(nearest, axis=1, keepdims=True)
  assert np.median((nearest * q).sum(1)) > 0.9
  path = visualise.plot_similarity_matrices(
    k, q, labels, classes.NUSCENES_CLASSES, tmp_path / "sim.png", max_pairs=200
  )
  assert Image.open(path).size[0] > 1000
  assert structural_gap.structural_gap(k, q) > 0
  with pytest.raises(ValueError, match="matched pairs"):
    visualise.plot_similarity_matrices(k, q[:5], labels, classes.NUSCENES_CLASSES, path)
