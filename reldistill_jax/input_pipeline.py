"""grain input pipeline: packed batches of voxel buckets and teacher features.

The scans of a device's batch are packed into one token stream per encoder
stage (`packing.py`): every array of a batch has a fixed shape, so the update
step compiles once, and the work follows the valid voxels. Batch keys (B
packs, one per device; S scan slots per pack, T_s the stage-s token budget,
A_s its aligned attention view and K the patch, R curves, P pair slots per
scan, h x w the teacher grid, D its dimension):

  features          (B, T0, 4) float32: x, y, z of the voxel's kept point
                    (augmented when training) and intensity * intensity_scale.
  labels            (B, T0) int32: training id of each voxel (0 = ignore).
  s{s}/mask         (B, T_s) bool: the token holds a voxel (the scans' voxels
                    come first, one scan after another).
  s{s}/order        (B, R, A_s) int32: the token of every slot of the aligned
                    view: each scan's voxels by curve r (`serialization.py`)
                    from a patch boundary on, T_s in the gaps.
  s{s}/inverse      (B, R, T_s) int32: the view slot of every token.
  s{s}/lengths      (B, A_s / K) int32: valid tokens of every patch of the view.
  s{s}/neighbors    (B, T_s, 27) int32: token of each 3x3x3 neighbour, T_s
                    where absent.
  s{s}/parent       (B, T_s) int32: token of the parent in stage s+1,
                    T_{s+1} for padding.
  s{s}/octant       (B, T_s) uint8: the voxel's octant in its parent
                    (`serialization.octants`; 0 for padding), s < stages - 1.
  pairs_voxel       (B, S * P) int32: stage-0 token of each pair's voxel; slots
                    j * P .. (j + 1) * P - 1 belong to the scan in slot j.
  pairs_camera      (B, S * P) int32: camera index of each pair.
  pairs_grid        (B, S * P, 2) float32: (row, col) of the pair's pixel on the
                    teacher grid, cell (i, j) spanning [i, i+1) x [j, j+1)
                    (projected pixel coordinates have pixel centres at
                    integers, hence the + 0.5: `vit.pixel_to_cell`).
  pairs_mask        (B, S * P) bool: the pair slot holds a pair.
  teacher           (B, S, cameras, h, w, D) float16: the stored teacher maps
                    (only with a feature store; zero for an empty slot).
  token             (B, S) str: sample tokens ("" for an empty slot).
  scan_start, scan_voxels  (B, S) int32: where each scan's stage-0 voxels start
                    in the pack and how many it has (0 for an empty slot).
  The last three stay on the host (`HOST_KEYS`). From a store voxelised with
  `--knn k` (WaffleIron), also (`waffleiron_inputs.pack_inputs`):
  knn               (B, T0, k) int32: token of each voxel's k nearest voxels of
                    its scan, T0 for padding.
  scan              (B, T0) int32: every token's scan slot, S for padding.
  slots             (B, S) bool: the slot holds a scan.

Pairs are sampled uniformly without replacement up to P per scan (all of them
when a scan has fewer, the rest masked). Augmentations (yaw rotation, flips,
scaling) change only the input coordinates: the pairs were computed on the
raw cloud and the grid geometry offline, so both stay valid. Randomness is
drawn from `np.random.default_rng((seed, pack index, slot))`, so a pack is the
same whichever thread or process builds it.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from reldistill_jax import errors, feature_store, frustum, packing, records, serialization

HOST_KEYS = packing.HOST_KEYS


@dataclasses.dataclass(frozen=True)
class Augment:
  """3D augmentations of the input coordinates (training only)."""

  rotate: bool = True  # uniform yaw in [-pi, pi)
  flip: bool = True  # x and y mirrored with probability 1/2 each
  scale: tuple[float, float] = (0.95, 1.05)  # uniform isotropic scale
  # > 0: instead, with this probability one of x or y (drawn evenly) is mirrored, never both
  # (ScaLR's FlipXY applied with probability 2/3).
  flip_one: float = 0.0

  @classmethod
  def from_config(cls, augment) -> "Augment":
    """From a config's `input.augment` block (`flip_one` 0 where a run predates it)."""
    return cls(augment.rotate, augment.flip, tuple(augment.scale), augment.get("flip_one", 0.0))


