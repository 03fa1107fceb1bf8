"""The inputs WaffleIron needs beyond a pack's voxels, in numpy (no JAX): for the data side.

`waffleiron.Model` reads three keys besides `features` and `s0/mask` (its
module docstring): `knn`, the k nearest points of every point within its
scan; `scan`, every token's scan slot in its pack; `slots`, which slots hold a
scan. A scan's kNN map depends only on its points (and not on the pipeline's
rotations, flips and isotropic scaling), so the voxeliser can store it per
scan; `pack_inputs` moves every scan's map by its first token, as
`packing.pack` moves the 3x3x3 neighbour maps.

  knn_indices    a scan's (N, k) nearest neighbours, itself excluded (scipy cKDTree).
  pack_inputs    a pack's `knn`, `scan`, `slots` from its scans' kNN maps.
  crop_mask      the official crop of a cloud to the field of view.
  cell_indices   the official cell of every point on every plane (float64).
  PLANES         the official projection sequence (`dim_proj` 2, 1, 0).
  PLANE_AXES     the axes of the plane along each axis (`lut_axis_plane`).

The cells themselves are computed by the model from the batch's (augmented)
coordinates (`waffleiron.grid_cells`, float32); `cell_indices` is the official
float64 computation, for checks and for precomputing them.
"""

from collections.abc import Sequence

import numpy as np

PLANES = (2, 1, 0)  # projection axis of layers 0, 1, 2 (then again): (x, y), (x, z), (y, z)
PLANE_AXES = {0: (1, 2), 1: (0, 2), 2: (0, 1)}  # the official `lut_axis_plane`
NUM_NEIGHBORS = 16


def knn_indices(xyz: np.ndarray, k: int = NUM_NEIGHBORS) -> np.ndarray:
  """(N, k) int32: the k nearest points of every point, itself excluded (nearest first).

  The official pipeline queries k + 1 neighbours with scipy's cKDTree and drops
  the first, which is the point itself unless another point has the same
  coordinates; here the point itself is removed wherever it comes.

  Raises:
    ValueError: the scan has k points or fewer (the official code asserts the same).
  """
  from scipy.spatial import cKDTree

  xyz = np.asarray(xyz, np.float64)[:, :3]
  n = len(xyz)
  if n <= k:
    raise ValueError(f"a scan needs more than {k} points for its kNN map, got {n}")
  _, index = cKDTree(xyz).query(xyz, k=k + 1)
  self_hit = index == np.arange(n)[:, None]
  # Drop the point itself, or the farthest when a duplicate pushed it out of the k + 1.
  drop = np.where(self_hit.any(axis=1), np.argmax(self_hit, axis=1), k)
  keep = np.ones_like(index, bool)
  keep[np.arange(n), drop] = False
  return index[keep].reshape(n, k).astype(np.int32)


def crop_mask(xyz: np.ndarray, fov, eps: float = 1e-4) -> np.ndarray:
  """(N,) bool: the official crop (`utils/transforms.py` Crop): strictly inside the field of
  view shrunk by `eps` on every axis."""
  low, high = np.asarray(fov[0], np.float64), np.asarray(fov[1], np.float64)
  xyz = np.asarray(xyz)[:, :3]
  return np.all((xyz > low + eps) & (xyz < high - eps), axis=1)


def cell_indices(xyz: np.ndarray, fov, grids, planes: Sequence[int] = PLANES) -> np.ndarray:
  """(N, planes) int64: the official `get_occupied_2d_cells` (float64, truncation), with
  points outside the field of view clipped to the grid as `grid_cells` does."""
  out = []
  for plane, grid in zip(planes, grids, strict=True):
    axes = list(PLANE_AXES[plane])
    low, high = np.asarray(fov[0])[axes], np.asarray(fov[1])[axes]
    resolution = (high - low) / np.asarray(grid)[None]
    q = np.floor((np.asarray(xyz)[:, axes] - low) / resolution).astype(np.int64)
    q = np.clip(q, 0, np.asarray(grid) - 1)
    out.append(q[:, 0] * grid[1] + q[:, 1])
  return np.stack(out, axis=1)


def pack_inputs(knns: Sequence[np.ndarray], tokens: int, slots: int) -> dict[str, np.ndarray]:
  """The model's keys of one pack whose scans lie back to back from token 0 (`packing.pack`).

  Args:
    knns: every scan's (N_j, k) `knn_indices`, in pack order.
    tokens: T0, the pack's stage-0 budget.
    slots: S, the pack's scan slots.

  Returns:
    {"knn": (T0, k) int32, "scan": (T0,) int32, "slots": (S,) bool} (module docstring).
  """
  if not 1 <= len(knns) <= slots:
    raise ValueError(f"a pack holds 1 to {slots} scans, got {len(knns)}")
  counts = [len(k) for k in knns]
  if sum(counts) > tokens:
    raise ValueError(f"scans of {sum(counts)} points exceed the {tokens} tokens of the pack")
  starts = np.concatenate([[0], np.cumsum(counts)])
  width = knns[0].shape[1]
  knn = np.full((tokens, width), tokens, np.int32)
  scan = np.full(tokens, slots, np.int32)
  for j, (k, start) in enumerate(zip(knns, starts[:-1], strict=True)):
    knn[start : start + len(k)] = k + start
    scan[start : start + len(k)] = j
  return {"knn": knn, "scan": scan, "slots": np.arange(slots) < len(knns)}
