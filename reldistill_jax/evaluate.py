"""Evaluation over every scan of a bucket store, scored on every original point.

PROTOCOLS.md sections 4-5. Predictions are made per voxel on packed batches
(consecutive scans of the store in one pack per device, `packing.py`) and
mapped back to the scan's original points on the host through the bucket's
`point_to_voxel`; the counts of every scan go into one confusion matrix
(`evaluators.segmentation`).

  predict_voxels   a jitted `apply_fn(params, batch)` over every record, in
                   order, with one static batch shape (the last batch is
                   padded with copies of its last pack, dropped on the host),
                   its outputs cut back into scans.
  segmentation     mIoU of voxel class predictions, on every point.
  zero_shot        the student's features against class text embeddings.
  structural_gap   G and linear CKA between the student's pair features and
                   the stored teacher features of the same pairs.

Evaluation transforms never augment. Pairs (structural gap only) are sampled
per scan with `np.random.default_rng((seed, index))`, so a result does not
depend on the batch size or the device count.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reldistill_jax import errors, feature_store, input_pipeline, packing, pairs, records
from reldistill_jax.evaluators import segmentation as segmentation_lib
from reldistill_jax.evaluators import structural_gap as gap_lib
from reldistill_jax.evaluators import zeroshot

ApplyFn = Callable[[Any, Mapping[str, jax.Array]], Any]


def _store(source) -> records.ShardedReader:
  """The bucket store of a source (itself, or the one behind a joined source)."""
  return getattr(source, "buckets", source)


def _store_name(source) -> str:
  return str(getattr(_store(source), "path", repr(source)))


def _single_device_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh(
    (1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
  )


def _batch_fn(devices: int):
  """Stacks (records, pack) items, padding the packs with copies of the last."""

  def fn(items):
    items = list(items)
    packs = [pack for _, pack in items]
    packs += [packs[-1]] * (devices - len(packs))
    return [scans for scans, _ in items], input_pipeline.stack(packs)

  return fn


def _scan_rows(out, batch: dict, b: int, slot: int, rows: str, num_pairs: int):
  """The rows of scan slot `slot` of pack `b` in every array of `out` (batch axis removed)."""
  if rows == "voxels":
    start, count = int(batch["scan_start"][b, slot]), int(batch["scan_voxels"][b, slot])
  else:  # the pair slots of the scan
    start, count = slot * num_pairs, num_pairs
  return jax.tree.map(lambda x: x[b, start : start + count], out)


def predict_voxels(
  apply_fn: ApplyFn,
  params: Any,
  buckets,
  transform: input_pipeline.Transform,
  budgets: packing.Budgets,
  mesh: jax.sharding.Mesh | None,
  *,
  rows: str = "voxels",
  seed: int = 0,
  num_threads: int = 4,
  desc: str = "evaluate",
) -> Iterator[tuple[dict[str, Any], Any]]:
  """Runs `apply_fn` over every record of a store, in order, one shape throughout.

  Args:
    apply_fn: `apply_fn(params, batch) -> out`, out a pytree of arrays with
      the pack axis first, then either a token axis (e.g. (B, T0) class
      predictions or (B, T0, D) features; `rows="voxels"`) or a pair-slot
      axis ((B, S * P, ...); `rows="pairs"`); jitted here, sharded on the
      mesh's `data` axis.
    params: the model parameters (replicated on the mesh).
    buckets: a random-access source of bucket records (`records.ShardedReader`
      or `input_pipeline.JoinedSource`).
    transform: the evaluation transform (no augmentation); its `num_pairs`
      pairs of scan i are drawn with `np.random.default_rng((seed, i))`.
    budgets: the pack shape (`runtime.pack_budgets`); a call runs one pack per
      device of the mesh.
    mesh: a mesh with a `data` axis, or None for the first device.
    rows: "voxels" or "pairs": what the second axis of `out` indexes.
    seed: seed of the pair sampling.
    num_threads: reader threads (decoding and packing run ahead).
    desc: the progress bar's label (scans done over the store's length).

  Yields:
    (record, out): the bucket record as read (host numpy: `point_to_voxel`,
    `point_labels`, `has_labels`, ...) and its rows of `out` as numpy, the
    pack axis removed (e.g. (V0,) predictions of its voxels, or the (P, ...)
    outputs of its pair slots), for every record in store order.

  Raises:
    ValueError: an augmenting transform.
  """
  if transform.augment is not None:
    raise ValueError("evaluation transforms must not augment (pass augment=None)")
  mesh = mesh if mesh is not None else _single_device_mesh()
  devices = mesh.shape["data"]
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))
  fn = jax.jit(apply_fn, in_shardings=(replicated, data_sharding), out_shardings=replicated)
  params = jax.device_put(params, replicated)

  plan = packing.PackPlan(_store(buckets).sizes, budgets, shuffle=False)

  def build(index: int, scans: list[dict]):
    rngs = [np.random.default_rng((seed, int(i))) for i in plan[index]]
    return scans, packing.pack([transform(r, g) for r, g in zip(scans, rngs, strict=True)], budgets)

  ds = grain.MapDataset.source(input_pipeline.PackedSource(buckets, plan)).map_with_index(build)
  ds = ds.batch(devices, drop_remainder=False, batch_fn=_batch_fn(devices))
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
  # Drawn on a terminal only (None: off when stderr is not a TTY), by the first process.
  progress = tqdm.tqdm(
    total=len(buckets), unit="scan", desc=desc, disable=None if jax.process_index() == 0 else True
  )

  def outputs(pending):
    batch_scans, batch, out = pending
    out = jax.device_get(out)
    for b, scans in enumerate(batch_scans):  # padding packs are never read
      for slot, record in enumerate(scans):
        progress.update()
        yield record, _scan_rows(out, batch, b, slot, rows, transform.num_pairs)

  pending = None
  try:
    for batch_scans, batch in ds.to_iter_dataset(options):
      device_batch = {
        k: jax.device_put(v, data_sharding)
        for k, v in batch.items()
        if k not in input_pipeline.HOST_KEYS
      }
      out = fn(params, device_batch)  # dispatched: runs while the host scores the previous batch
      if pending is not None:
        yield from outputs(pending)
      pending = (batch_scans, batch, out)
    if pending is not None:
      yield from outputs(pending)
  finally:
    progress.close()


def point_values(point_to_voxel: np.ndarray, per_voxel: np.ndarray) -> np.ndarray:
  """(N, ...) the value of every original point's voxel.

  Args:
    point_to_voxel: (N,) a bucket's stage-0 voxel of each point.
    per_voxel: (V0, ...) values per voxel (predictions, features, scores).
  """
  return np.asarray(per_voxel)[np.asarray(point_to_voxel)]


def segmentation(
  apply_fn: ApplyFn,
  params: Any,
  buckets,
  transform: input_pipeline.Transform,
  budgets: packing.Budgets,
  mesh: jax.sharding.Mesh | None,
  class_names: Sequence[str],
  empty: str = "nan",
) -> dict:
  """Segmentation metrics of voxel predictions, on every point of every scan.

  Args:
    apply_fn: `apply_fn(params, batch) -> (B, T0)` int training ids 1..C
      per token (values on padding are never read).
    params: its parameters.
    buckets: the bucket store of the split (every scan labelled).
    transform: the evaluation transform (`predict_voxels`).
    budgets: the pack shape (`predict_voxels`).
    mesh: a mesh with a `data` axis, or None for one device.
    class_names: names of training ids 1..C.
    empty: the empty-class convention, "nan" or "one"
      (`evaluators.segmentation`).

  Returns:
    `evaluators.segmentation.segmentation_metrics` of the split's confusion
    matrix, plus "num_scans".

  Raises:
    ValueError: naming the store, for a scan without labels or an empty split.
  """
  num_classes = len(class_names)
  confusion = np.zeros((num_classes + 1, num_classes + 1), np.int64)
  num_scans = 0
  for record, voxel_pred in predict_voxels(
    apply_fn, params, buckets, transform, budgets, mesh, desc="segmentation"
  ):
    if not record["has_labels"]:
      raise errors.DataError(
        f"{_store_name(buckets)}: scan {record['token']!r} has no labels; "
        "segmentation is scored on labelled splits only"
      )
    point_pred = point_values(record["point_to_voxel"], voxel_pred)
    confusion += segmentation_lib.confusion_matrix(point_pred, record["point_labels"], num_classes)
    num_scans += 1
  if not num_scans:
    raise errors.DataError(f"{_store_name(buckets)}: the split holds no scans to evaluate")
  metrics = segmentation_lib.segmentation_metrics(confusion, class_names, empty)
  return metrics | {"num_scans": num_scans}


def zero_shot(
  model,
  params: Any,
  buckets,
  text_embeddings,
  transform: input_pipeline.Transform,
  budgets: packing.Budgets,
  mesh: jax.sharding.Mesh | None,
  class_names: Sequence[str],
  empty: str = "nan",
) -> dict:
  """Zero-shot segmentation: each voxel takes the class of the closest text embedding.

  Args:
    model: the student (`model.apply(params, batch) -> (features, aux)`).
    params: its parameters.
    buckets: the bucket store of the split.
    text_embeddings: (C, D) class text embeddings, row c - 1 for training id c.
    transform, budgets, mesh, class_names, empty: as `segmentation`.

  Returns:
    The metrics of `segmentation`.
  """
  text = np.asarray(text_embeddings, np.float32)  # (C, D)
  if text.shape[0] != len(class_names):
    raise ValueError(f"{text.shape[0]} text embeddings for {len(class_names)} class names")

  def apply_fn(params, batch):
    features, _ = model.apply(params, batch)  # (B, T0, D)
    return zeroshot.zero_shot_predict(features, jnp.asarray(text))  # (B, T0)

  return segmentation(apply_fn, params, buckets, transform, budgets, mesh, class_names, empty)


class _PairSample:
  """A uniform sample of at most `size` rows of a stream, without replacement.

  Every row gets a uniform key (from the rng of its scan) and the `size`
  smallest keys are kept, so memory stays O(size * D) while the result is the
  sample a shuffle of the whole concatenation would give.
  """

  def __init__(self, size: int | None):
    self.size = size
    self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self.count = 0

  def add(self, keys: np.ndarray, k: np.ndarray, q: np.ndarray) -> None:
    self.parts.append((keys, k, q))
    self.count += len(keys)
    if self.size is not None and self.count > 2 * self.size:
      self.parts = [self._trimmed()]
      self.count = len(self.parts[0][0])

  def _trimmed(self):
    if not self.parts:
      return np.zeros(0), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    keys, k, q = (np.concatenate(x) for x in zip(*self.parts, strict=True))
    if self.size is not None and len(keys) > self.size:
      keep = np.sort(np.argpartition(keys, self.size - 1)[: self.size])
      keys, k, q = keys[keep], k[keep], q[keep]
    return keys, k, q

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    _, k, q = self._trimmed()
    return k, q


def structural_gap(
  model,
  params: Any,
  buckets: records.ShardedReader,
  store: feature_store.FeatureStore,
  transform: input_pipeline.Transform,
  budgets: packing.Budgets,
  mesh: jax.sharding.Mesh | None,
  max_pairs: int | None = None,
  *,
  text_embeddings: np.ndarray | None = None,
  class_names: Sequence[str] = (),
  seed: int = 0,
) -> dict[str, Any]:
  """G and linear CKA between the student and the teacher on held-out pairs, and
  optionally both zero-shot on the same pairs.

  Every scan contributes its (up to P) pairs: K is the student's feature of
  the pair's voxel, Q the teacher map sampled at the pair's pixel
  (`pairs.batch_pairs`, as in training). With text embeddings, each pair is
  also classified zero-shot twice, from K (the student) and from Q (the
  teacher's own features: the ceiling of what distillation can give), and
  scored against the label of the pair's voxel: the two mIoUs are over the
  same points, so they compare.

  Args:
    model: the student.
    params: its parameters.
    buckets: the bucket store of the held-out split.
    store: the teacher feature store of the same scans.
    transform: an evaluation transform with `num_pairs` P > 0 and the store's
      grid (P >= a scan's pair count takes all of them).
    budgets: the pack shape (`predict_voxels`).
    mesh: a mesh with a `data` axis, or None for one device.
    max_pairs: a uniform sample of this many pairs of the whole split for G
      and CKA (deterministic given `seed`), or None for all of them (host
      memory O(N * D)); the zero-shot scores always use every pair.
    text_embeddings: (C, D) class text embeddings, or None for G and CKA only.
    class_names: names of training ids 1..C (with text_embeddings).
    seed: seed of the per-scan pair sampling and of the subsample.

  Returns:
    {"G": the structural gap, "cka": linear CKA of K and Q (rows normalised),
     "pairs": N, the number of pairs used}; with text embeddings also
    "zeroshot_paired" and "zeroshot_teacher": `segmentation_metrics` of the
    student's and the teacher's predictions over the labelled pairs.

  Raises:
    ValueError: a transform without pairs or on another grid, or no pairs.
  """
  if transform.num_pairs < 1:
    raise ValueError("the structural gap needs a transform with num_pairs > 0")
  grid = tuple(store.config["grid"])
  if transform.grid is None or tuple(transform.grid) != grid:
    raise ValueError(f"the transform's grid {transform.grid} is not the store's {grid}")
  source = input_pipeline.JoinedSource(buckets, store)
  input_pipeline.check_join(buckets, store)
  text = None if text_embeddings is None else jnp.asarray(text_embeddings, jnp.float32)

  def apply_fn(params, batch):
    features, _ = model.apply(params, batch)  # (B, T0, D)
    k = pairs.gather_voxels(features, batch["pairs_voxel"])  # (B, S * P, D)
    q = pairs.sample_teacher(batch["teacher"], batch["pairs_camera"], batch["pairs_grid"])
    out = {"k": k, "q": q, "mask": batch["pairs_mask"]}
    if text is not None:
      out["label"] = jnp.take_along_axis(batch["labels"], batch["pairs_voxel"], axis=1)
      out["student"] = zeroshot.zero_shot_predict(k, text)
      out["teacher"] = zeroshot.zero_shot_predict(q, text)
    return out

  sample = _PairSample(max_pairs)
  size = len(class_names) + 1
  confusion = {"zeroshot_paired": np.zeros((size, size), np.int64)}
  confusion["zeroshot_teacher"] = np.zeros((size, size), np.int64)
  scans = predict_voxels(
    apply_fn, params, source, transform, budgets, mesh, rows="pairs", seed=seed,
    desc="structural gap",
  )  # fmt: skip
  for index, (_, out) in enumerate(scans):
    mask = out["mask"]
    keys = np.random.default_rng((seed, index, 1)).random(int(mask.sum()))
    sample.add(keys, out["k"][mask], out["q"][mask])
    if text is not None:
      for name, who in (("zeroshot_paired", "student"), ("zeroshot_teacher", "teacher")):
        confusion[name] += segmentation_lib.confusion_matrix(
          out[who][mask], out["label"][mask], len(class_names)
        )
  k, q = sample.result()  # (N, D) each
  if len(k) < 2:
    raise errors.DataError(f"{_store_name(buckets)}: {len(k)} pair(s); the gap needs at least 2")
  result = {
    "G": gap_lib.structural_gap(k, q, mesh=mesh),
    "cka": gap_lib.linear_cka(k, q),
    "pairs": len(k),
  }
  if text is not None:
    for name, counts in confusion.items():
      result[name] = segmentation_lib.segmentation_metrics(counts, class_names)
  return result
