r"""Class statistics behind the paper's premise: self-similarity and class imbalance.

  python benchmarks/class_stats.py --out stats.json --buckets NAME=DIR [--buckets NAME=DIR ...]
      [--kitti NAME=SCAN.label] [--batch 16] [--pairs 4096]

For every bucket store (`data_prep.voxelise`): the share of labelled points of
each class (the original points' labels), the share of pairs of each class (the
label of each pair's voxel, pairs drawn per scan as training draws them), and
the share of same-class pairs among a pair's negatives in a training batch: a
contrastive loss over a batch of `--batch` scans with `--pairs` pairs each
treats every other pair as a negative, so this share (sum over classes of
n_c (n_c - 1) over N (N - 1), on the labelled pairs of the batch) is how often
it pushes apart two points of one class. Batches are consecutive scans of one
seeded shuffle of the store; the share is averaged over them.

`--kitti` reads the `.label` file of one SemanticKITTI scan (19 training
classes): point shares only (the dataset has no camera pairs here).

Each distribution also gets its imbalance: the ratio of the largest to the
smallest non-zero class share, and the normalised entropy (1: uniform over the
classes present). Writes JSON and prints one table per source.
"""

import datetime
import json
import pathlib
import sys

import numpy as np
from absl import flags

from reldistill_jax import classes, cli, hardware, input_pipeline, records

_OUT = flags.DEFINE_string("out", "class_stats.json", "JSON output file.")
_BUCKETS = flags.DEFINE_multi_string("buckets", [], "NAME=DIR of a bucket store.")
_KITTI = flags.DEFINE_multi_string("kitti", [], "NAME=SCAN.label of a SemanticKITTI scan.")
_BATCH = flags.DEFINE_integer("batch", 16, "Scans per training batch.")
_PAIRS = flags.DEFINE_integer("pairs", 4096, "Pairs per scan.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the pair draws and the batch order.")


def distribution(counts: np.ndarray, names) -> dict:
  """Shares per class of `counts` (C,) over classes 1..C, with the imbalance measures."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  shares = counts / total if total else counts
  present = shares[shares > 0]
  entropy = (
    float(-(present * np.log(present)).sum() / np.log(len(present))) if len(present) > 1 else 0.0
  )
  return {
    "total": int(total),
    "shares": {n: float(s) for n, s in zip(names, shares, strict=True)},
    "largest_over_smallest": float(present.max() / present.min()) if len(present) else None,
    "normalised_entropy": entropy,
    "classes_present": int(len(present)),
  }


def same_class_share(labels: np.ndarray) -> float | None:
  """Share of same-class pairs among the ordered pairs (i, j), i != j, of labelled points."""
  labels = labels[labels > 0]
  n = len(labels)
  if n < 2:
    return None
  counts = np.bincount(labels).astype(np.float64)
  return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def bucket_stats(path: str, batch: int, num_pairs: int, seed: int) -> dict:
  """Point and pair class shares of a bucket store, and the same-class share of negatives."""
  store = records.ShardedReader(path)
  names = classes.NUSCENES_CLASSES
  c = len(names)
  points, pairs = np.zeros(c + 1, np.int64), np.zeros(c + 1, np.int64)
  transform = input_pipeline.Transform(num_pairs, 1.0)
  order = np.random.default_rng(seed).permutation(len(store))
  shares, current = [], []
  for position, index in enumerate(order):
    record = store[int(index)]
    points += np.bincount(record["point_labels"], minlength=c + 1)[: c + 1]
    example = transform(record, np.random.default_rng((seed, int(index))))
    labels = example["labels"][example["pairs_voxel"][example["pairs_mask"]]]
    pairs += np.bincount(labels, minlength=c + 1)[: c + 1]
    current.append(labels)
    if len(current) == batch or position == len(order) - 1:
      share = same_class_share(np.concatenate(current))
      if share is not None:
        shares.append(share)
      current = []
  return {
    "source": path,
    "scans": len(store),
    "points": distribution(points[1:], names),
    "pairs": distribution(pairs[1:], names),
    "same_class_share_of_negatives": {
      "mean": float(np.mean(shares)) if shares else None,
      "min": float(np.min(shares)) if shares else None,
      "max": float(np.max(shares)) if shares else None,
      "batches": len(shares),
      "scans_per_batch": batch,
      "pairs_per_scan": num_pairs,
    },
  }


def kitti_stats(label_file: str) -> dict:
  """Point class shares of one SemanticKITTI scan, from its `.label` (uint32, low 16 bits)."""
  raw = np.fromfile(label_file, dtype="<u4")
  labels = classes.semantic_kitti_raw_to_train(raw & 0xFFFF)
  names = classes.SEMANTIC_KITTI_CLASSES
  counts = np.bincount(labels, minlength=len(names) + 1)[1:]
  return {
    "source": str(label_file),
    "scans": 1,
    "points": distribution(counts, names),
    "same_class_share_of_points": same_class_share(labels.astype(np.int64)),
  }


def _named(values: list[str], flag: str) -> list[tuple[str, str]]:
  pairs = [v.split("=", 1) for v in values]
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f"--{flag} takes NAME=PATH; got {values}")
  return [(name, path) for name, path in pairs]


def _print(name: str, result: dict) -> None:
  print(f"\n{name} ({result['scans']} scans)")
  print("| class | points (%) |" + (" pairs (%) |" if "pairs" in result else ""))
  print("|---|---|" + ("---|" if "pairs" in result else ""))
  for cls, share in result["points"]["shares"].items():
    pair = f" {100 * result['pairs']['shares'][cls]:.2f} |" if "pairs" in result else ""
    print(f"| {cls} | {100 * share:.2f} |{pair}")
  negatives = result.get("same_class_share_of_negatives")
  if negatives:
    print(f"same-class share of a batch's negatives: {negatives['mean']:.3f}")


def main(argv):
  del argv
  results = {}
  for name, path in _named(_BUCKETS.value, "buckets"):
    results[name] = bucket_stats(path, _BATCH.value, _PAIRS.value, _SEED.value)
  for name, path in _named(_KITTI.value, "kitti"):
    results[name] = kitti_stats(path)
  report = {
    "benchmark": "class statistics",
    "machine": hardware.machine(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["benchmarks/class_stats.py", *sys.argv[1:]]),
    "results": results,
  }
  pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=2))
  for name, result in results.items():
    _print(name, result)


if __name__ == "__main__":
  cli.run(main)
