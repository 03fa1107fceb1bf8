"""Pictures of one scan: the student's features, prompt responses and pair similarities.

The notebooks in colab/ draw with these; each plot function writes one PNG and
returns its path (the figures are built as in `report`, without pyplot).

  Scan                      one keyframe joined from its TFDS record (points,
                            labels, camera JPEGs, point-to-pixel pairs) and
                            its voxel bucket (`point_to_voxel`).
  load_scan                 a TFDS record and its bucket, joined by token.
  class_colours             RGB of training ids in the report's palette.
  voxel_features            the student's (V0, D) features of one bucket.
  point_values              per-voxel values -> per-point values.
  pca_colours               RGB of features from their first three principal
                            components.
  prompt_scores             cosine of features with one text embedding.
  pair_features             (K, Q, labels) of one scan's pairs: the student's
                            and the teacher's features of the same pixels.
  plot_scan                 bird's-eye view and camera images, coloured per point.
  plot_similarity_matrices  K K^T next to Q Q^T and |K K^T - Q Q^T|.
"""

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from PIL import Image

from reldistill_jax import classes, evaluate, input_pipeline, pairs, report
from reldistill_jax.evaluators import structural_gap


@dataclasses.dataclass(frozen=True)
class Scan:
  """One keyframe, everything needed to picture it.

  Attributes:
    token: the sample token.
    points: (N, 3) float32 x, y, z of every original point (lidar frame, m).
    labels: (N,) int training ids (0 = ignore or unlabelled).
    point_to_voxel: (N,) int32 stage-0 voxel of each point.
    images: the six camera JPEGs (bytes), in `classes.NUSCENES_CAMERAS` order
      (none for SemanticKITTI, whose records hold no images or pairs).
    pairs_point: (M,) int32 point index of each point-to-pixel pair.
    pairs_camera: (M,) camera index of each pair.
    pairs_uv: (M, 2) float32 pixel (column, row) of each pair.
    bucket: the voxel bucket record (the student's input).
  """

  token: str
  points: np.ndarray
  labels: np.ndarray
  point_to_voxel: np.ndarray
  images: Sequence[bytes]
  pairs_point: np.ndarray
  pairs_camera: np.ndarray
  pairs_uv: np.ndarray
  bucket: Mapping[str, Any]

  def image(self, camera: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of camera `camera`."""
    return np.asarray(Image.open(io.BytesIO(self.images[camera])).convert("RGB"))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def load_scan(tfds_source, buckets, index: int) -> Scan:
  """Record `index` of a TFDS split joined with its bucket of the same token.

  Args:
    tfds_source: the split's TFDS data source (`data_prep.builders.data_source`).
    buckets: the bucket store of that split (`records.ShardedReader`).
    index: the record's index in `tfds_source`.

  Raises:
    KeyError: naming the token and the bucket store when it has no such bucket.
    ValueError: when the bucket's point count differs from the record's.
  """
  record = tfds_source[index]
  token = _text(record["token"])
  bucket = buckets.get(token)
  points = np.asarray(record["points"], np.float32)
  if int(bucket["num_points"]) != len(points):
    raise ValueError(
      f"{buckets.path}: bucket {token} has {int(bucket['num_points'])} points, its TFDS "
      f"record {len(points)} (a bucket store of another build?)"
    )
  return Scan(
    token=token,
    points=points[:, :3],
    labels=np.asarray(record["labels"]).astype(np.int64),
    point_to_voxel=np.asarray(bucket["point_to_voxel"]),
    images=list(record.get("images", [])),
    pairs_point=np.asarray(record.get("pairs_point", np.zeros(0, np.int32))),
    pairs_camera=np.asarray(record.get("pairs_camera", np.zeros(0))).astype(np.int64),
    pairs_uv=np.asarray(record.get("pairs_uv", np.zeros((0, 2))), np.float32).reshape(-1, 2),
    bucket=bucket,
  )


def class_colours(labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
  """(N, 3) RGB of training ids 1..C in `report`'s palette; grey for 0 (ignore)."""
  labels = np.asarray(labels).astype(np.int64)
  palette = np.vstack([mcolors.to_rgb(report.IGNORE_COLOUR), report.class_palette(class_names)])
  if labels.size and (labels.min() < 0 or labels.max() > len(class_names)):
    raise ValueError(f"labels outside 0..{len(class_names)}: {labels.min()}..{labels.max()}")
  return palette[labels]


def voxel_features(
  model, params, bucket: Mapping[str, Any], transform, patch_size: int
) -> np.ndarray:
  """(V0, D) float32 features of the student for every voxel of one bucket.

  Args:
    model: the student (`runtime.make_model(config)`).
    params: its parameters (`runtime.load_params(checkpoints)`).
    bucket: a bucket record.
    transform: an evaluation `input_pipeline.Transform` (no augmentation).
    patch_size: the student's attention patch (`config.model.patch_size`).
  """
  batch = input_pipeline.one_scan_batch(transform(bucket), patch_size)
  features, _ = jax.jit(model.apply)(params, batch)
  return np.asarray(jax.device_get(features[0]), np.float32)[: bucket["num_voxels"]]


def point_values(scan: Scan, per_voxel: np.ndarray) -> np.ndarray:
  """(N, ...) the value of each point's voxel (`evaluate.point_values`)."""
  return evaluate.point_values(scan.point_to_voxel, per_voxel)


def pca_colours(features: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """(N, 3) RGB in [0, 1]: the first three principal components of `features`.

  The components are fitted on the rows of `mask` (all rows by default) and
  each is stretched between its 1st and 99th percentile, so similar features
  get similar colours. Rows outside `mask` are grey.
  """
  x = np.asarray(features, np.float64)
  mask = np.ones(len(x), bool) if mask is None else np.asarray(mask, bool)
  if mask.sum() < 3:
    raise ValueError(f"PCA colours need at least 3 valid rows, got {int(mask.sum())}")
  centred = x[mask] - x[mask].mean(0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  proj = (x - x[mask].mean(0)) @ vt[:3].T
  lo, hi = np.percentile(proj[mask], [1, 99], axis=0)
  rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
  rgb[~mask] = mcolors.to_rgb(report.IGNORE_COLOUR)
  return rgb


def prompt_scores(features: np.ndarray, text_embedding: np.ndarray) -> np.ndarray:
  """(...) cosine similarity of each feature with one (D,) or (1, D) text embedding."""
  text = np.asarray(text_embedding, np.float64).reshape(-1)
  x = np.asarray(features, np.float64)
  if x.shape[-1] != text.shape[0]:
    raise ValueError(f"features (..., {x.shape[-1]}) against a text embedding of {text.shape[0]}")
  norms = np.maximum(np.linalg.norm(x, axis=-1), 1e-12) * max(np.linalg.norm(text), 1e-12)
  return (x @ text) / norms


def _colours(values: np.ndarray, cmap: str, vmin, vmax):
  """RGB per point from (N, 3) colours or (N,) scalars (NaN: grey)."""
  values = np.asarray(values, np.float64)
  if values.ndim == 2:
    return values, None
  finite = np.isfinite(values)
  vmin = np.nanpercentile(values, 1) if vmin is None else vmin
  vmax = np.nanpercentile(values, 99) if vmax is None else vmax
  norm = mcolors.Normalize(vmin, vmax)
  rgb = matplotlib.colormaps[cmap](norm(np.where(finite, values, vmin)))[:, :3]
  rgb[~finite] = mcolors.to_rgb(report.IGNORE_COLOUR)
  return rgb, cm.ScalarMappable(norm=norm, cmap=cmap)


def plot_scan(
  scan: Scan,
  values: np.ndarray,
  path,
  *,
  cameras: Sequence[int] = (0,),
  title: str | None = None,
  cmap: str = "inferno",
  vmin: float | None = None,
  vmax: float | None = None,
  colourbar_label: str = "",
  extent: float | None = None,
):
  """Bird's-eye view of a scan and its points projected onto camera images.

  Args:
    scan: the scan (`load_scan`).
    values: (N, 3) RGB colours in [0, 1] or (N,) scalars (drawn with `cmap`
      between `vmin` and `vmax`, default the 1st and 99th percentiles) for
      every original point; NaN rows are grey.
    path: the PNG to write.
    cameras: indices into `classes.NUSCENES_CAMERAS` of the images to show.
    title: the figure title.
    extent: half-width of the square view in metres; default from the points.

  Returns:
    The path written.
  """
  rgb, mappable = _colours(values, cmap, vmin, vmax)
  if len(rgb) != len(scan.points):
    raise ValueError(f"{len(rgb)} colours for the {len(scan.points)} points of {scan.token}")
  xy = scan.points[:, :2]
  if extent is None:
    extent = max(10.0, 10.0 * math.ceil(np.percentile(np.abs(xy), 98) / 10.0))
  images = [scan.image(c) for c in cameras]
  widths = [6.0] + [6.0 * im.shape[1] / im.shape[0] for im in images]
  fig = report.figure(sum(widths) * 0.9, 6.4)
  axes = fig.subplots(1, 1 + len(images), width_ratios=widths)
  axes = np.atleast_1d(axes)
  size = float(np.clip(1.2e5 / max(len(xy), 1), 0.8, 6.0))
  bev = axes[0]
  bev.scatter(*xy.T, c=rgb, s=size, marker="o", linewidths=0, rasterized=True)
  bev.plot(0, 0, marker="^", color="red", ms=7, ls="none")
  bev.set(title="bird's-eye view (ego: red triangle)", xlabel="x (m)", ylabel="y (m)")
  bev.set_xlim(-extent, extent)
  bev.set_ylim(-extent, extent)
  bev.set_aspect("equal")
  for ax, camera, image in zip(axes[1:], cameras, images, strict=True):
    on = scan.pairs_camera == camera
    uv, idx = scan.pairs_uv[on], scan.pairs_point[on]
    order = np.argsort(-np.linalg.norm(scan.points[idx], axis=1))  # far points first
    ax.imshow(image)
    ax.scatter(*uv[order].T, c=rgb[idx][order], s=6.0, marker="o", linewidths=0, alpha=0.9)
    ax.set(title=f"{classes.NUSCENES_CAMERAS[camera]}: {int(on.sum()):,} projected points")
    ax.set_axis_off()
  if mappable is not None:
    fig.colorbar(mappable, ax=list(axes), shrink=0.8, label=colourbar_label)
  fig.suptitle(title or f"scan {scan.token}", fontsize=12)
  return report.save_figure(fig, path)


def pair_features(
  model, params, joined: Mapping[str, Any], transform, patch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The student's and the teacher's features of one scan's pairs.

  Args:
    model, params: the student.
    joined: a bucket record holding its teacher maps under "teacher"
      (`input_pipeline.JoinedSource`).
    transform: an evaluation `Transform` with pairs and the store's grid.
    patch_size: the student's attention patch.

  Returns:
    (K, Q, labels): (M, D) float32 student and teacher features of the M
    valid pairs, both L2-normalised, and the (M,) label of each pair's voxel.
  """
  example = transform(joined)
  batch = input_pipeline.one_scan_batch(example, patch_size)

  @jax.jit
  def fn(params, batch):
    features, _ = model.apply(params, batch)
    return pairs.batch_pairs(features, batch)

  k, q, mask = (np.asarray(x) for x in jax.device_get(fn(params, batch)))
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  labels = example["labels"][example["pairs_voxel"]]
  return unit(k[mask]).astype(np.float32), unit(q[mask]).astype(np.float32), labels[mask]


def plot_similarity_matrices(
  k: np.ndarray,
  q: np.ndarray,
  labels: np.ndarray,
  class_names: Sequence[str],
  path,
  *,
  max_pairs: int = 600,
  seed: int = 0,
  title: str | None = None,
):
  """The 3D (K K^T) and 2D (Q Q^T) similarity matrices of the same pairs, and
  their absolute difference, with pairs grouped by class.

  The relational loss drives the first towards the second; the mean of the
  third over all pairs is the structural gap G (printed in the title, from
  `evaluators.structural_gap` on every pair given).

  Args:
    k, q: (M, D) L2-normalised pair features (`pair_features`).
    labels: (M,) training ids of the pairs (0 = ignore).
    class_names: names of ids 1..C.
    path: the PNG to write.
    max_pairs: pairs drawn (a random subset, sorted by class).
    seed: seed of that subset.
    title: a first title line (the second gives the pair counts and G).
  """
  k, q, labels = np.asarray(k), np.asarray(q), np.asarray(labels).astype(np.int64)
  if not (len(k) == len(q) == len(labels)) or len(k) < 2:
    raise ValueError(f"matched pairs expected; got K {k.shape}, Q {q.shape}, {labels.shape}")
  gap = structural_gap.structural_gap(k, q)
  rng = np.random.default_rng(seed)
  pick = np.sort(rng.choice(len(k), min(max_pairs, len(k)), replace=False))
  pick = pick[np.argsort(labels[pick], kind="stable")]
  ks, qs, ls = k[pick], q[pick], labels[pick]
  panels = (
    ("3D student  K Kᵀ", ks @ ks.T, "RdBu_r", (-1, 1)),
    ("2D teacher  Q Qᵀ", qs @ qs.T, "RdBu_r", (-1, 1)),
    ("|K Kᵀ − Q Qᵀ|", np.abs(ks @ ks.T - qs @ qs.T), "magma", (0, 1)),
  )
  fig = report.figure(17.0, 6.2)
  axes = fig.subplots(1, 3)
  bounds = np.flatnonzero(np.diff(ls)) + 0.5
  ids, starts = np.unique(ls, return_index=True)
  ends = np.r_[starts[1:], len(ls)]
  names = ["ignore" if i == 0 else class_names[i - 1] for i in ids]
  for ax, (name, matrix, cmap, (lo, hi)) in zip(axes, panels, strict=True):
    shown = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    for b in bounds:
      ax.axhline(b, color="k", lw=0.4)
      ax.axvline(b, color="k", lw=0.4)
    wide = (ends - starts) >= 0.025 * len(ls)  # label the classes with room for it
    ax.set_xticks((starts + ends - 1)[wide] / 2, np.array(names)[wide], rotation=90, fontsize=7)
    ax.set_yticks((starts + ends - 1)[wide] / 2, np.array(names)[wide], fontsize=7)
    ax.set_title(name)
    fig.colorbar(shown, ax=ax, shrink=0.75)
  caption = (
    f"{len(ls)} of {len(k):,} pairs of one scan, grouped by class; G on all pairs = {gap:.3f}"
  )
  fig.suptitle(f"{title}\n{caption}" if title else caption, fontsize=12)
  return report.save_figure(fig, path)
