"""ScaLR's crop of a scan to the frustums of some of its cameras, on a bucket record (numpy).

A voxel is in a camera's frustum when one of its points projects into that camera's
image: it has a pair with that camera (`pairs_camera`). `crop` keeps those voxels of the
chosen cameras, with everything a bucket holds rebuilt for them, as if the scan had only
them:
  * stage 0: `features`, `labels` and, with them, the kNN map (recomputed among the kept
    points, as ScaLR computes it after its crop);
  * every stage s: the voxels that hold a kept voxel of stage s - 1 (its parents), their
    `coords`, each curve's `order` (the kept voxels in the same order: a curve's order of
    a subset is its order filtered) and its `inverse`, the `neighbors` (a dropped
    neighbour is absent) and the `parent` map;
  * the pairs of the chosen cameras, their voxels renumbered.
Keys a training example does not read (`point_to_voxel`, `point_labels`) are dropped.

The voxeliser records each scan's `largest_crop` in the manifest, so training with one
camera a scan fits its pack budgets and plans its packs on those counts
(`planning_sizes`): any one camera's crop fits, and a step costs what the crops need.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from reldistill_jax.models import waffleiron_inputs


def _stages(record: Mapping[str, Any]) -> int:
  return sum(1 for key in record if key.startswith("s") and key.endswith("/order"))


def _renumber(keep: np.ndarray) -> np.ndarray:
  """old index -> new index of the kept items (-1 for dropped ones)."""
  return np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)


def _crop_stage(record, s: int, keep: np.ndarray, new: np.ndarray) -> dict[str, np.ndarray]:
  """The stage-s arrays of the kept voxels, before their parents are known."""
  count = int(keep.sum())
  order = record[f"s{s}/order"]
  kept_order = np.stack([new[row[keep[row]]] for row in order]).astype(np.int32)
  inverse = np.empty_like(kept_order)
  for r, row in enumerate(kept_order):
    inverse[r, row] = np.arange(count, dtype=np.int32)
  neighbors = record[f"s{s}/neighbors"][keep].astype(np.int64)
  absent = neighbors >= len(keep)
  mapped = np.where(absent, -1, new[np.minimum(neighbors, len(keep) - 1)])
  out = {
    f"s{s}/order": kept_order,
    f"s{s}/inverse": inverse,
    f"s{s}/neighbors": np.where(mapped < 0, count, mapped).astype(np.int32),
  }
  if f"s{s}/coords" in record:
    out[f"s{s}/coords"] = record[f"s{s}/coords"][keep]
  return out


def _kept(record: Mapping[str, Any], chosen: np.ndarray) -> list[np.ndarray]:
  """Per stage, the voxels a crop keeps: at stage 0 those of the `chosen` pairs, at stage
  s + 1 the parents of the kept voxels of stage s."""
  keep = np.zeros(len(record["features"]), bool)
  keep[record["pairs_voxel"][chosen]] = True
  kept = [keep]
  for s in range(_stages(record) - 1):
    keep = np.zeros(record[f"s{s + 1}/order"].shape[1], bool)
    keep[record[f"s{s}/parent"][kept[-1]]] = True
    kept.append(keep)
  return kept


def crop(record: Mapping[str, Any], cameras: Sequence[int]) -> dict[str, Any]:
  """The record of the scan's voxels in the frustums of `cameras` (module docstring)."""
  chosen = np.isin(record["pairs_camera"], np.asarray(cameras))
  kept = _kept(record, chosen)
  news = [_renumber(keep) for keep in kept]
  out = {k: v for k, v in record.items() if "/" not in k}
  for key in ("point_to_voxel", "point_labels"):
    out.pop(key, None)
  out["features"], out["labels"] = record["features"][kept[0]], record["labels"][kept[0]]
  out["pairs_voxel"] = news[0][record["pairs_voxel"][chosen]].astype(np.int32)
  out["pairs_camera"] = record["pairs_camera"][chosen]
  out["pairs_uv"] = record["pairs_uv"][chosen]
  for s, (keep, new) in enumerate(zip(kept, news, strict=True)):
    out.update(_crop_stage(record, s, keep, new))
    if s + 1 < len(kept):
      out[f"s{s}/parent"] = news[s + 1][record[f"s{s}/parent"][keep]].astype(np.int32)
  out["counts"] = np.asarray([keep.sum() for keep in kept], np.int32)
  out["num_voxels"] = int(out["counts"][0])
  if "knn" in record:
    k = record["knn"].shape[1]
    out["knn"] = waffleiron_inputs.knn_indices(out["features"][:, :3], k)
  return out


def crop_counts(record: Mapping[str, Any], cameras: Sequence[int]) -> list[int]:
  """The voxels of every stage that `crop(record, cameras)` keeps, without building it."""
  chosen = np.isin(record["pairs_camera"], np.asarray(cameras))
  return [int(keep.sum()) for keep in _kept(record, chosen)]


def largest_crop(record: Mapping[str, Any]) -> list[int]:
  """Per stage, the most voxels any one camera's crop keeps (the whole scan's counts for a
  scan without pairs): a bound that packs of one-camera crops are planned on."""
  cameras = np.unique(record["pairs_camera"])
  if not len(cameras):
    return [int(n) for n in record["counts"]]
  return np.max([crop_counts(record, [int(c)]) for c in cameras], axis=0).tolist()


def planning_sizes(buckets, stages: int, cameras_per_scan: int) -> np.ndarray:
  """(N, stages) voxel counts to fit pack budgets and plan packs on: each scan's largest
  one-camera crop with one camera a scan, when the store's manifest records it (its `sizes`
  rows: the stages' counts, the pairs, then `largest_crop`); else the whole scans'."""
  sizes, total = buckets.sizes, buckets.config["num_stages"]
  if cameras_per_scan == 1 and sizes.shape[1] >= 2 * total + 1:
    return sizes[:, total + 1 : total + 1 + stages]
  return sizes[:, :stages]


def choose_cameras(record: Mapping[str, Any], count: int, rng: np.random.Generator) -> list[int]:
  """`count` cameras drawn uniformly among those the scan has pairs with (every one when it
  has no more), each with more kept voxels than a kNN map needs."""
  cameras = np.unique(record["pairs_camera"])
  if "knn" in record:  # a crop must hold more points than the map's neighbours
    k = record["knn"].shape[1]
    voxels = [len(np.unique(record["pairs_voxel"][record["pairs_camera"] == c])) for c in cameras]
    cameras = cameras[np.asarray(voxels) > k]
  if len(cameras) <= count:
    return [int(c) for c in cameras]
  return sorted(int(c) for c in rng.choice(cameras, count, replace=False))
