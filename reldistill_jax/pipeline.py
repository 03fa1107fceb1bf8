"""The embedded default: every stage on the synthetic world, with no other input.

`run_default(config, workdir)` (configs/default.py):

  workdir/data/world              the synthetic world (nuScenes format; its
                                  lidar and cameras: `config.data.world`); the
                                  data stages go to `config.data.root`
                                  instead when it is set (shared by runs)
  workdir/data/tfds               its TFDS build
  workdir/data/buckets/<split>    voxel buckets of train, val, train_1pct (and
                                  train_parametrize, train_verify with
                                  `config.data.parametrize`)
  workdir/data/features/<split>   synthetic-teacher feature stores (train, val;
                                  the same two parametrize splits); none for
                                  a world without cameras
  workdir/data/text.npz           the teacher's class text embeddings (idem)
                                  (both under workdir/data/teacher_<settings>/ for
                                  a teacher less or more imperfect than the
                                  default: `config.data.teacher`)
  workdir/pretrain                the pretraining run (checkpoints, tensorboard)
  workdir/fewshot                 the 1% fine-tuning run
  workdir/metrics.json, report.md, plots/

Each data stage is skipped when its output is complete (the stages are
idempotent and refuse outputs written with other settings), so a rerun in the
same workdir resumes where the last one stopped.
"""

import functools
import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging

from data_prep import build, teacher_features, text_embeddings, voxelise
from data_prep.builders import data_source
from data_prep.synthetic import writer
from reldistill_jax import (
  classes,
  config_checks,
  curves,
  errors,
  evaluate,
  evaluation_runs,
  feature_store,
  finetune,
  input_pipeline,
  records,
  report,
  runtime,
  teachers,
  train,
  workdir_config,
)
from reldistill_jax.evaluators import zeroshot as zeroshot_lib

SPLITS = ("train", "val", "train_1pct")
FEATURE_SPLITS = ("train", "val")
# SLidR's parametrize protocol: settings chosen on held-out training scenes
# (`config.data.parametrize`; the study's sweep).
PARAMETRIZE_SPLITS = ("train_parametrize", "train_verify")


