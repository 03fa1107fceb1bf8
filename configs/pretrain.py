r"""Pretraining: distil a frozen 2D teacher into the 3D student.

  python -m reldistill_jax.main \
    --config configs/pretrain.py:loss=relational,teacher=clip_vitb16,dataset=nuscenes \
    --config.input.buckets=/data/buckets/nuscenes/train_parametrize \
    --config.input.features=/data/features/clip_vitb16/train_parametrize \
    --workdir /runs/relational_clip

Arguments: loss=relational|contrastive|similarity, teacher= a named size of
`reldistill_jax.teachers` (clip_vitb16, siglip2_b16, dinov2_vitb14,
dinov3_vitb16, ...) or synthetic (sets the feature dimension), dense= the
store's dense rule (default the teacher's: maskclip for CLIP and SigLIP 2;
sclip, clearclip, naclip), dataset=nuscenes|synthetic, model=ptv3_base|ptv3_small|minkunet34c|minkunet18a|minkunet14a|
waffleiron48_256|waffleiron48_384|waffleiron48_768|waffleiron12_64
(the student, `configs/common.py`), recipe=scalr|slidr (default: the
student's own: AdamW for ptv3, SLidR's SGD for MinkUNet), and `runlocal` (a
small model and a few steps: minutes on a CPU).
The buckets and the feature store are made by `data_prep.voxelise` and
`data_prep.teacher_features` (README: preparing data).
"""

import ml_collections

from configs import common
from reldistill_jax import teachers


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(
    arg,
    {
      "loss": "relational",
      "teacher": "clip_vitb16",
      "dense": "",
      "dataset": "nuscenes",
      "model": "ptv3_base",
      "recipe": "",
    },
  )
  if args["loss"] not in ("relational", "contrastive", "similarity"):
    raise ValueError(f"loss={args['loss']}: choose relational, contrastive or similarity")
  named = sorted(t for t in teachers.TEACHERS if t not in teachers.FAMILIES)
  if args["teacher"] not in named:
    raise ValueError(f"teacher={args['teacher']}: choose from {named}")
  if args["dataset"] not in ("nuscenes", "synthetic"):
    raise ValueError(f"dataset={args['dataset']}: choose nuscenes or synthetic")

  config = ml_collections.ConfigDict()
  config.kind = "pretrain"
  config.seed = 0
  # The feature store must have been written by this teacher (its manifest is checked).
  config.teacher = args["teacher"]
  config.dense = args["dense"] or teachers.default_dense(args["teacher"])
  teachers.check_dense(args["teacher"], config.dense)

  # Input.
  config.input = ml_collections.ConfigDict()
  config.input.buckets = common.optional_str()
  config.input.features = common.optional_str()
  config.input.num_pairs = 4096  # pair slots per scan (relational: all of them enter the loss)
  config.input.batch_size = 16  # scans per step
  # Scans per pack (one token stream per stage); batch_size / pack_size packs a step, split
  # over the devices. The packs depend on the data and these two numbers, not on the devices.
  config.input.pack_size = 4
  # The token budgets of every stage are fitted to the store (packing.fit_budgets): the
  # cheapest per scan when its scans are packed first-fit into this many open packs.
  config.input.pack_bins = 8
  config.input.intensity_scale = 1.0 / 255.0
  config.input.augment = ml_collections.ConfigDict(
    {"rotate": True, "flip": True, "scale": (0.95, 1.05), "flip_one": 0.0}
  )
  config.input.num_threads = 8
  config.input.prefetch = 8  # batches; grain wants at least num_threads

  # Model (configs/common.py MODELS).
  recipe = common.set_model(config, args, teachers.feature_dim(args["teacher"]))
  # Each scan cropped to the frustum of this many random cameras (0: whole scans); ScaLR
  # distils WaffleIron from one camera a scan.
  scalr_waffleiron = config.model.name == "waffleiron" and recipe == "scalr"
  config.input.cameras_per_scan = 1 if scalr_waffleiron else 0
  if scalr_waffleiron:  # ScaLR's scaling of +-10%, and its flip of x or y, 2 times in 3
    config.input.augment.scale = (0.9, 1.1)
    config.input.augment.flip_one = 2 / 3

  # Loss.
  config.loss = ml_collections.ConfigDict()
  config.loss.name = args["loss"]
  config.loss.w_cross = 1.0
  config.loss.w_intra = 1.0
  # Relational ablations: False leaves the cross-modal diagonal term 1/N sum_i C_ii out;
  # "squared" penalises every relation difference d by d^2 instead of |d| ("l1").
  config.loss.diagonal = True
  config.loss.distance = "l1"
  config.loss.temperature = 0.07
  # ScaLR's loss is the mean L2 distance between unit vectors (loss=similarity, WaffleIron).
  config.loss.similarity = "l2" if scalr_waffleiron else "cosine"
  config.loss.implementation = "auto"

  # Optimizer: ScaLR's AdamW recipe, or SLidR's SGD (recipe=slidr: no warmup, no clipping).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.lr = 2e-3
  config.optimizer.weight_decay = 0.03
  config.optimizer.momentum = 0.9
  config.optimizer.dampening = 0.0  # SGD only, PyTorch's convention
  config.optimizer.warmup_steps = 3500
  config.optimizer.clip_norm = 1.0
  if recipe == "slidr":
    config.optimizer.name = "sgd"
    config.optimizer.lr = 0.5
    config.optimizer.weight_decay = 1e-4
    config.optimizer.dampening = 0.1
    config.optimizer.warmup_steps = 0
    config.optimizer.clip_norm = 0.0
  config.num_steps = 100_000
  config.log_every = 50

  # Curves: every `eval.every` steps (0: never), zero-shot mIoU on every point of the
  # validation buckets and on their paired points, the teacher's own zero-shot mIoU at those
  # points (the ceiling) and G; to TensorBoard and history.jsonl (`eval/...`).
  config.eval = ml_collections.ConfigDict()
  config.eval.every = 0
  config.eval.val_buckets = common.optional_str()
  config.eval.val_features = common.optional_str()  # the teacher's store of the same scans
  config.eval.text_embeddings = common.optional_str()
  config.eval.batch_size = 4
  config.eval.max_pairs = 16384  # of G's pairs; the zero-shot scores use every pair

  # Mesh: the data axis over every device (-1).
  config.mesh = ml_collections.ConfigDict({"data": -1})

  # Checkpointing.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1000
  config.checkpoint.keep = 3
  config.checkpoint.resume = common.optional_str()
  config.checkpoint.init_from = common.optional_str()

  if args["runlocal"]:
    config.input.batch_size = 2
    config.input.pack_size = 2
    config.input.num_pairs = 1024
    config.input.num_threads = 2
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, 2)
    config.num_steps = 6
    config.log_every = 2
    config.checkpoint.every = 3
  return config
