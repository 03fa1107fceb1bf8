"""WaffleIron in the pipeline: the voxeliser's kNN map, packs that carry it, a pretraining
step with every loss, and (slow) the embedded default end to end with the CPU-sized model."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SYNTHETIC_BUILDER, pretrain_config, xla_flags

from configs import default as default_config
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config_module
from reldistill_jax import errors, finetune, input_pipeline, packing, records, runtime, train
from reldistill_jax.models import waffleiron, waffleiron_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def knn_buckets(pipeline, tmp_path_factory):
  """0.4 m buckets of the pipeline world's `train` split with a 16-neighbour kNN map."""
  from data_prep import voxelise

  out = tmp_path_factory.mktemp("knn") / "buckets"
  source = functools.partial(
    voxelise.open_builder_split, str(pipeline["tfds"]), SYNTHETIC_BUILDER, "train"
  )
  config = voxelise.bucket_config(
    SYNTHETIC_BUILDER, "train", len(source()), voxel_size=0.4, num_stages=2,
    records_per_shard=2, knn=16,
  )  # fmt: skip
  voxelise.voxelise_split(source, str(out), config, workers=1)
  return out


def test_the_voxeliser_stores_each_scans_knn_map(knn_buckets):
  store = records.ShardedReader(knn_buckets)
  assert store.config["knn"] == 16
  for index in range(len(store)):
    bucket = store[index]
    expected = waffleiron_inputs.knn_indices(bucket["features"][:, :3], 16)
    assert bucket["knn"].dtype == np.int32 and bucket["knn"].shape == (bucket["num_voxels"], 16)
    np.testing.assert_array_equal(bucket["knn"], expected)


def test_a_pack_moves_every_scans_knn_map_by_its_first_token(knn_buckets):
  store = records.ShardedReader(knn_buckets)
  transform = input_pipeline.Transform(0, 1.0 / 255)
  examples = [transform(store[i]) for i in range(2)]
  counts = [len(e["knn"]) for e in examples]
  # Stage 0 only (what WaffleIron reads), 5 padding tokens, a third slot left empty.
  total = sum(counts) + 5
  budgets = packing.Budgets(tokens=(total,), attention=(total,), scans=3, patch_size=1)
  packed = packing.pack(examples, budgets)
  tokens = budgets.tokens[0]
  assert packed["knn"].shape == (tokens, 16) and packed["scan"].shape == (tokens,)
  np.testing.assert_array_equal(packed["knn"][: counts[0]], examples[0]["knn"])
  np.testing.assert_array_equal(
    packed["knn"][counts[0] : sum(counts)], examples[1]["knn"] + counts[0]
  )
  assert np.all(packed["knn"][sum(counts) :] == tokens)
  assert packed["scan"].tolist() == [0] * counts[0] + [1] * counts[1] + [budgets.scans] * (
    tokens - sum(counts)
  )
  assert packed["slots"].tolist() == [True, True] + [False] * (budgets.scans - 2)


def _waffleiron_config(data, buckets, **extra):
  config = pretrain_config(data, **extra)
  config.model.name, config.model.variant, config.model.norm = "waffleiron", "tiny", "batch"
  config.input.buckets = str(buckets)
  return config


def test_a_store_without_the_knn_map_is_refused_in_one_line(small_training_data):
  config = _waffleiron_config(small_training_data, small_training_data["buckets"])
  store = records.ShardedReader(small_training_data["buckets"])
  with pytest.raises(errors.DataError, match=r"has no kNN map of 16 neighbours, which the "
                     r"waffleiron reads; voxelise the split again with --knn 16"):  # fmt: skip
    runtime.pack_budgets(config, store, 2)


def test_waffleiron_pretrains_with_the_relational_loss(small_training_data, knn_buckets, tmp_path):
  config = _waffleiron_config(small_training_data, knn_buckets, num_steps=2)
  out = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(out["measurements"]["loss"]) and out["measurements"]["pairs"] > 0
  assert out["measurements"]["grad_norm"] > 0


# Two more pretrainings, then the embedded default end to end (about 2 minutes).
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["contrastive", "similarity"])
def test_waffleiron_pretrains_with_every_loss(small_training_data, knn_buckets, tmp_path, loss):
  config = _waffleiron_config(small_training_data, knn_buckets, num_steps=2, **{"loss.name": loss})
  out = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(out["measurements"]["loss"]) and out["measurements"]["grad_norm"] > 0


