"""Pair features of a batch: K from the student, Q from the stored teacher maps.

Runs on the device inside the update step: the teacher maps (fp16 patch
grids) are sampled bilinearly at each pair's pixel, so the store holds grids,
not per-pair features (about 9x smaller).
"""

import jax
import jax.numpy as jnp


def gather_voxels(features: jax.Array, pairs_voxel: jax.Array) -> jax.Array:
  """(B, T0, D) voxel features at the pairs' tokens -> (B, S * P, D)."""
  return jnp.take_along_axis(features, pairs_voxel[..., None], axis=1)


def sample_teacher(teacher: jax.Array, camera: jax.Array, grid: jax.Array) -> jax.Array:
  """Bilinear samples of the teacher maps at the pairs' grid positions.

  Args:
    teacher: (B, S, cameras, h, w, D) feature maps of the S scan slots of every pack.
    camera: (B, S * P) camera index of each pair; pair slot i belongs to scan
      slot i // P.
    grid: (B, S * P, 2) (row, col) on the grid, cell (i, j) spanning
      [i, i+1) x [j, j+1); its centre is (i + 0.5, j + 0.5).

  Returns:
    (B, S * P, D) float32 features, interpolated between the four nearest cell
    centres (clamped at the borders).
  """
  slots = teacher.shape[1]
  h, w = teacher.shape[3:5]
  scan = jnp.arange(camera.shape[1]) // (camera.shape[1] // slots)  # (S * P,) scan slot
  pos = grid - 0.5  # centre-aligned coordinates
  lo = jnp.floor(pos)
  frac = pos - lo
  lo = lo.astype(jnp.int32)

  def at(dr, dc):
    rows = jnp.clip(lo[..., 0] + dr, 0, h - 1)
    cols = jnp.clip(lo[..., 1] + dc, 0, w - 1)
    batch = jnp.arange(teacher.shape[0])[:, None]
    return teacher[batch, scan[None], camera, rows, cols].astype(jnp.float32)  # (B, S * P, D)

  fr, fc = frac[..., 0:1], frac[..., 1:2]
  top = at(0, 0) * (1 - fc) + at(0, 1) * fc
  bottom = at(1, 0) * (1 - fc) + at(1, 1) * fc
  return top * (1 - fr) + bottom * fr


def batch_pairs(
  features: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(K, Q, mask) of every pair slot of the batch, flattened to (B * S * P, D)."""
  k = gather_voxels(features, batch["pairs_voxel"])
  q = sample_teacher(batch["teacher"], batch["pairs_camera"], batch["pairs_grid"])
  d = k.shape[-1]
  return k.reshape(-1, d), q.reshape(-1, d), batch["pairs_mask"].reshape(-1)