def _splits(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(bucket splits, feature splits) the data stages write for `config`."""
  extra = PARAMETRIZE_SPLITS if config.data.get("parametrize") else ()
  return SPLITS + extra, FEATURE_SPLITS + extra


def data_paths(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Where the data stages of the default (`config`: configs/default.py) write.

  Keys: world, tfds, builder (the TFDS builder name), buckets/<split> and
  features/<split> for SPLITS and PARAMETRIZE_SPLITS, text.
  """
  root = pathlib.Path(config.data.root or pathlib.Path(workdir) / "data")
  teacher = root / teacher_folder(config)
  paths = {
    "world": root / "world",
    "tfds": root / "tfds",
    "builder": f"nuscenes_lidarseg/{config.data.world.version}",
    "text": teacher / "text.npz",
  }
  for split in SPLITS + PARAMETRIZE_SPLITS:
    paths[f"buckets/{split}"] = root / "buckets" / split
    paths[f"features/{split}"] = teacher / "features" / split
  return paths


def teacher_imperfection(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The synthetic teacher's settings of `config` (`config.data.teacher`)."""
  return {**teachers.SYNTHETIC_IMPERFECTION, **config.data.get("teacher", {})}


def teacher_folder(config: ml_collections.ConfigDict) -> str:
  """Where under the data root the teacher's outputs go: "" for the default teacher,
  `teacher_confusion<c>_noise<n>` for another."""
  settings = teacher_imperfection(config)
  if settings == teachers.SYNTHETIC_IMPERFECTION:
    return ""
  return "teacher_" + "_".join(f"{k}{v:g}" for k, v in sorted(settings.items()))


def prepare_synthetic_data(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, pathlib.Path]:
  """Runs the data stages of the default; returns `data_paths(config, workdir)`.

  The world is seen through `config.data.world.sensor` (a lidar profile of
  `data_prep.synthetic.lidar`). Without cameras (`config.data.world.cameras`
  False: a lidar-only few-shot target, as SemanticKITTI) only the world, its
  TFDS build and the bucket splits are written; its records have no pairs, so
  there are no feature stores and no text embeddings (their paths stay in
  the returned dict but are not written).
  """
  paths = data_paths(config, workdir)
  data = config.data
  world, tfds_dir, builder = paths["world"], paths["tfds"], paths["builder"]
  cameras = data.world.cameras
  logging.info("data: synthetic world in %s", world)
  writer.generate(
    world, data.world.scenes, data.world.samples_per_scene, data.world.seed,
    version=data.world.version, workers=data.workers,
    sensor=data.world.sensor, cameras=cameras,
  )  # fmt: skip
  build.build("nuscenes_lidarseg", str(world), str(tfds_dir), config=data.world.version)
  bucket_splits, feature_splits = _splits(config)
  for split in bucket_splits:
    source = functools.partial(voxelise.open_builder_split, str(tfds_dir), builder, split)
    vox = data.voxel
    bucket_config = voxelise.bucket_config(
      builder, split, len(source()), voxel_size=vox.voxel_size, num_stages=vox.num_stages,
      records_per_shard=vox.records_per_shard, knn=vox.get("knn", 0),
    )  # fmt: skip
    voxelise.voxelise_split(
      source, str(paths[f"buckets/{split}"]), bucket_config, workers=data.workers
    )
  if not cameras:
    logging.info("data: a world without cameras: no feature stores or text embeddings")
    return paths
  teacher = teachers.load("synthetic", world, imperfection=teacher_imperfection(config))
  for split in feature_splits:
    teacher_features.write_store(
      teacher,
      data_source(tfds_dir, builder, split),
      str(paths[f"features/{split}"]),
      builder,
      split,
    )
  text_embeddings.write_text_embeddings(teacher, "nuscenes", paths["text"])
  return paths


def _last(history, key: str):
  """The last logged value of `key` (None when never logged)."""
  values = [r[key] for r in history if key in r]
  return values[-1] if values else None


def complete_stages(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Sets the stage configs' input paths to the workdir's data (as `run_default`
  records them in config.json); returns `data_paths`."""
  workdir = pathlib.Path(workdir)
  paths = data_paths(config, workdir)
  pre, ft = config.pretrain, config.finetune
  with pre.unlocked(), ft.unlocked():
    pre.input.buckets = str(paths["buckets/train"])
    pre.input.features = str(paths["features/train"])
    pre.eval.val_buckets = str(paths["buckets/val"])
    pre.eval.val_features = str(paths["features/val"])
    pre.eval.text_embeddings = str(paths["text"])
    ft.input.buckets = str(paths["buckets/train_1pct"])
    ft.input.val_buckets = str(paths["buckets/val"])
    ft.checkpoint.init_from = str((workdir / "pretrain" / "checkpoints").absolute())
  return paths


def run_default(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path, override_config: bool = False
) -> dict:
  """Data, pretraining, zero-shot, 1% fine-tuning, structural gap and the report.

  Args:
    config: a `configs/default.py` config.
    workdir: the folder of everything (module docstring).
    override_config: accept a restart whose config differs from the workdir's
      (stages already finished are not redone).
  """
  workdir = pathlib.Path(workdir)
  if not config.data.world.cameras:
    raise errors.ConfigError(
      "config.data.world.cameras=False makes a lidar-only world (a few-shot target, written by "
      "`prepare_synthetic_data`); the embedded default pretrains from the cameras: set it True"
    )
  # The stage configs are complete before anything is checked, written or compared.
  paths = complete_stages(config, workdir)
  pre, ft = config.pretrain, config.finetune
  config_checks.validate(config)
  workdir_config.record_config(config, workdir, override_config)
  prepare_synthetic_data(config, workdir)

  # Pretraining with the configured loss (relational by default).
  pretrained = train.train_and_evaluate(pre, workdir / "pretrain", override_config)
  model, params = pretrained["model"], pretrained["state"]["params"]

  # Zero-shot on every point of the validation scans, before and after.
  mesh = runtime.make_mesh(pre)
  val = records.ShardedReader(str(paths["buckets/val"]))
  val_store = feature_store.FeatureStore(paths["features/val"], {"teacher": "synthetic"})
  text = evaluation_runs.load_text_embeddings(paths["text"])
  example = input_pipeline.example_batch(val, pre.input, pre.model.patch_size)  # val[0]
  init_params = jax.jit(model.init)(jax.random.key(pre.seed), example)
  names = classes.NUSCENES_CLASSES
  batch = config.eval.batch_size
  zeroshot = evaluation_runs.zero_shot_metrics(pre, params, val, text, batch, mesh)
  at_init = evaluation_runs.zero_shot_metrics(pre, init_params, val, text, batch, mesh)
  logging.info(
    "zero-shot: %s; at initialisation %s",
    report.describe_miou(zeroshot),
    report.describe_miou(at_init),
  )

  # Structural gap on held-out pairs.
  with_pairs = input_pipeline.Transform(
    pre.input.num_pairs, pre.input.intensity_scale, grid=tuple(val_store.config["grid"])
  )
  budgets = runtime.pack_budgets(pre, val, batch // mesh.shape["data"], "evaluation")
  gap = evaluate.structural_gap(
    model, params, val, val_store, with_pairs, budgets, mesh, config.eval.max_pairs,
    text_embeddings=text, class_names=names,
  )  # fmt: skip
  zeroshot["miou_paired"] = gap["zeroshot_paired"]["miou"]

  # Few-shot: fine-tune the pretrained student on the 1% subset.
  fewshot = finetune.finetune_and_evaluate(ft, workdir / "fewshot", override_config)["metrics"]

  # Bird's-eye view of one validation scan: zero-shot predictions against labels.
  scan = val[0]
  features = jax.jit(model.apply)(params, example)[0]
  voxels = scan["num_voxels"]
  predicted = np.asarray(zeroshot_lib.zero_shot_predict(features, text))[0, :voxels]
  bev = {
    "points": scan["features"][:, :3],
    "pred": predicted,
    "label": scan["labels"],
    "class_names": names,
    "title": (
      f"Zero-shot predictions of the {pre.loss.name} student ({pre.model.variant}, "
      f"{pre.num_steps} steps) on validation scan {scan['token']}, {voxels:,} voxels"
    ),
  }
  metrics = {
    "zeroshot": zeroshot,
    # The teacher's own features at the same paired points: what distillation can reach.
    "zeroshot_teacher": gap["zeroshot_teacher"],
    "zeroshot_at_init": at_init,
    "fewshot_1pct": fewshot | {"subset": ft.subset},
    "gap": {"G": gap["G"], "cka": gap["cka"], "pairs": gap["pairs"]},
    "pretrain": {
      "loss": pre.loss.name,
      "steps": pre.num_steps,
      "final_loss": _last(pretrained["history"], "loss"),
      "convergence": curves.convergence(pretrained["history"], pre.num_steps),
      "curve": {
        key: curves.curve(pretrained["history"], key)
        for key in (curves.KEY, "eval/zeroshot_miou_paired", "eval/teacher_miou", "eval/G")
      },
    },
  }
  report.write_report(
    workdir,
    metrics,
    history=pretrained["history"],
    bev=bev,
    title="reldistill-jax: the embedded default",
  )
  report.print_results(
    "the embedded default",
    {
      "zero-shot mIoU": report.describe_miou(zeroshot),
      "on the paired points": f"{100 * zeroshot['miou_paired']:.1f}% (the teacher there: "
      f"{100 * gap['zeroshot_teacher']['miou']:.1f}%, the ceiling)",
      "at initialisation": report.describe_miou(at_init),
      "1% few-shot mIoU": report.describe_miou(fewshot),
      "structural gap G": f"{gap['G']:.4f} (linear CKA {gap['cka']:.3f}, {gap['pairs']} pairs)",
    },
    workdir,
  )
  return metrics
