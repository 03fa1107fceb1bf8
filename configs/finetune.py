r"""Few-shot fine-tuning and linear probing of a pretrained student.

  python -m reldistill_jax.main \
    --config configs/finetune.py:dataset=nuscenes,fraction=1pct,mode=finetune \
    --config.input.buckets=/data/buckets/nuscenes/train_1pct \
    --config.input.val_buckets=/data/buckets/nuscenes/val \
    --config.checkpoint.init_from=/runs/relational_clip/checkpoints \
    --workdir /runs/relational_clip/fewshot_nuscenes_1pct

Arguments: dataset=nuscenes|semantic_kitti|synthetic, fraction=1pct|100pct
(which labelled training subset), mode=finetune|linear (linear: frozen
encoder, only the head trains; PROTOCOLS.md section 5 probes on 100% of the
labels), model=ptv3_base|ptv3_small|minkunet34c|minkunet18a|minkunet14a|
waffleiron48_256|waffleiron48_384|waffleiron48_768|waffleiron12_64 and
recipe=scalr|slidr (as `configs/pretrain.py`; slidr adds SGD dampening 0.1 and
BatchNorm momentum 0.05), and `runlocal` (a small model and a few epochs:
minutes on a CPU).

The training buckets must be voxelised from the builder split `input.split`
(`train_1pct` for 1%: SLidR's scene-level 1% on nuScenes, every 100th scan on
SemanticKITTI; `train` for 100%) and the validation buckets from `val`; stores
of other splits are refused. `subset` names the subset in every report.
Leave `checkpoint.init_from` unset for the from-scratch baseline; otherwise
`model.variant` and `model.out_dim` must be the pretraining run's (512 for a
CLIP ViT-B/16 teacher, 768 for DINOv2 ViT-B/14).

Expected: the run ends with a line "fewshot on ...: mIoU ..." and writes
metrics.json and report.md in the workdir. Cost: 100 epochs of 1% nuScenes
(about 280 scans, batch 16) is 1,700 steps.
"""

import ml_collections

from configs import common
from reldistill_jax import classes

DATASETS = ("nuscenes", "semantic_kitti", "synthetic")
# (dataset, fraction) -> (builder split of the training buckets, subset name).
SUBSETS = {
  ("nuscenes", "1pct"): ("train_1pct", "slidr_scene_1pct"),
  ("nuscenes", "100pct"): ("train", "all_train_scans"),
  ("semantic_kitti", "1pct"): ("train_1pct", "every_100th_scan"),
  ("semantic_kitti", "100pct"): ("train", "all_train_scans"),
  ("synthetic", "1pct"): ("train_1pct", "slidr_scene_1pct"),
  ("synthetic", "100pct"): ("train", "all_train_scans"),
}
LABEL_FRACTION = {"1pct": 0.01, "100pct": 1.0}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(
    arg,
    {"dataset": "nuscenes", "fraction": "1pct", "mode": "finetune", "model": "ptv3_base",
     "recipe": ""},
  )  # fmt: skip
  if args["dataset"] not in DATASETS:
    raise ValueError(f"dataset={args['dataset']}: choose from {DATASETS}")
  if args["fraction"] not in LABEL_FRACTION:
    raise ValueError(f"fraction={args['fraction']}: choose 1pct or 100pct")
  if args["mode"] not in ("finetune", "linear"):
    raise ValueError(f"mode={args['mode']}: choose finetune or linear")
  kitti = args["dataset"] == "semantic_kitti"
  split, subset = SUBSETS[(args["dataset"], args["fraction"])]

  config = ml_collections.ConfigDict()
  config.kind = "finetune"
  config.seed = 0
  config.dataset = args["dataset"]
  config.mode = args["mode"]
  config.subset = subset
  config.label_fraction = LABEL_FRACTION[args["fraction"]]

  # Input.
  config.input = ml_collections.ConfigDict()
  config.input.buckets = common.optional_str()  # the labelled training subset
  config.input.split = split
  config.input.val_buckets = common.optional_str()
  config.input.val_split = "val"
  config.input.batch_size = 10 if kitti else 16  # scans per step
  config.input.pack_size = 5 if kitti else 4  # scans per pack (configs/pretrain.py)
  config.input.pack_bins = 8
  # Intensity to about [0, 1]: nuScenes stores 0-255, SemanticKITTI remission 0-1.
  config.input.intensity_scale = 1.0 if kitti else 1.0 / 255.0
  config.input.augment = ml_collections.ConfigDict(
    {"rotate": True, "flip": True, "scale": (0.95, 1.05), "flip_one": 0.0}
  )
  config.input.num_threads = 8
  config.input.prefetch = 8  # batches; grain wants at least num_threads

  # Model: the pretrained student (its sizes must be the checkpoint's) and a new head.
  recipe = common.set_model(config, args, 512)
  config.class_names = classes.SEMANTIC_KITTI_CLASSES if kitti else classes.NUSCENES_CLASSES
  config.num_classes = len(config.class_names)

  # Loss: cross-entropy + lovasz_weight * Lovasz-softmax on labelled voxels.
  config.loss = ml_collections.ConfigDict({"lovasz_weight": 1.0})

  # Optimizer (SLidR's 1% recipe): SGD, cosine, separate rates for the head
  # and the encoder (the encoder's is unused when mode=linear).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.head_lr = 2.0
  config.optimizer.encoder_lr = 0.02
  config.optimizer.momentum = 0.9
  config.optimizer.dampening = 0.1 if recipe == "slidr" else 0.0  # PyTorch's convention
  config.optimizer.weight_decay = 1e-4
  config.optimizer.clip_norm = 0.0  # 0: no clipping
  config.num_epochs = 100
  config.log_every = 20
  config.head = "linear"
  if config.model.name == "waffleiron" and recipe == "scalr":
    # ScaLR's recipe (scalr_finetune): a BatchNorm + zero-initialised linear head, AdamW at
    # 2e-3 without weight decay, layer-wise rate decay, warm-up then cosine, batch 8, and
    # stochastic depth 0.2 (the step's dropout key: finetune.update_step).
    one = args["fraction"] == "1pct"
    config.head = "batchnorm_zero"
    config.optimizer = ml_collections.ConfigDict(
      {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0, "layer_decay": 0.95 if one else 0.99,
       "warmup_epochs": 4 if one else 2, "clip_norm": 0.0}
    )  # fmt: skip
    config.num_epochs = 45 if one else 25
    config.input.batch_size = 8
    config.model.drop_path = 0.2
    config.input.augment.flip_one = 2 / 3  # ScaLR's flip of x or y, 2 times in 3

  # Evaluation on every point of the validation scans.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = config.input.batch_size
  config.eval.empty = "nan"  # empty-union classes left out of the mean (ScaLR); "one": SLidR
  # The validation curve: mIoU every `eval.every` steps (0: only at the end), as
  # `val_miou` in the run's history, to see where a run converges.
  config.eval.every = 0

  # Mesh: the data axis over every device (-1).
  config.mesh = ml_collections.ConfigDict({"data": -1})

  # Checkpointing.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 500
  config.checkpoint.keep = 2
  config.checkpoint.resume = common.optional_str()
  config.checkpoint.init_from = common.optional_str()  # unset: the from-scratch baseline

  if args["runlocal"]:
    config.input.batch_size = 2
    config.input.pack_size = 2
    config.input.num_threads = 2
    config.eval.batch_size = 2
    config.num_epochs = 2
    config.log_every = 1
    config.checkpoint.every = 2
  return config
