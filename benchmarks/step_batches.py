"""Batches for `benchmarks/train_step.py`, built exactly as training builds them.

The scans are procedural sweeps (`benchmarks/scans.py`) or the records of bucket
stores, joined with a feature store or with seeded random teacher maps; the
budgets are fitted to them (`packing.fit_budgets`) or, for the layout before
packing, one padded capacity per stage (`padded_budgets`).
"""

import math
import statistics

import numpy as np

from benchmarks import scans
from reldistill_jax import feature_store, input_pipeline, packing, records, runtime, serialization
from reldistill_jax.models import waffleiron_inputs


class _RandomTeacher:
  """The records of several bucket stores, one after another, each joined with a seeded
  random teacher map."""

  def __init__(self, stores, shape: tuple[int, ...], seed: int):
    self.stores, self.shape, self.seed = stores, shape, seed
    self.starts = np.cumsum([0] + [len(s) for s in stores])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, index: int) -> dict:
    k = int(np.searchsorted(self.starts, index, side="right")) - 1
    record = dict(self.stores[k][int(index) - int(self.starts[k])])
    maps = np.random.default_rng((self.seed, int(index))).standard_normal(self.shape, np.float32)
    record["teacher"] = (maps / np.sqrt(self.shape[-1])).astype(np.float16)
    return record


def _source(config, settings: dict, buckets, features):
  """(random-access source of joined records, (N, stages) voxel counts, expected counts).

  The expected counts are what a scan must keep: for procedural scans the
  distinct voxels of its points, for a store its manifest's counts.
  """
  stages, grid = settings["num_stages"], settings["teacher_grid"]
  shape = (6, *grid, config.model.out_dim)
  if buckets:
    version = {"bucket_version": serialization.BUCKET_VERSION}
    stores = [records.ShardedReader(path, version) for path in buckets]
    if features:
      store = feature_store.FeatureStore(features, {"feature_dim": config.model.out_dim})
      source = input_pipeline.JoinedSource(stores[0], store)
    else:
      source = _RandomTeacher(stores, shape, settings["seed"])
    sizes = np.concatenate([store.sizes[:, :stages] for store in stores])
    return source, sizes, sizes[:, 0]
  rng = np.random.default_rng(settings["seed"])
  num = config.input.batch_size * settings["num_batches"]
  made = []
  for i in range(num):
    bucket = scans.synthetic_bucket(rng, i, settings["voxel_size"], stages, settings["num_curves"])
    if settings["knn"]:  # as `data_prep.voxelise --knn` stores it
      bucket["knn"] = waffleiron_inputs.knn_indices(bucket["features"][:, :3], settings["knn"])
    maps = rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1])
    bucket["teacher"] = maps.astype(np.float16)
    made.append(bucket)
  sizes = np.array([b["counts"][:stages] for b in made])
  return made, sizes, np.array([b["distinct_voxels"] for b in made])


def padded_budgets(capacity: int, stages: int, patch: int, ratio: float) -> packing.Budgets:
  """The layout before packing: one scan a pack, stage s padded to round_up(C0 ratio^s, K)."""
  caps = tuple(
    max(1, math.ceil(round(capacity * ratio**s / patch, 6))) * patch for s in range(stages)
  )
  return packing.Budgets(caps, caps, 1, patch)


def make_batches(config, settings: dict, buckets=None, features=None):
  """`num_batches` host batches as training builds them, from the bucket stores
  `buckets` (joined with the feature store `features` when given) or, when
  `buckets` is empty, from procedural sweeps.

  Returns:
    (batches, (scans, stages) voxel counts of every batch's scans, their
    statistics, the budgets).
  """
  inp = config.input
  source, sizes, expected = _source(config, settings, buckets, features)
  patch, stages = config.model.patch_size, settings["num_stages"]
  if settings["layout"] == "padded":
    budgets = padded_budgets(settings["capacity"], stages, patch, settings["stage_ratio"])
  else:
    budgets = packing.fit_budgets(
      sizes, inp.pack_size, patch, runtime.make_model(config).token_costs(), inp.pack_bins
    )
  plan = packing.PackPlan(sizes, budgets, seed=settings["seed"], bins=inp.pack_bins)
  transform = input_pipeline.Transform(
    inp.num_pairs,
    inp.intensity_scale,
    grid=settings["teacher_grid"],
    augment=input_pipeline.Augment.from_config(inp.augment),
  )
  packs_per_batch = inp.batch_size // budgets.scans
  ds = input_pipeline.packs(source, plan, transform, settings["seed"])
  ds = ds.batch(packs_per_batch, batch_fn=input_pipeline.stack)
  batches = [ds[i] for i in range(settings["num_batches"])]
  indices = [
    np.concatenate([plan[p] for p in range(i * packs_per_batch, (i + 1) * packs_per_batch)])
    for i in range(len(batches))
  ]
  counts = [sizes[i] for i in indices]
  return batches, counts, _batch_stats(batches, plan, budgets, sizes, expected, indices), budgets


def _batch_stats(batches, plan, budgets, sizes, expected, per_batch) -> dict:
  """Packing statistics of the batches (module docstring: `data`)."""
  scans_in = [int((b["scan_voxels"] > 0).sum()) for b in batches]
  indices = np.concatenate(per_batch)
  fill = {
    "tokens": [
      statistics.fmean(float(b[f"s{s}/mask"].mean()) for b in batches)
      for s in range(len(budgets.tokens))
    ],
    "attention": [
      statistics.fmean(
        float(b[f"s{s}/lengths"].sum()) / (b[f"s{s}/lengths"].size * budgets.patch_size)
        for b in batches
      )
      for s in range(len(budgets.tokens))
    ],
  }
  packed = np.concatenate([b["scan_voxels"][b["scan_voxels"] > 0] for b in batches])
  epoch_packs, carried = plan.epoch(0)
  return {
    "scans": int(sum(scans_in)),
    "scans_per_batch": statistics.fmean(scans_in),
    "packs_per_batch": len(batches[0]["token"]),
    "budgets": {"tokens": list(budgets.tokens), "attention": list(budgets.attention)},
    "budget_fill": fill,
    "carried_scans_first_epoch": carried,
    "scans_first_epoch": int(sum(len(p) for p in epoch_packs)),
    "voxels_per_stage_mean": np.mean(sizes[indices], axis=0).round(1).tolist(),
    "dropped_voxels_total": int(np.sum(expected[indices] - packed)),
  }
