"""Evaluation over bucket stores: every point, padding, zero-shot, structural gap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax import (
  classes,
  evaluate,
  feature_store,
  input_pipeline,
  packing,
  pairs,
  records,
  teachers,
)
from reldistill_jax.evaluators import segmentation as segmentation_lib
from reldistill_jax.models import point_encoder

C = len(classes.NUSCENES_CLASSES)
PATCH = 128


@pytest.fixture(scope="module")
def buckets(small_training_data):
  return records.ShardedReader(str(small_training_data["buckets"]))


@pytest.fixture(scope="module")
def one_device():
  return jax.make_mesh(
    (1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
  )


@pytest.fixture(scope="module")
def student(buckets):
  model = point_encoder.Model(variant="tiny", out_dim=512, patch_size=PATCH)
  example = _example(_transform(), buckets[0], 0)
  return model, model.init(jax.random.key(0), example)


def _transform(num_pairs=0, grid=None):
  return input_pipeline.Transform(num_pairs, 1 / 255, grid=grid)


def _budgets(buckets, scans_per_pack: int) -> packing.Budgets:
  return packing.fit_budgets(buckets.sizes[:, :2], scans_per_pack, PATCH)


def _example(transform, record, index):
  """The batch of one scan alone, with the pair sample `predict_voxels` documents."""
  example = transform(record, np.random.default_rng((0, index)))
  return input_pipeline.one_scan_batch(example, PATCH)


class _Edited:
  """A bucket source whose records pass through `edit` (and may be cut to `size`)."""

  def __init__(self, reader, edit=lambda r: r, size=None):
    self.reader, self.edit, self.path = reader, edit, reader.path
    self.size = len(reader) if size is None else size
    self.sizes = reader.sizes[: self.size]

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    return self.edit(dict(self.reader[index]))


def _shifted(params, batch):
  """Each voxel's own label moved `shift` classes on (unlabelled voxels: class 1)."""
  labels = batch["labels"]  # (B, T0)
  return jnp.where(labels > 0, (labels - 1 + params["shift"]) % C + 1, 1)


def _direct_metrics(source, voxel_pred_fn):
  """mIoU and accuracy of point predictions, computed straight from the records."""
  preds, labels = [], []
  for i in range(len(source)):
    record = source[i]
    voxel_pred = voxel_pred_fn(record, i)
    p2v = record["point_to_voxel"]
    preds.append(np.array([voxel_pred[v] for v in p2v]))
    labels.append(record["point_labels"].astype(np.int64))
  pred, label = np.concatenate(preds), np.concatenate(labels)
  pred, label = pred[label > 0], label[label > 0]
  iou = {}
  for c in range(1, C + 1):
    tp = np.sum((pred == c) & (label == c))
    union = np.sum((pred == c) | (label == c))
    iou[classes.NUSCENES_CLASSES[c - 1]] = tp / union if union else np.nan
  values = np.array(list(iou.values()))
  return {
    "miou": float(np.nanmean(values)),
    "per_class_iou": iou,
    "accuracy": float(np.mean(pred == label)),
    "num_points": len(label),
    "num_unpredicted": int(np.sum(pred == 0)),
  }