def _augment(xyz: np.ndarray, augment: Augment, rng: np.random.Generator) -> np.ndarray:
  out = xyz.copy()
  if augment.rotate:
    angle = rng.uniform(-np.pi, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    out[:, :2] = out[:, :2] @ np.array([[c, s], [-s, c]], np.float32)
  if augment.flip_one:
    if rng.random() < augment.flip_one:
      out[:, rng.integers(2)] *= np.float32(-1.0)
  elif augment.flip:
    out[:, :2] *= np.where(rng.random(2) < 0.5, -1.0, 1.0).astype(np.float32)
  return out * np.float32(rng.uniform(*augment.scale))


class Transform:
  """Turns one bucket record (+ its teacher record) into one scan's example.

  The example keeps the scan's own size (V_s voxels per stage); `packing.pack`
  joins the examples of a pack.

  Args:
    num_pairs: P, pair slots per scan (0 for no pairs).
    intensity_scale: factor bringing intensity to about [0, 1] (1/255 for
      nuScenes, 1 for SemanticKITTI).
    grid: (h, w) of the teacher's feature maps, to place pairs on.
    augment: augmentations, or None (evaluation).
    cameras_per_scan: in training (with an rng), crop every scan to the frustums of
      this many of its cameras, drawn at random (`frustum`: ScaLR's 1); 0: the whole scan.
  """

  def __init__(
    self,
    num_pairs: int,
    intensity_scale: float,
    grid: tuple[int, int] | None = None,
    augment: Augment | None = None,
    cameras_per_scan: int = 0,
  ):
    self.num_pairs = num_pairs
    self.intensity_scale = intensity_scale
    self.grid = grid
    self.augment = augment
    self.cameras_per_scan = cameras_per_scan

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
    if self.cameras_per_scan and rng is not None:
      cameras = frustum.choose_cameras(record, self.cameras_per_scan, rng)
      if cameras:  # a scan without pairs stays whole
        record = frustum.crop(record, cameras)
    xyz = record["features"][:, :3]
    if self.augment is not None:
      xyz = _augment(xyz, self.augment, rng)
    intensity = record["features"][:, 3:4] * np.float32(self.intensity_scale)
    example = {
      "token": record["token"],
      "features": np.concatenate([xyz, intensity], axis=1).astype(np.float32),
      "labels": record["labels"].astype(np.int32),
    }
    for key, value in record.items():
      if key.startswith("s") and key.split("/")[-1] in ("order", "inverse", "neighbors", "parent"):
        example[key] = value
      elif key.startswith("s") and key.endswith("/coords"):
        example[key.replace("/coords", "/octant")] = serialization.octants(value)
    if self.num_pairs:
      example.update(self._pairs(record, rng))
    for key in ("teacher", "knn"):
      if key in record:
        example[key] = record[key]
    return example

  def _pairs(self, record: Mapping[str, Any], rng: np.random.Generator | None) -> dict:
    p = self.num_pairs
    m = len(record["pairs_voxel"])
    if m > p:
      # Sorted: the kept pairs stay in camera order, which keeps gathers local.
      pick = np.sort(rng.choice(m, p, replace=False)) if rng is not None else np.arange(p)
    else:
      pick = np.arange(m)
    n = len(pick)
    camera = record["pairs_camera"][pick].astype(np.int32)
    grid = np.zeros((p, 2), np.float32)
    if n and self.grid is not None:
      native = record["image_sizes"][camera].astype(np.float32)  # (n, 2) height, width
      uv = record["pairs_uv"][pick]
      grid[:n, 0] = (uv[:, 1] + 0.5) * self.grid[0] / native[:, 0]
      grid[:n, 1] = (uv[:, 0] + 0.5) * self.grid[1] / native[:, 1]
    pad = lambda x: np.concatenate([x, np.zeros((p - n, *x.shape[1:]), x.dtype)])
    return {
      "pairs_voxel": pad(record["pairs_voxel"][pick].astype(np.int32)),
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


class PackedSource:
  """The records of every pack of a `packing.PackPlan` (a grain random-access source)."""

  def __init__(self, source, plan: packing.PackPlan):
    self.source = source
    self.plan = plan

  def __len__(self) -> int:
    return len(self.plan)

  def __getitem__(self, index: int) -> list[dict]:
    return [self.source[int(i)] for i in self.plan[index]]


def require_labels(buckets: records.ShardedReader, use: str, every: bool) -> None:
  """Refuses a bucket store without labels for a `use` that needs them (fine-tuning, evaluation).

  The voxeliser counts the labelled scans of a store in its manifest
  (`stats.labelled_scans`).

  Args:
    buckets: the store.
    use: what it is for, in the message.
    every: every scan must be labelled (evaluation), not only some (training).

  Raises:
    errors.DataError: naming the store and how many scans have labels.
  """
  labelled = buckets.stats.get("labelled_scans")
  if labelled == len(buckets) or (labelled and not every):
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


def packs(source, plan: packing.PackPlan, transform: Transform, seed: int) -> grain.MapDataset:
  """The packed examples of `plan` (one per pack), each scan transformed with its own rng."""

  def build(index: int, scans: list[dict]) -> dict:
    rngs = [np.random.default_rng((seed, index, slot)) for slot in range(len(scans))]
    examples = [transform(r, rng) for r, rng in zip(scans, rngs, strict=True)]
    return packing.pack(examples, plan.budgets)

  return grain.MapDataset.source(PackedSource(source, plan)).map_with_index(build)


def process_dataset(
  buckets: records.ShardedReader,
  store: feature_store.FeatureStore | None,
  transform: Transform,
  budgets: packing.Budgets,
  inp,
  seed: int,
  process_index: int,
  process_count: int,
  packs_per_process: int,
) -> grain.IterDataset:
  """This process's packs of every global batch, shuffled, augmented and read ahead.

  Global batch j is the packs j * n ... (j + 1) * n - 1 of one stream (n packs
  per step, split over the devices) planned from the store's manifest, so each
  process loads and augments only its own packs, and the packs (and the losses)
  are those of one process reading whole global batches on any number of
  devices.

  Args:
    buckets, store, transform: the bucket store, the feature store (or
      None) and the per-scan transform.
    budgets: the pack shape (`packing.fit_budgets`).
    inp: the config's `input` block (`pack_bins`, `num_threads`, `prefetch`).
    seed: the run's seed (the shuffles, augmentations and pair samples).
    process_index, process_count: this process's block (`distributed.batch_slice`).
    packs_per_process: the packs of this process's devices in one step.
  """
  if store is not None:
    check_join(buckets, store)
  sizes = frustum.planning_sizes(buckets, len(budgets.tokens), transform.cameras_per_scan)
  plan = packing.PackPlan(sizes, budgets, seed=seed, bins=inp.pack_bins)
  ds = packs(JoinedSource(buckets, store), plan, transform, seed)
  ds = ds.batch(packs_per_process, batch_fn=stack)[process_index::process_count]
  options = grain.ReadOptions(num_threads=inp.num_threads, prefetch_buffer_size=inp.prefetch)
  return ds.to_iter_dataset(options)


def one_scan_batch(example: Mapping[str, np.ndarray], patch_size: int) -> dict[str, np.ndarray]:
  """A batch of one pack holding one scan's example, in the smallest budgets that hold it."""
  counts = [example[f"s{s}/inverse"].shape[1] for s in range(_num_stages(example))]
  packed = packing.pack([example], packing.budgets_for(np.asarray([counts]), patch_size))
  return {k: v[None] for k, v in packed.items() if k not in HOST_KEYS}


def _num_stages(example: Mapping[str, Any]) -> int:
  return sum(1 for key in example if key.endswith("/inverse"))


def example_batch(buckets: records.ShardedReader, inp, patch_size: int) -> dict[str, np.ndarray]:
  """A batch of one scan (the store's first, no pairs) to initialise a model from.

  Args:
    buckets: a bucket store.
    inp: the config's `input` block (`intensity_scale`).
    patch_size: the model's attention patch.
  """
  return one_scan_batch(Transform(0, inp.intensity_scale)(buckets[0]), patch_size)


def stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks examples (packs) into a batch (strings into an object array)."""
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
