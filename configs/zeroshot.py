r"""Zero-shot segmentation of a pretraining run's checkpoint.

  python -m reldistill_jax.main \
    --config configs/zeroshot.py:dataset=nuscenes \
    --config.checkpoint=/runs/relational_clip/checkpoints \
    --config.input.val_buckets=/data/buckets/nuscenes/val \
    --config.text_embeddings=/data/text_clip_vitb16_nuscenes.npz \
    --workdir /runs/relational_clip/zeroshot

Arguments: dataset=nuscenes|synthetic (the synthetic world uses the nuScenes
classes), model= (the student, as `configs/pretrain.py`) and `runlocal` (the
student of `configs/pretrain.py:runlocal`).
Every point of every validation scan takes the class of the closest text
embedding (PROTOCOLS.md section 5). `model` must be the pretraining run's
(variant, out_dim, patch_size, num_curves); a checkpoint of another student is
refused. The text embeddings come from `data_prep.text_embeddings` with the
run's teacher and `--classes nuscenes`.

Expected: a line "zero-shot mIoU ..." and workdir/metrics.json (`zeroshot/...`)
and workdir/report.md; with `--config.input.val_features` (the teacher's store
of the validation scans) also the teacher's ceiling on the paired points
(`zeroshot_teacher/miou`), the student's score on the same points
(`zeroshot/miou_paired`) and G. Cost: one forward pass over the validation split (6,019
nuScenes scans: minutes on one accelerator).
"""

import ml_collections

from configs import common, pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"dataset": "nuscenes", "model": "ptv3_base"})
  if args["dataset"] not in ("nuscenes", "synthetic"):
    raise ValueError(f"dataset={args['dataset']}: choose nuscenes or synthetic")
  # The student's sizes and the input scaling are the pretraining config's.
  pre = pretrain.get_config(
    f"dataset={args['dataset']},model={args['model']}" + (",runlocal" if args["runlocal"] else "")
  )

  config = ml_collections.ConfigDict()
  config.kind = "zeroshot"
  config.dataset = args["dataset"]
  config.checkpoint = common.optional_str()  # a pretraining run: workdir, checkpoints/ or a step

  # Input.
  config.input = ml_collections.ConfigDict()
  config.input.val_buckets = common.optional_str()
  # Optional: the teacher's store of the same scans. With it, the teacher's own zero-shot
  # mIoU at the paired points (the ceiling, `zeroshot_teacher`), the student's there
  # (`zeroshot/miou_paired`) and G on those pairs are measured too.
  config.input.val_features = common.optional_str()
  config.input.num_pairs = pre.input.num_pairs  # pairs per scan for those
  config.input.intensity_scale = pre.input.intensity_scale
  config.text_embeddings = common.optional_str()  # .npz of data_prep.text_embeddings

  # Model: must match the checkpoint.
  config.model = ml_collections.ConfigDict(pre.model.to_dict())

  # Evaluation on every point of the validation scans.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16
  config.eval.max_pairs = 16384  # of G's pairs; the paired zero-shot scores use every pair
  config.eval.empty = "nan"  # empty-union classes left out of the mean (ScaLR); "one": SLidR

  # Mesh: the data axis over every device (-1).
  config.mesh = ml_collections.ConfigDict({"data": -1})

  if args["runlocal"]:
    config.eval.batch_size = 2
  return config
