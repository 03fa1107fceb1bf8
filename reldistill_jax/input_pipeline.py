"""grain input pipeline: static-shape batches of voxel buckets and teacher features.

Every array of a batch has a fixed shape, so the update step compiles once.
Batch keys (B samples, C0 = the batch capacity, Cs its stage capacities,
R curves, P pair slots per sample, h x w the teacher grid, D its dimension):

  features          (B, C0, 4) float32: x, y, z of the voxel's kept point
                    (augmented when training) and intensity * intensity_scale.
  s{s}/mask         (B, Cs) bool;  s{s}/order, s{s}/inverse (B, R, Cs) int32;
  s{s}/neighbors    (B, Cs, 27) int32; s{s}/parent (B, Cs) int32: the bucket's
                    geometry (`serialization.py`), padded to C0.
  labels            (B, C0) int32: training id of each voxel (0 = ignore).
  pairs_voxel       (B, P) int32: stage-0 slot of each sampled pair.
  pairs_camera      (B, P) int32: camera index of each pair.
  pairs_grid        (B, P, 2) float32: (row, col) of the pair's pixel on the
                    teacher grid, cell (i, j) spanning [i, i+1) x [j, j+1)
                    (projected pixel coordinates have pixel centres at
                    integers, hence the + 0.5: `vit.pixel_to_cell`).
  pairs_mask        (B, P) bool: the pair slot holds a pair.
  teacher           (B, cameras, h, w, D) float16: the stored teacher maps
                    (only when a feature store is given).
  token             (B,) str: sample tokens; host only, never sent to devices.

Pairs are sampled uniformly without replacement up to P per sample (all of
them when a scan has fewer, the rest masked). Augmentations (yaw rotation,
flips, scaling) change only the input coordinates: the pairs were computed on
the raw cloud and the grid geometry offline, so both stay valid.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from reldistill_jax import errors, feature_store, records, serialization

HOST_KEYS = ("token",)


@dataclasses.dataclass(frozen=True)
class Augment:
  """3D augmentations of the input coordinates (training only)."""

  rotate: bool = True  # uniform yaw in [-pi, pi)
  flip: bool = True  # x and y mirrored with probability 1/2 each
  scale: tuple[float, float] = (0.95, 1.05)  # uniform isotropic scale


def _augment(xyz: np.ndarray, augment: Augment, rng: np.random.Generator) -> np.ndarray:
  out = xyz.copy()
  if augment.rotate:
    angle = rng.uniform(-np.pi, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    out[:, :2] = out[:, :2] @ np.array([[c, s], [-s, c]], np.float32)
  if augment.flip:
    out[:, :2] *= np.where(rng.random(2) < 0.5, -1.0, 1.0).astype(np.float32)
  return out * np.float32(rng.uniform(*augment.scale))


class Transform:
  """Turns one bucket record (+ its teacher record) into a fixed-shape example.

  Args:
    bucket_config: the voxel store's config (patch size, stage ratio, stages).
    capacity: the batch's stage-0 capacity (>= every bucket's).
    num_pairs: P, pair slots per sample (0 for no pairs).
    intensity_scale: factor bringing intensity to about [0, 1] (1/255 for
      nuScenes, 1 for SemanticKITTI).
    grid: (h, w) of the teacher's feature maps, to place pairs on.
    augment: augmentations, or None (evaluation).
  """

  def __init__(
    self,
    bucket_config: Mapping[str, Any],
    capacity: int,
    num_pairs: int,
    intensity_scale: float,
    grid: tuple[int, int] | None = None,
    augment: Augment | None = None,
  ):
    self.patch_size = bucket_config["patch_size"]
    self.stage_ratio = bucket_config["stage_ratio"]
    self.num_stages = bucket_config["num_stages"]
    self.capacity = capacity
    self.num_pairs = num_pairs
    self.intensity_scale = intensity_scale
    self.grid = grid
    self.augment = augment

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
    bucket = serialization.pad_bucket(
      dict(record), self.capacity, self.patch_size, self.stage_ratio
    )
    valid = bucket["s0/mask"]
    xyz = bucket["features"][:, :3]
    if self.augment is not None:
      xyz = np.where(valid[:, None], _augment(xyz, self.augment, rng), 0.0)
    intensity = bucket["features"][:, 3:4] * np.float32(self.intensity_scale)
    example = {
      "token": bucket["token"],
      "features": np.concatenate([xyz, intensity], axis=1).astype(np.float32),
      "labels": bucket["labels"].astype(np.int32),
    }
    for s in range(self.num_stages):
      for key in ("mask", "order", "inverse", "neighbors", "parent"):
        if f"s{s}/{key}" in bucket:
          example[f"s{s}/{key}"] = bucket[f"s{s}/{key}"]
    example.update(self._pairs(bucket, rng))
    if "teacher" in record:
      example["teacher"] = record["teacher"]
    return example

  def _pairs(self, bucket: Mapping[str, Any], rng: np.random.Generator | None) -> dict:
    p = self.num_pairs
    m = len(bucket["pairs_voxel"])
    if m > p:
      # Sorted: the kept pairs stay in camera order, which keeps gathers local.
      pick = np.sort(rng.choice(m, p, replace=False)) if rng is not None else np.arange(p)
    else:
      pick = np.arange(m)
    n = len(pick)
    camera = bucket["pairs_camera"][pick].astype(np.int32)
    grid = np.zeros((p, 2), np.float32)
    if n and self.grid is not None:
      native = bucket["image_sizes"][camera].astype(np.float32)  # (n, 2) height, width
      uv = bucket["pairs_uv"][pick]
      grid[:n, 0] = (uv[:, 1] + 0.5) * self.grid[0] / native[:, 0]
      grid[:n, 1] = (uv[:, 0] + 0.5) * self.grid[1] / native[:, 1]
    pad = lambda x: np.concatenate([x, np.zeros((p - n, *x.shape[1:]), x.dtype)])
    return {
      "pairs_voxel": pad(bucket["pairs_voxel"][pick].astype(np.int32)),
      "pairs_camera": pad(camera),
      "pairs_grid": grid,
      "pairs_mask": np.arange(p) < n,
    }


class JoinedSource:
  """Bucket records with their teacher record attached as `teacher` (grain source).

  Raises:
    KeyError: naming the store, for a bucket whose token has no features.
  """

  def __init__(self, buckets: records.ShardedReader, store: feature_store.FeatureStore | None):
    self.buckets = buckets
    self.store = store

  def __len__(self) -> int:
    return len(self.buckets)

  def __getitem__(self, index: int) -> dict:
    record = self.buckets[index]
    if self.store is not None:
      record["teacher"] = self.store.get(record["token"])["features"]
    return record


def require_labels(buckets: records.ShardedReader, use: str, every: bool) -> None:
  """Refuses a bucket store without labels for a `use` that needs them (fine-tuning, evaluation).

  The voxeliser counts the labelled scans of a store in its manifest
  (`stats.labelled_scans`); a store written before it did is not checked here
  (evaluation still refuses an unlabelled scan when it meets one).

  Args:
    buckets: the store.
    use: what it is for, in the message.
    every: every scan must be labelled (evaluation), not only some (training).

  Raises:
    errors.DataError: naming the store and how many scans have labels.
  """
  labelled = buckets.stats.get("labelled_scans")
  if labelled is None or labelled == len(buckets) or (labelled and not every):
    return
  raise errors.DataError(
    f"{buckets.path}: {labelled} of {len(buckets)} scans have labels, and {use} needs "
    f"{'every scan' if every else 'labelled scans'} labelled; build the dataset from a folder "
    "holding its label files (nuScenes: lidarseg/, SemanticKITTI: labels/) and voxelise it again"
  )


def check_join(buckets: records.ShardedReader, store: feature_store.FeatureStore) -> None:
  """Fails before training when the two stores do not cover the same samples."""
  for key in ("builder", "split"):
    if buckets.config.get(key) != store.config.get(key):
      raise errors.DataError(
        f"{buckets.path} holds {key} {buckets.config.get(key)!r} but the feature store "
        f"{store.path} was written for {store.config.get(key)!r}"
      )
  missing = sorted(set(buckets.tokens) - set(store.tokens))
  if missing:
    raise errors.DataError(
      f"{store.path} has no features for {len(missing)} of the {len(buckets)} samples of "
      f"{buckets.path} (e.g. {missing[:3]}): was it written for the same builder split "
      f"({buckets.config.get('builder')}, {buckets.config.get('split')})?"
    )


def dataset(
  buckets: records.ShardedReader,
  store: feature_store.FeatureStore | None,
  transform: Transform,
  batch_size: int,
  *,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  drop_remainder: bool = True,
) -> grain.MapDataset:
  """Shuffled, transformed, batched examples (batched before `to_iter_dataset`).

  Args:
    buckets: the voxel store.
    store: the teacher feature store, or None.
    transform: per-example transform (`Transform`).
    batch_size: examples per batch (per process).
    seed: seed of the order and of the per-example randomness.
    shuffle: shuffle the order of every epoch.
    num_epochs: epochs (None: repeat forever).
    drop_remainder: drop the last incomplete batch.
  """
  if store is not None:
    check_join(buckets, store)
  ds = grain.MapDataset.source(JoinedSource(buckets, store))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if transform.augment is not None or transform.num_pairs:
    ds = ds.random_map(lambda r, rng: transform(r, rng), seed=seed)
  else:
    ds = ds.map(transform)
  return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack)


def process_dataset(
  buckets: records.ShardedReader,
  store: feature_store.FeatureStore | None,
  transform: Transform,
  inp,
  seed: int,
  process_index: int,
  process_count: int,
) -> grain.IterDataset:
  """Block `process_index` of `process_count` of every global batch, read ahead.

  Global batch j (`inp.batch_size` examples) is the per-process batches
  j * count ... (j + 1) * count - 1 of one shuffled, augmented stream, so each
  process loads and augments only its own block, and the examples are those of
  one process reading whole global batches.

  Args:
    buckets, store, transform: as `dataset`.
    inp: the config's `input` block (`batch_size`, `num_threads`, `prefetch`).
    seed: the run's seed.
    process_index, process_count: this process's block (`distributed.batch_slice`).
  """
  per_process = inp.batch_size // process_count
  ds = dataset(buckets, store, transform, per_process, seed=seed)
  ds = ds[process_index::process_count]
  options = grain.ReadOptions(num_threads=inp.num_threads, prefetch_buffer_size=inp.prefetch)
  return ds.to_iter_dataset(options)


def example_batch(buckets: records.ShardedReader, inp) -> dict[str, np.ndarray]:
  """A batch of one (the store's first scan, no pairs) to initialise a model from.

  Args:
    buckets: a bucket store.
    inp: the config's `input` block (`capacity`, `intensity_scale`).
  """
  example = Transform(buckets.config, inp.capacity, 0, inp.intensity_scale)(buckets[0])
  return {k: v[None] for k, v in example.items() if k not in HOST_KEYS}


def stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch (strings into an object array)."""
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def to_device(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """This process's part of a batch as global arrays sharded on their leading axis.

  The transfer is explicit, so it is allowed under a disallowing transfer guard
  (with several processes `make_array_from_process_local_data` goes through
  `make_array_from_callback`, which the guard would count as implicit).
  """
  with jax.transfer_guard_host_to_device("allow"):
    return {
      key: jax.make_array_from_process_local_data(sharding, value)
      for key, value in batch.items()
      if key not in HOST_KEYS
    }
