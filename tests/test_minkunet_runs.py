"""MinkUNet34C through the CLI: pretraining, then 1% fine-tuning from its checkpoint, then a
linear probe that leaves the encoder (its BatchNorm statistics included) untouched."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from reldistill_jax import finetune, runtime
from tests.conftest import SYNTHETIC_BUILDER


@pytest.fixture(scope="module")
def mink_data(pipeline, tmp_path_factory) -> dict:
  """5-stage 0.4 m buckets of the pipeline world's `train` split and its teacher features."""
  from data_prep import teacher_features, voxelise
  from data_prep.builders import data_source
  from reldistill_jax import teachers

  tmp = tmp_path_factory.mktemp("mink")
  source = functools.partial(
    voxelise.open_builder_split, str(pipeline["tfds"]), SYNTHETIC_BUILDER, "train"
  )
  config = voxelise.bucket_config(
    SYNTHETIC_BUILDER, "train", len(source()), voxel_size=0.4, num_stages=5, records_per_shard=2
  )
  voxelise.voxelise_split(source, str(tmp / "buckets"), config, workers=1)
  teacher = teachers.load("synthetic", pipeline["world"])
  split = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")
  teacher_features.write_store(teacher, split, str(tmp / "features"), SYNTHETIC_BUILDER, "train")
  return {"buckets": tmp / "buckets", "features": tmp / "features"}


def _main(config: str, workdir, *flags) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "reldistill_jax.main", f"--config={config}",
             f"--workdir={workdir}", "--config.mesh.data=1", *flags]  # fmt: skip
  return subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=900)


@pytest.fixture(scope="module")
def pretrained(mink_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mink_pretrain")
  done = _main(
    "configs/pretrain.py:loss=relational,teacher=synthetic,dataset=synthetic,model=minkunet34c,"
    "runlocal",
    workdir,
    f"--config.input.buckets={mink_data['buckets']}",
    f"--config.input.features={mink_data['features']}",
    "--config.input.num_pairs=256",
    "--config.num_steps=2",
    "--config.checkpoint.every=2",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_pretraining_runs_and_updates_the_batch_statistics(pretrained):
  params = runtime.load_params(pretrained / "checkpoints")
  assert set(params) == {"params", "batch_stats"}
  assert params["params"]["block4_5"]["conv2"]["kernel"].shape == (27, 256, 256)  # 34C
  stats = params["batch_stats"]["bn0"]
  assert np.any(np.asarray(stats["mean"]) != 0) and np.all(np.asarray(stats["var"]) > 0)
  config = (pretrained / "config.json").read_text()
  assert '"name": "sgd"' in config and '"dampening": 0.1' in config
  assert '"bn_momentum": 0.05' in config


@pytest.mark.slow
def test_fewshot_finetuning_from_the_checkpoint(mink_data, pretrained, tmp_path):
  done = _main(
    "configs/finetune.py:dataset=synthetic,fraction=1pct,mode=finetune,model=minkunet34c,runlocal",
    tmp_path,
    f"--config.input.buckets={mink_data['buckets']}",
    "--config.input.split=train",
    f"--config.input.val_buckets={mink_data['buckets']}",
    "--config.input.val_split=train",
    f"--config.checkpoint.init_from={pretrained / 'checkpoints'}",
    "--config.num_epochs=1",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "mIoU" in done.stdout + done.stderr
  assert (tmp_path / "metrics.json").is_file() and (tmp_path / "report.md").is_file()


@pytest.mark.slow
def test_linear_probe_keeps_the_encoder_and_its_statistics(mink_data, pretrained, tmp_path):
  config = finetune_config.get_config(
    "dataset=synthetic,fraction=1pct,mode=linear,model=minkunet34c,runlocal"
  )
  config.input.buckets = config.input.val_buckets = str(mink_data["buckets"])
  config.input.split = config.input.val_split = "train"
  config.checkpoint.init_from = str(pretrained / "checkpoints")
  config.mesh.data, config.num_epochs = 1, 1
  out = finetune.finetune_and_evaluate(config, tmp_path)
  before = runtime.load_params(pretrained / "checkpoints")
  after = out["state"]["params"]["encoder"]
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_configs_name_the_backbones_and_their_recipes():
  mink = pretrain_config.get_config("model=minkunet34c")
  assert (mink.model.name, mink.model.variant, mink.model.bn_momentum) == ("minkunet", "34c", 0.05)
  assert (mink.optimizer.name, mink.optimizer.lr, mink.optimizer.dampening) == ("sgd", 0.5, 0.1)
  assert (mink.optimizer.weight_decay, mink.optimizer.warmup_steps) == (1e-4, 0)
  ptv3 = pretrain_config.get_config("model=ptv3_base")
  assert (ptv3.model.name, ptv3.model.variant, ptv3.optimizer.name) == (
    "point_encoder", "base", "adamw",
  )  # fmt: skip
  assert pretrain_config.get_config("model=minkunet18a,recipe=scalr").optimizer.name == "adamw"
  ft = finetune_config.get_config("model=minkunet34c")
  assert (ft.optimizer.head_lr, ft.optimizer.encoder_lr, ft.optimizer.dampening) == (2.0, 0.02, 0.1)
  with pytest.raises(ValueError, match="model=resnet"):
    pretrain_config.get_config("model=resnet")