@pytest.mark.slow
def test_the_default_pipeline_runs_with_the_cpu_sized_waffleiron(tmp_path):
  command = [sys.executable, "-m", "reldistill_jax.main",
             "--config=configs/default.py:model=waffleiron12_64,runlocal", f"--workdir={tmp_path}"]  # fmt: skip
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  for key in ("zeroshot", "fewshot_1pct"):
    assert 0.0 <= metrics[key]["miou"] <= 1.0, key
  pretrain = json.loads((tmp_path / "pretrain" / "config.json").read_text())
  assert pretrain["model"]["name"] == "waffleiron" and pretrain["model"]["variant"] == "12_64"
  assert default_config.get_config("model=waffleiron12_64").data.voxel.knn == 16


def test_waffleiron_fine_tunes_with_scalrs_head_and_layer_decay(knn_buckets, tmp_path):
  config = finetune_config.get_config(
    "dataset=synthetic,fraction=1pct,mode=finetune,model=waffleiron12_64,runlocal"
  )
  assert config.head == "batchnorm_zero" and config.optimizer.layer_decay == 0.95
  config.model.variant = "tiny"
  config.input.buckets = config.input.val_buckets = str(knn_buckets)
  config.input.split = config.input.val_split = "train"  # the fixture's store
  config.input.batch_size = config.input.pack_size = config.eval.batch_size = 4
  config.input.augment.rotate, config.input.augment.flip = False, False
  config.optimizer.warmup_epochs, config.num_epochs, config.mesh.data = 0, 2, 1
  out = finetune.finetune_and_evaluate(config, tmp_path)
  losses = [r["loss"] for r in out["history"] if "loss" in r]
  assert len(losses) == out["num_steps"] == 2 and losses[-1] < losses[0], losses
  head = out["state"]["params"]["head"]
  assert float(jnp.abs(head["params"]["linear"]["kernel"]).max()) > 0  # it started at zero
  assert "batch_stats" in head  # the head's BatchNorm statistics, updated in training
  assert 0.0 <= out["metrics"]["miou"] <= 1.0


def test_drop_path_draws_from_the_steps_key_in_training_only(knn_buckets):
  """ScaLR fine-tunes with stochastic depth: `runtime.encode` hands the step's key to the
  model in training; evaluation (and no key) runs every layer."""
  store = records.ShardedReader(knn_buckets)
  transform = input_pipeline.Transform(0, 1.0 / 255)
  example = transform(store[0])
  n = len(example["knn"])
  budgets = packing.Budgets(tokens=(n,), attention=(n,), scans=1, patch_size=1)
  batch = {k: v[None] for k, v in packing.pack([example], budgets).items() if k != "token"}
  model = waffleiron.Model(variant="tiny", out_dim=8, drop_path=0.5)
  variables = model.init(jax.random.key(0), batch)
  out = lambda train, rng: runtime.encode(model, variables, batch, train, rng)[0][0]
  first, second = (out(True, jax.random.key(k)) for k in (1, 2))
  assert not np.allclose(first, second)  # each step's key drops other layers
  np.testing.assert_array_equal(out(True, jax.random.key(1)), first)  # one key, one draw
  plain = out(False, None)
  np.testing.assert_array_equal(out(False, jax.random.key(1)), plain)  # evaluation: all layers
  config = finetune_config.get_config("dataset=synthetic,fraction=1pct,model=waffleiron48_768")
  assert config.model.drop_path == 0.2


def test_scalrs_pretraining_recipe_for_waffleiron():
  """ScaLR: DINOv2's last block before its norm, the L2 distance of unit vectors, AdamW 2e-3
  with weight decay 0.03, LayerNorm, one camera a scan, scaling of +-10%."""
  config = pretrain_config_module.get_config(
    "loss=similarity,teacher=dinov2_vitb14,model=waffleiron48_768"
  )
  assert config.dense == "tokens_prenorm" and config.loss.similarity == "l2"
  assert (config.optimizer.name, config.optimizer.lr, config.optimizer.weight_decay) == (
    "adamw", 2e-3, 0.03,
  )  # fmt: skip
  assert config.model.norm == "layer" and config.input.cameras_per_scan == 1
  assert tuple(config.input.augment.scale) == (0.9, 1.1)
  assert config.input.augment.flip_one == pytest.approx(2 / 3)
  other = pretrain_config_module.get_config("loss=similarity,teacher=dinov2_vitb14")
  assert other.loss.similarity == "cosine" and other.input.cameras_per_scan == 0
