"""Few-shot fine-tuning and linear probing: the Lovasz loss, the loop, freezing, init_from."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from reldistill_jax import finetune, input_pipeline, records, runtime, train

FINETUNE_OVERRIDES = {
  "input.split": "train",  # the fixture's store; real runs use the config's subset
  "input.val_split": "train",
  "input.batch_size": 4,  # every scan: each step sees the same batch
  "input.pack_size": 4,
  "input.augment.rotate": False,
  "input.augment.flip": False,
  "input.augment.scale": (1.0, 1.0),
  "eval.batch_size": 4,
  "model.patch_size": 128,
  "mesh.data": 1,
  "num_epochs": 4,
  "log_every": 1,
  "checkpoint.every": 100,
}


def _set(config, overrides):
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def _finetune_config(data, mode, **extra):
  config = finetune_config.get_config(f"dataset=synthetic,fraction=100pct,mode={mode},runlocal")
  config.input.buckets = str(data["buckets"])
  config.input.val_buckets = str(data["buckets"])
  return _set(config, {**FINETUNE_OVERRIDES, **extra})


# Lovasz-softmax against a numpy restatement of the reference.


def _lovasz_grad_np(gt_sorted):
  gts = gt_sorted.sum()
  intersection = gts - np.cumsum(gt_sorted)
  union = gts + np.cumsum(1.0 - gt_sorted)
  jaccard = 1.0 - intersection / union
  jaccard[1:] = jaccard[1:] - jaccard[:-1]
  return jaccard


def _lovasz_softmax_np(probs, labels, mask):
  """The reference's lovasz_softmax_flat (classes="present") on the unmasked rows."""
  probs, labels = probs[mask].astype(np.float64), labels[mask]
  losses = []
  for c in range(probs.shape[1]):
    fg = (labels == c).astype(np.float64)
    if fg.sum() == 0:
      continue
    errors = np.abs(fg - probs[:, c])
    perm = np.argsort(-errors, kind="stable")
    losses.append(np.dot(errors[perm], _lovasz_grad_np(fg[perm])))
  return float(np.mean(losses)) if losses else 0.0


def _case(seed, n, c, valid=0.8, num_labels=None):
  rng = np.random.default_rng(seed)
  probs = np.asarray(jax.nn.softmax(rng.normal(size=(n, c)) * 2.0))
  labels = rng.integers(0, num_labels or c, n)  # num_labels < c: the last classes are absent
  mask = rng.random(n) < valid
  return probs, labels, mask


CASES = [
  (0, 12, 4, 0.8, None),
  (1, 50, 5, 0.6, 3),  # classes 3 and 4 absent
  (2, 30, 3, 1.0, 1),  # one class present
  (3, 7, 6, 0.5, None),
  (4, 9, 4, 0.0, None),  # nothing valid
  (5, 20, 4, 0.1, None),  # one or two valid rows
]


@pytest.mark.parametrize("case", CASES)
def test_lovasz_softmax_matches_numpy(case):
  probs, labels, mask = _case(*case)
  got = finetune.lovasz_softmax(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(mask))
  assert float(got) == pytest.approx(_lovasz_softmax_np(probs, labels, mask), abs=1e-6)


def test_lovasz_softmax_gradient_matches_finite_differences():
  probs, labels, mask = _case(6, 10, 3, 0.8, 2)  # class 2 absent
  grad = jax.grad(finetune.lovasz_softmax)(
    jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(mask)
  )
  eps = 1e-6
  numeric = np.zeros_like(probs, np.float64)
  for i, j in itertools.product(range(probs.shape[0]), range(probs.shape[1])):
    up, down = probs.astype(np.float64), probs.astype(np.float64)
    up[i, j] += eps
    down[i, j] -= eps
    f = lambda p: _lovasz_softmax_np(p, labels, mask)
    numeric[i, j] = (f(up) - f(down)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-5)
  assert not np.any(np.asarray(grad)[~mask])  # masked rows get no gradient
  assert np.any(np.asarray(grad)[mask])


def test_lovasz_softmax_of_hard_predictions_is_one_minus_the_jaccard_index():
  # The extension equals the set function at the vertices: errors in {0, 1}.
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 1, 0])
  pred = np.array([0, 1, 0, 1, 2, 2, 2, 0, 1, 0])
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
  probs = np.eye(4)[pred]  # class 3: never labelled (absent), never predicted
  jaccard = []
  for c in range(3):
    inter = np.sum((pred == c) & (labels == c) & mask)
    union = np.sum(((pred == c) | (labels == c)) & mask)
    jaccard.append(inter / union)
  got = finetune.lovasz_softmax(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(mask))
  assert float(got) == pytest.approx(1.0 - np.mean(jaccard), abs=1e-6)


# The loop.


def _init_params(config, data, num_steps):
  """The fresh parameters a run of `config` starts from (before init_from), built by the
  run's own initial-state program, which the test run's compilation cache then serves."""
  buckets = records.ShardedReader(str(data["buckets"]))
  example = input_pipeline.example_batch(buckets, config.input, config.model.patch_size)
  encoder, head = runtime.make_model(config), finetune.make_head(config)
  tx, _ = finetune.make_optimizer(config, num_steps, encoder)
  make_state = runtime.sharded_state(
    lambda rng: finetune.init_params(encoder, head, example, rng),
    tx, config.seed, runtime.make_mesh(config),
  )[3]  # fmt: skip
  return make_state()["params"]