def _check(metrics, expected):
  assert metrics["miou"] == pytest.approx(expected["miou"], rel=1e-12)
  assert metrics["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-12)
  assert metrics["num_points"] == expected["num_points"]
  assert metrics["num_unpredicted"] == expected["num_unpredicted"]
  np.testing.assert_allclose(
    list(metrics["per_class_iou"].values()), list(expected["per_class_iou"].values())
  )


def test_segmentation_on_every_point_for_any_pack_size(buckets, one_device, mesh):
  transform = _transform()
  source = _Edited(buckets)
  results = {}
  for shift in (0, 1):
    params = {"shift": jnp.int32(shift)}
    expected = _direct_metrics(
      source,
      lambda r, _, s=shift: np.where(r["labels"] > 0, (r["labels"].astype(int) - 1 + s) % C + 1, 1),
    )
    # 4 scans: packs of 1 and of 3 scans on one device, packs of 1 on 8 devices (the
    # last batch padded with copies of its last pack).
    for pack, m in ((1, one_device), (3, one_device), (1, mesh)):
      metrics = evaluate.segmentation(
        _shifted, params, source, transform, _budgets(buckets, pack), m, classes.NUSCENES_CLASSES
      )
      _check(metrics, expected)
      assert metrics["num_scans"] == len(buckets)
      assert metrics["empty_class_convention"] == "nan"
      results[(shift, pack)] = metrics
  # The voxels' own labels beat every one moved a class on.
  assert results[(0, 1)]["miou"] > 0.5 > results[(1, 1)]["miou"]


def test_segmentation_refuses_unlabelled_scans_and_empty_splits(buckets, one_device):
  transform = _transform()
  params = {"shift": jnp.int32(0)}
  names = classes.NUSCENES_CLASSES
  budgets = _budgets(buckets, 2)
  unlabelled = _Edited(buckets, lambda r: r | {"has_labels": False})
  with pytest.raises(ValueError, match=f"{buckets.path}.*no labels"):
    evaluate.segmentation(_shifted, params, unlabelled, transform, budgets, one_device, names)
  empty = _Edited(buckets, size=0)
  with pytest.raises(ValueError, match=f"{buckets.path}.*no scans"):
    evaluate.segmentation(_shifted, params, empty, transform, budgets, one_device, names)


def test_zero_shot_with_the_teachers_prototypes(buckets, student, pipeline, one_device):
  model, params = student
  text = teachers.load("synthetic", pipeline["world"]).text_embedding(classes.NUSCENES_CLASSES)
  transform = _transform()
  metrics = evaluate.zero_shot(
    model, params, buckets, text, transform, _budgets(buckets, 2), one_device,
    classes.NUSCENES_CLASSES,
  )  # fmt: skip
  assert np.isfinite(metrics["miou"]) and 0.0 <= metrics["miou"] <= 1.0
  assert metrics["num_unpredicted"] == 0

  apply = jax.jit(lambda p, b: model.apply(p, b)[0])
  unit = text / np.linalg.norm(text, axis=-1, keepdims=True)

  def voxel_pred(record, index):
    features = np.asarray(apply(params, _example(transform, record, index)))[0]  # (T0, D)
    return np.argmax(features @ unit.T, axis=-1)[: record["num_voxels"]] + 1

  expected = _direct_metrics(buckets, voxel_pred)
  # Packed and single-scan features may differ in the last bits: allow a few near-ties.
  assert metrics["miou"] == pytest.approx(expected["miou"], abs=1e-3)
  assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-3)
  assert metrics["num_points"] == expected["num_points"]


def _numpy_gap_and_cka(k, q):
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  n = len(k)
  diff = np.abs(k @ k.T - q @ q.T)
  gap = (diff.sum() - np.trace(diff)) / (n * n - n)
  h = np.eye(n) - 1.0 / n
  gk, gq = h @ k @ k.T @ h, h @ q @ q.T @ h
  cka = np.sum(gk * gq) / (np.linalg.norm(gk) * np.linalg.norm(gq))
  return gap, cka


