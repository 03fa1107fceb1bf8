"""Position encodings of the image towers: torch's bicubic resampling, RoPE, NACLIP's window.

Learned position embeddings are trained on a square grid and resampled to the
input's grid with PyTorch's bicubic interpolation, reproduced exactly here
(`torch_bicubic_weights`): `jax.image.resize` uses Keys' a = -0.5 kernel while
torch uses a = -0.75 with clamped borders, and its antialiased variant (the
one DINOv2-with-registers uses) yet another filter; the differences are far
above float32 noise. The interpolation is a pair of (static) matrices applied
to the embedding table, so it costs nothing at run time and stays jit-friendly.

DINOv3 has no table: rotary embeddings of the patch centres (`rope_tables`,
`apply_rope`). NACLIP's Gaussian attention window over the patch grid is a
static table too (`naclip_window`).
"""

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a, zero outside |x| < 2."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(x.dtype)


def torch_bicubic_weights(
  in_size: int,
  out_size: int,
  scale_factor: float | None = None,
  antialias: bool = False,
) -> np.ndarray:
  """The (out_size, in_size) matrix of torch's 1-D bicubic resampling.

  `torch.nn.functional.interpolate(x, mode="bicubic", align_corners=False)`
  is separable: along each axis it is `weights @ x` with this matrix.

  Args:
    in_size: input length.
    out_size: output length.
    scale_factor: the `scale_factor` passed to torch, if any: torch then maps
      output to input coordinates with 1 / scale_factor instead of
      in_size / out_size (DINOv2's offset quirk relies on this).
    antialias: torch's `antialias=True` path: a PIL-style filter (a = -0.5)
      whose support widens by the downscale factor, weights renormalised at
      the borders, and an axis of unchanged length copied. Otherwise torch's
      plain bicubic (a = -0.75, four taps, border indices clamped).

  Returns:
    float32 (out_size, in_size) weights; each row sums to one.
  """
  if antialias and in_size == out_size:
    # Torch's separable antialiased kernel skips axes whose size is unchanged,
    # whatever the scale factor.
    return np.eye(out_size, dtype=np.float32)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  if antialias:
    scale = 1.0 / scale_factor if scale_factor else in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in rows:
      center = scale * (i + 0.5)
      # C++ truncation toward zero, as torch's index computation.
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      w = _cubic((np.arange(lo, hi) - center + 0.5) * invscale, -0.5)
      weights[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return weights
  # Torch computes the coordinates in float32 (its opmath type for float input).
  if scale_factor:
    scale = np.float32(1.0 / scale_factor)
  else:
    scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (rows.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
  base = np.floor(src)
  t = src - base
  taps = np.stack([t + 1, t, 1 - t, 2 - t], axis=1)  # distances to the 4 taps
  coeffs = _cubic(taps, -0.75)
  index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
  np.add.at(weights, (np.repeat(rows, 4), index.reshape(-1)), coeffs.reshape(-1))
  return weights


def rope_tables(grid: tuple[int, int], head_dim: int, theta: float) -> tuple[np.ndarray, ...]:
  """DINOv3's rotary tables for the patch tokens of a grid.

  Patch centres are normalised to [-1, 1] along each axis separately, so a
  non-square grid keeps both axes' full range; the first half of each head's
  channels rotates with the row coordinate's frequencies and the column's
  (head_dim / 4 each), tiled twice, as `rotate_half` pairs channel i with
  i + head_dim / 2.

  Returns:
    (cos, sin), each float32 (h * w, head_dim), row-major patches.
  """
  centres = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0 for n in grid]
  coords = np.stack(np.meshgrid(*centres, indexing="ij"), -1).reshape(-1, 2)  # (hw, 2)
  inv_freq = 1.0 / np.float32(theta) ** (np.arange(head_dim // 4, dtype=np.float32) * 4 / head_dim)
  angles = (2 * np.pi * coords[:, :, None] * inv_freq[None, None, :]).reshape(len(coords), -1)
  angles = np.tile(angles.astype(np.float32), 2)  # (hw, head_dim)
  return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, tables: tuple[np.ndarray, np.ndarray]) -> jax.Array:
  """Rotates the patch tokens (the last h * w) of (B, T, heads, head_dim); prefix tokens pass."""
  cos, sin = (jnp.asarray(t, x.dtype)[None, :, None, :] for t in tables)
  prefix, patches = jnp.split(x, [x.shape[1] - cos.shape[1]], axis=1)
  half = patches.shape[-1] // 2
  rotated = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
  return jnp.concatenate([prefix, patches * cos + rotated * sin], axis=1)


def naclip_window(grid: tuple[int, int], num_prefix: int, std: float) -> np.ndarray:
  """NACLIP's additive attention bias: a Gaussian of the patch distance, 0 for prefix tokens.

  Returns:
    float32 (T, T), T = num_prefix + h * w, entry exp(-d^2 / (2 std^2)) with d
    the distance in patches between two patch tokens.
  """
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
  window = np.zeros((num_prefix + len(rows),) * 2, np.float32)
  window[num_prefix:, num_prefix:] = np.exp(-d2 / (2.0 * std**2))
  return window
