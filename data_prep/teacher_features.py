r"""Runs a frozen 2D teacher once over every camera image of a split.

  python -m data_prep.teacher_features --teacher clip_vitb16 --weights CKPT \
      --data_dir DATA --builder nuscenes_lidarseg/v1.0-trainval --split train \
      --out OUT [--dense naclip] [--image_size 224x416] [--batch_size 24]

(--image_size must be a multiple of the teacher's patch: 224x416 for the /16
teachers, 224x420 for the /14 ones (DINOv2, SigLIP 2 so400m14); without it, the teacher's own size.)

Reads the JPEGs of the TFDS split DATA/<builder> (written by
`data_prep.build`), resizes each camera image directly from its native size
to --image_size (default: the teacher's), encodes batches with the teacher
(jitted; on the GPU when there is one) with its dense rule (--dense: for
CLIP and SigLIP 2 maskclip, the default, sclip, clearclip or naclip; README
"Teachers") and writes fp16 patch-grid maps, one
record per sample holding its six cameras (`reldistill_jax.feature_store`):

  OUT/features-SSSSS-of-NNNNN.array_record
  OUT/manifest.json    teacher, dense rule, weights sha256, image size, grid, feature
                       dim, normalisation, dtype, builder, split; index

  python -m data_prep.teacher_features --out OUT --verify

Shards are written atomically; a re-run verifies the shards already written
(size and sha256 in the manifest), rewrites a damaged one (logged, naming it)
and skips the rest; a run whose teacher, weights or sizes differ from OUT's
manifest is refused. `--verify` only checks OUT and reports. A non-finite
feature (NaN, inf, or a value beyond float16's range) stops the run naming the
sample and the camera. The synthetic teacher's --weights is the synthetic
world's dataroot.
"""

import concurrent.futures
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from absl import app, flags, logging
from PIL import Image

from reldistill_jax import classes, cli, errors, feature_store, records, teachers


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program)."""
  flags.DEFINE_string("teacher", None, f"Teacher: one of {', '.join(teachers.TEACHERS)}.")
  flags.DEFINE_string("weights", None, "Checkpoint folder/file (synthetic: the world's dataroot).")
  flags.DEFINE_string("data_dir", None, "Folder of built TFDS datasets.")
  flags.DEFINE_string("builder", None, "Builder name/config, e.g. nuscenes_lidarseg/v1.0-mini.")
  flags.DEFINE_string("split", None, "Split to encode.")
  flags.DEFINE_string("out", None, "Output folder of the feature store.", required=True)
  flags.DEFINE_string(
    "dense",
    None,
    "Dense rule of a CLIP / SigLIP 2 teacher: maskclip (default), sclip, clearclip or naclip.",
  )
  flags.DEFINE_string("image_size", None, "HxW to encode, e.g. 224x416 (default: the teacher's).")
  flags.DEFINE_integer("batch_size", 24, "Images per teacher call.")
  flags.DEFINE_integer("records_per_shard", 64, "Samples per output shard.")
  flags.DEFINE_bool("verify", False, "Only check the store at --out against its manifest.")


def parse_size(text: str) -> tuple[int, int]:
  """'224x416' -> (224, 416)."""
  try:
    height, width = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"image size must be HxW, e.g. 224x416; got {text!r}") from None
  return height, width


def decode_resized(jpeg: bytes, size: tuple[int, int], where: str) -> np.ndarray:
  """A JPEG decoded and resized directly to size (H, W), as (H, W, 3) uint8."""
  try:
    with Image.open(io.BytesIO(jpeg)) as image:
      image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
      return np.asarray(image)
  except OSError as e:
    raise errors.DataError(f"{where}: camera image cannot be decoded ({e})") from e


def _images(source: Sequence[Mapping[str, Any]], indices: range, size, pool) -> Iterator[tuple]:
  """(token, camera tokens, (6, H, W, 3) images) of each sample, decoded in threads."""

  def load(i):
    record = source[i]
    token = record["token"].decode()
    cams = [t.decode() for t in record["camera_tokens"]]
    images = [
      decode_resized(jpeg, size, f"sample {token} {classes.NUSCENES_CAMERAS[c]}")
      for c, jpeg in enumerate(record["images"])
    ]
    return token, cams, np.stack(images)

  yield from pool.map(load, indices)


def encode_shard(
  teacher, source, indices: range, size: tuple[int, int], batch_size: int, pool, progress
) -> Iterator[dict[str, Any]]:
  """Feature records of the samples `indices`, encoding batch_size images at a time."""
  pending = []  # (token, cams, images)

  def flush(items):
    images = np.concatenate([imgs for _, _, imgs in items])
    cams = [c for _, cs, _ in items for c in cs]
    feats = np.asarray(teacher.dense_features(images, cams)).astype(feature_store.DTYPE)
    per_sample = len(classes.NUSCENES_CAMERAS)
    for k, (token, _, _) in enumerate(items):
      record = {"token": token, "features": feats[k * per_sample : (k + 1) * per_sample]}
      feature_store.check_finite(record, f"{teacher.name} features")
      progress.update()
      yield record

  samples_per_batch = max(1, batch_size // len(classes.NUSCENES_CAMERAS))
  for item in _images(source, indices, size, pool):
    pending.append(item)
    if len(pending) == samples_per_batch:
      yield from flush(pending)
      pending = []
  if pending:
    yield from flush(pending)


def write_store(
  teacher,
  source: Sequence[Mapping[str, Any]],
  out: str,
  builder: str,
  split: str,
  image_size: tuple[int, int] | None = None,
  batch_size: int = 24,
  records_per_shard: int = 64,
) -> dict[str, Any]:
  """Encodes every sample of `source` into the store `out` (resuming); returns its manifest."""
  size = image_size or teacher.default_image_size
  if not len(source):
    raise errors.DataError(f"{builder} split {split} holds no samples")
  config = feature_store.store_config(teacher, size, builder, split, len(source), records_per_shard)
  num_shards = -(-len(source) // records_per_shard)
  writer = records.ShardedWriter(out, config, num_shards, name=feature_store.STORE_NAME)
  todo = [
    range(s * records_per_shard, min(len(source), (s + 1) * records_per_shard))
    for s in writer.pending
  ]
  logging.info("%s: %d samples, %d of %d shards to write", out, len(source), len(todo), num_shards)
  total = sum(map(len, todo))
  # Drawn on a terminal only (disable=None: off when stderr is not a TTY).
  progress = tqdm.tqdm(
    total=total,
    unit="sample",
    desc=f"{teacher.name} features",
    disable=True if not total else None,  # a terminal only
  )
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    for shard, indices in zip(writer.pending, todo, strict=True):
      writer.write_shard(
        shard, encode_shard(teacher, source, indices, size, batch_size, pool, progress)
      )
  progress.close()
  return writer.finalize()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from data_prep import builders  # TFDS import kept out of `--help`

  f = flags.FLAGS
  if f.verify:
    print(records.check_store(f.out))
    return
  for name in ("teacher", "data_dir", "builder", "split"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  try:
    size = parse_size(f.image_size) if f.image_size else None
  except ValueError as e:
    raise app.UsageError(f"--image_size: {e}") from None
  builders.check_builder(f.data_dir, f.builder)  # before the weights load
  teacher = teachers.load(f.teacher, f.weights, f.dense)
  source = builders.data_source(f.data_dir, f.builder, f.split)
  manifest = write_store(
    teacher, source, f.out, f.builder, f.split, size, f.batch_size, f.records_per_shard
  )
  print(f"{f.out}: {manifest['num_records']} samples, grid {manifest['config']['grid']}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