def _trees_equal(a, b) -> bool:
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in leaves)


def _check_metrics(metrics, workdir):
  assert np.isfinite(metrics["miou"]) and 0.0 <= metrics["miou"] <= 1.0
  assert metrics["num_scans"] == 4 and metrics["num_points"] > 0
  assert (workdir / "metrics.json").is_file() and (workdir / "report.md").is_file()


def test_finetuning_reduces_the_training_loss(small_training_data, tmp_path):
  # Rates a tenth of the protocol's: three steps of a tiny student on one batch.
  config = _finetune_config(
    small_training_data, "finetune",
    **{"optimizer.head_lr": 0.2, "optimizer.encoder_lr": 0.02, "num_epochs": 3},
  )  # fmt: skip
  out = finetune.finetune_and_evaluate(config, tmp_path)
  assert out["num_steps"] == 3  # 3 epochs of 4 scans, batch 4
  losses = [m["loss"] for m in out["history"] if "loss" in m]  # each before its step's update
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert np.all(np.diff(losses) < 0), losses
  assert not any("val_miou" in m for m in out["history"])  # no curve unless eval.every
  assert out["measurements"]["learning_rate/encoder"] > 0
  _check_metrics(out["metrics"], tmp_path)
  initial = _init_params(config, small_training_data, out["num_steps"])
  assert not _trees_equal(out["state"]["params"]["encoder"], initial["encoder"])
  assert not _trees_equal(out["state"]["params"]["head"], initial["head"])
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]


@pytest.fixture(scope="module")
def pretrained(small_training_data, tmp_path_factory):
  """The checkpoint folder of a 2-step pretraining run of the tiny student."""
  config = pretrain_config.get_config(
    "loss=relational,teacher=synthetic,dataset=synthetic,runlocal"
  )
  config.input.buckets = str(small_training_data["buckets"])
  config.input.features = str(small_training_data["features"])
  overrides = {
    "input.num_pairs": 256,
    "model.patch_size": 128,
    "mesh.data": 1,
    "num_steps": 2,
    "checkpoint.every": 2,
  }
  workdir = tmp_path_factory.mktemp("pretrain")
  train.train_and_evaluate(_set(config, overrides), workdir)
  return workdir / "checkpoints"


def test_linear_probe_keeps_the_pretrained_encoder_bit_identical(
  small_training_data, pretrained, tmp_path
):
  # With the validation curve every step: its last point is the final evaluation.
  config = _finetune_config(
    small_training_data, "linear",
    **{"checkpoint.init_from": str(pretrained), "num_epochs": 2, "eval.every": 1},
  )  # fmt: skip
  out = finetune.finetune_and_evaluate(config, tmp_path)
  curve = [(m["step"], m["val_miou"]) for m in out["history"] if "val_miou" in m]
  assert [step for step, _ in curve] == [1, 2]
  assert curve[-1][1] == out["metrics"]["miou"]
  # init_from loaded the pretrained student and the probe never changed it.
  assert _trees_equal(out["state"]["params"]["encoder"], runtime.load_params(pretrained))
  initial = _init_params(config, small_training_data, out["num_steps"])
  assert not _trees_equal(initial["encoder"], runtime.load_params(pretrained))
  assert not _trees_equal(out["state"]["params"]["head"], initial["head"])
  assert out["measurements"]["learning_rate/encoder"] == 0.0
  assert out["measurements"]["head_update_norm"] > 0
  _check_metrics(out["metrics"], tmp_path)


def test_init_from_refuses_a_student_of_another_size(small_training_data, pretrained, tmp_path):
  config = _finetune_config(
    small_training_data,
    "finetune",
    **{"checkpoint.init_from": str(pretrained), "model.out_dim": 256},
  )
  with pytest.raises(ValueError, match="does not match config.model"):
    finetune.finetune_and_evaluate(config, tmp_path)


def test_store_of_another_subset_is_refused(small_training_data, tmp_path):
  config = finetune_config.get_config("dataset=synthetic,fraction=1pct,runlocal")
  config.mesh.data = 1
  config.input.buckets = str(small_training_data["buckets"])
  config.input.val_buckets = str(small_training_data["buckets"])
  with pytest.raises(records.ConfigMismatchError, match="split"):
    finetune.finetune_and_evaluate(config, tmp_path)


def test_configs():
  nuscenes = finetune_config.get_config("dataset=nuscenes,fraction=1pct,mode=finetune")
  assert (nuscenes.subset, nuscenes.input.split, nuscenes.num_classes) == (
    "slidr_scene_1pct",
    "train_1pct",
    16,
  )
  assert (nuscenes.optimizer.head_lr, nuscenes.optimizer.encoder_lr) == (2.0, 0.02)
  assert (nuscenes.input.batch_size, nuscenes.input.intensity_scale) == (16, 1 / 255)
  kitti = finetune_config.get_config("dataset=semantic_kitti,fraction=1pct,mode=linear")
  assert (kitti.subset, kitti.num_classes, kitti.mode) == ("every_100th_scan", 19, "linear")
  assert (kitti.input.batch_size, kitti.input.intensity_scale) == (10, 1.0)
  assert finetune_config.get_config("fraction=100pct").subset == "all_train_scans"
  with pytest.raises(ValueError, match="fraction=10pct"):
    finetune_config.get_config("fraction=10pct")