def test_structural_gap_equals_a_direct_computation(
  buckets, student, small_training_data, one_device
):
  model, params = student
  store = feature_store.FeatureStore(str(small_training_data["features"]))
  transform = _transform(num_pairs=64, grid=tuple(store.config["grid"]))
  apply = jax.jit(lambda p, b: pairs.batch_pairs(model.apply(p, b)[0], b))
  ks, qs, keys = [], [], []
  for i in range(len(buckets)):
    record = buckets[i] | {"teacher": store.get(buckets[i]["token"])["features"]}
    k, q, mask = (np.asarray(x) for x in apply(params, _example(transform, record, i)))
    ks.append(k[mask].astype(np.float64))
    qs.append(q[mask].astype(np.float64))
    keys.append(np.random.default_rng((0, i, 1)).random(int(mask.sum())))
  k, q, keys = np.concatenate(ks), np.concatenate(qs), np.concatenate(keys)
  assert len(k) == 64 * len(buckets)  # every scan has more than 64 pairs

  budgets = _budgets(buckets, 3)
  result = evaluate.structural_gap(model, params, buckets, store, transform, budgets, one_device)
  gap, cka = _numpy_gap_and_cka(k, q)
  assert result["pairs"] == len(k)
  assert result["G"] == pytest.approx(gap, rel=1e-4)
  assert result["cka"] == pytest.approx(cka, rel=1e-4)

  # A subsample: the pairs with the 100 smallest keys of their scans' rngs.
  result = evaluate.structural_gap(
    model, params, buckets, store, transform, budgets, one_device, max_pairs=100
  )
  keep = np.sort(np.argsort(keys)[:100])
  gap, cka = _numpy_gap_and_cka(k[keep], q[keep])
  assert result["pairs"] == 100
  assert result["G"] == pytest.approx(gap, rel=1e-4)
  assert result["cka"] == pytest.approx(cka, rel=1e-4)


def test_zero_shot_on_the_paired_points_for_student_and_teacher(
  buckets, student, small_training_data, pipeline, one_device
):
  """Both zero-shot scores over the same pairs, against a direct numpy computation."""
  model, params = student
  store = feature_store.FeatureStore(str(small_training_data["features"]))
  text = teachers.load("synthetic", pipeline["world"]).text_embedding(classes.NUSCENES_CLASSES)
  unit = text / np.linalg.norm(text, axis=-1, keepdims=True)
  transform = _transform(num_pairs=64, grid=tuple(store.config["grid"]))
  apply = jax.jit(lambda p, b: pairs.batch_pairs(model.apply(p, b)[0], b))
  size = C + 1
  expected = {
    "student": np.zeros((size, size), np.int64),
    "teacher": np.zeros((size, size), np.int64),
  }
  for i in range(len(buckets)):
    record = buckets[i] | {"teacher": store.get(buckets[i]["token"])["features"]}
    batch = _example(transform, record, i)
    k, q, mask = (np.asarray(x) for x in apply(params, batch))
    labels = np.asarray(batch["labels"])[0][np.asarray(batch["pairs_voxel"])[0]][mask]
    for who, x in (("student", k[mask]), ("teacher", q[mask])):
      pred = np.argmax(x @ unit.T, axis=-1) + 1
      np.add.at(expected[who], (labels, pred), 1)
  for counts in expected.values():
    counts[0] = 0  # ignore-labelled pairs are not scored
  result = evaluate.structural_gap(
    model, params, buckets, store, transform, _budgets(buckets, 3), one_device,
    text_embeddings=text, class_names=classes.NUSCENES_CLASSES,
  )  # fmt: skip
  for name, who in (("zeroshot_paired", "student"), ("zeroshot_teacher", "teacher")):
    want = segmentation_lib.segmentation_metrics(expected[who], classes.NUSCENES_CLASSES)
    assert result[name]["num_points"] == want["num_points"] > 0
    # Packed and single-scan features may differ in the last bits: a few near-ties.
    assert result[name]["miou"] == pytest.approx(want["miou"], abs=2e-3)
  # The synthetic teacher classifies its own features far better than an untrained student.
  assert result["zeroshot_teacher"]["miou"] > 0.3 > result["zeroshot_paired"]["miou"]
  assert "zeroshot_paired" not in evaluate.structural_gap(
    model, params, buckets, store, transform, _budgets(buckets, 3), one_device
  )


def test_structural_gap_needs_pairs_on_the_stores_grid(buckets, student, small_training_data):
  model, params = student
  store = feature_store.FeatureStore(str(small_training_data["features"]))
  budgets = _budgets(buckets, 1)
  with pytest.raises(ValueError, match="num_pairs"):
    evaluate.structural_gap(model, params, buckets, store, _transform(), budgets, None)
  with pytest.raises(ValueError, match="grid"):
    evaluate.structural_gap(
      model, params, buckets, store, _transform(8, grid=(3, 3)), budgets, None
    )
