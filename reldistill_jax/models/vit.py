"""The 2D teachers: one Vision Transformer for OpenAI CLIP and DINOv2 image towers.

A frozen `ViTConfig` says which tower it is; `ViT(config)` computes, for
(B, H, W, 3) normalised images, the per-patch feature map the feature store
keeps, plus the reference outputs the parity tests compare with `transformers`.

  * **CLIP** (pre-norm `ln_pre`, QuickGELU, a class token, `proj`): the pooled
    image embedding is `proj(ln_post(tokens[:, 0]))`, as `CLIPModel.
    get_image_features`. The dense features are MaskCLIP's: for every patch
    token, the last block's value path alone, `proj(ln_post(out(value(ln_1(x)))))`
    with x the input of the last block. Dropping the query-key mixing (and the
    last residual and MLP) keeps each token's own content in the text-aligned
    space, which is what makes CLIP's patch features usable for zero-shot
    segmentation.
  * **DINOv2** (LayerScale, exact GELU, optional register tokens): the dense
    features are the last block's patch tokens before the final norm (ScaLR's
    choice, `dense_output="tokens_prenorm"`) or after it (`"tokens_postnorm"`).

Position embeddings are trained on a square grid (`pos_grid`) and resampled to
the input's grid with PyTorch's bicubic interpolation, reproduced exactly here
(`torch_bicubic_weights`): `jax.image.resize` uses Keys' a = -0.5 kernel while
torch uses a = -0.75 with clamped borders, and its antialiased variant (the
one DINOv2-with-registers uses) yet another filter; the differences are far
above float32 noise. The interpolation is a pair of (static) matrices applied
to the embedding table, so it costs nothing at run time and stays jit-friendly.

Weights are imported from local files by `vit_import.py`. Images are NHWC here
(torch is NCHW); the importer transposes the patch-embedding kernel.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Pixel statistics of each family's training data (RGB, on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DENSE_OUTPUTS = ("maskclip", "tokens_prenorm", "tokens_postnorm")


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": functools.partial(nn.gelu, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of one image tower.

  Attributes:
    patch_size: p, the side of a square patch in pixels.
    width: C, the token dimension.
    layers: the number of transformer blocks.
    heads: attention heads (width must divide evenly).
    mlp_dim: hidden size of each block's MLP.
    pos_grid: (rows, cols) of patches the position embeddings were trained on.
    activation: `quick_gelu` (OpenAI CLIP) or `gelu` (exact, DINOv2).
    layer_norm_eps: epsilon of every LayerNorm (1e-5 CLIP, 1e-6 DINOv2).
    pre_norm: CLIP's `ln_pre` after the embeddings.
    layer_scale: DINOv2's per-channel LayerScale on both residual branches.
    class_token: whether a class token leads the sequence.
    num_registers: register tokens, inserted after the class token without
      position embeddings (DINOv2 with registers); 0 for none.
    proj_dim: CLIP's visual projection (D); None when the tower has none.
    patch_bias: whether the patch embedding has a bias (DINOv2 yes, CLIP no).
    qkv_bias: whether the query, key and value projections have biases.
    pos_interpolation_offset: 0 resamples position embeddings to the target
      size (`transformers`); > 0 reproduces the original DINOv2 code, which
      passes `scale_factor=(g + offset) / g0` to torch (offset 0.1).
    pos_interpolation_antialias: torch's antialiased bicubic (DINOv2 with
      registers) instead of the plain one.
    dense_output: which per-patch map `ViT` returns as its features:
      `maskclip` (needs proj_dim), `tokens_prenorm` or `tokens_postnorm`.
    pixel_mean, pixel_std: RGB statistics for `normalize_pixels`.
  """

  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  pos_grid: tuple[int, int]
  activation: str = "gelu"
  layer_norm_eps: float = 1e-6
  pre_norm: bool = False
  layer_scale: bool = False
  class_token: bool = True
  num_registers: int = 0
  proj_dim: int | None = None
  patch_bias: bool = True
  qkv_bias: bool = True
  pos_interpolation_offset: float = 0.0
  pos_interpolation_antialias: bool = False
  dense_output: str = "tokens_prenorm"
  pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
  pixel_std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")
    if self.dense_output not in DENSE_OUTPUTS:
      raise ValueError(f"unknown dense_output {self.dense_output!r}; choose from {DENSE_OUTPUTS}")
    if self.dense_output == "maskclip" and self.proj_dim is None:
      raise ValueError("dense_output='maskclip' needs a visual projection (proj_dim)")
    # Tuples keep the config hashable when built from JSON lists.
    object.__setattr__(self, "pos_grid", tuple(int(g) for g in self.pos_grid))
    object.__setattr__(self, "pixel_mean", tuple(float(m) for m in self.pixel_mean))
    object.__setattr__(self, "pixel_std", tuple(float(s) for s in self.pixel_std))

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: the class token and the registers."""
    return int(self.class_token) + self.num_registers

  @property
  def out_dim(self) -> int:
    """Channels of the dense feature map."""
    return self.proj_dim if self.dense_output == "maskclip" else self.width


def clip_config(
  width: int, layers: int, patch_size: int, pos_grid: int, proj_dim: int, **overrides
) -> ViTConfig:
  """An OpenAI CLIP image tower (heads = width // 64, MLP 4x, MaskCLIP output)."""
  kwargs = dict(
    patch_size=patch_size,
    width=width,
    layers=layers,
    heads=width // 64,
    mlp_dim=4 * width,
    pos_grid=(pos_grid, pos_grid),
    activation="quick_gelu",
    layer_norm_eps=1e-5,
    pre_norm=True,
    proj_dim=proj_dim,
    patch_bias=False,
    dense_output="maskclip",
    pixel_mean=CLIP_MEAN,
    pixel_std=CLIP_STD,
  )
  return ViTConfig(**(kwargs | overrides))


def dinov2_config(width: int, layers: int, heads: int, **overrides) -> ViTConfig:
  """A DINOv2 tower (patch 14, 37x37 position grid, LayerScale, pre-norm tokens)."""
  kwargs = dict(
    patch_size=14,
    width=width,
    layers=layers,
    heads=heads,
    mlp_dim=4 * width,
    pos_grid=(37, 37),
    layer_scale=True,
  )
  return ViTConfig(**(kwargs | overrides))


# The public checkpoints' architectures, for shape-only use (sizes, feature
# store layout); real weights come with their config from `vit_import`.
VARIANTS = {
  "clip_b16": clip_config(768, 12, 16, 14, 512),
  "clip_l14": clip_config(1024, 24, 14, 16, 768),
  "clip_l14_336": clip_config(1024, 24, 14, 24, 768),
  "dinov2_s14": dinov2_config(384, 12, 6),
  "dinov2_b14": dinov2_config(768, 12, 12),
  "dinov2_l14": dinov2_config(1024, 24, 16),
}


def grid_size(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
  """(rows, cols) of the patch grid of an (H, W) image: (H // p, W // p)."""
  return image_size[0] // patch_size, image_size[1] // patch_size


def pixel_to_cell(
  u: np.ndarray,
  v: np.ndarray,
  native_size: tuple[int, int],
  image_size: tuple[int, int],
  grid: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
  """The patch-grid cell holding a native-image pixel after a direct resize.

  The native image (e.g. a 900x1600 nuScenes camera) is resized straight to
  `image_size` (anisotropically: no crop, no padding), which the ViT cuts into
  `grid` patches. Pixel (u, v) covers [u, u + 1) x [v, v + 1); its centre is
  followed through the resize.

  Args:
    u: column(s) of the pixel in the native image (any shape, integer or float).
    v: row(s) of the pixel, same shape as u.
    native_size: (height, width) of the native image, e.g. (900, 1600).
    image_size: (height, width) the image is resized to, e.g. (224, 416); each
      side must be a whole number of patches.
    grid: (rows, cols) of the patch grid, e.g. (14, 26).

  Returns:
    (row, col) int arrays of the same shape as u: the cell of each pixel.

  Raises:
    ValueError: if image_size is not a whole number of patches of the grid.
  """
  if image_size[0] % grid[0] or image_size[1] % grid[1]:
    raise ValueError(f"image size {image_size} is not a whole number of {grid} patches")
  patch = (image_size[0] // grid[0], image_size[1] // grid[1])
  # Pixel centre in resized-image coordinates, then the patch it falls in.
  y = (np.asarray(v, np.float64) + 0.5) * image_size[0] / native_size[0]
  x = (np.asarray(u, np.float64) + 0.5) * image_size[1] / native_size[1]
  row = np.clip(np.floor(y / patch[0]).astype(np.int64), 0, grid[0] - 1)
  col = np.clip(np.floor(x / patch[1]).astype(np.int64), 0, grid[1] - 1)
  return row, col


def normalize_pixels(images: jax.Array, config: ViTConfig) -> jax.Array:
  """Maps uint8 RGB images to the tower's normalised float32 input.

  Args:
    images: (B, H, W, 3) uint8 RGB.
    config: the tower; its pixel_mean and pixel_std are used.

  Returns:
    (B, H, W, 3) float32, (x / 255 - mean) / std, NHWC as `ViT` takes it.
  """
  mean = jnp.asarray(config.pixel_mean, jnp.float32)
  std = jnp.asarray(config.pixel_std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


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


def _resample_weights(config: ViTConfig, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Row and column matrices mapping the trained position grid to `grid`."""
  weights = []
  for g0, g in zip(config.pos_grid, grid, strict=True):
    scale_factor = None
    if config.pos_interpolation_offset:
      # Original DINOv2: scale_factor = (g + offset) / g0; torch sizes the
      # output floor(g0 * scale_factor), which the offset keeps equal to g.
      scale_factor = (g + config.pos_interpolation_offset) / g0
      if math.floor(g0 * scale_factor) != g:
        raise ValueError(f"offset {config.pos_interpolation_offset} does not resize {g0} to {g}")
    weights.append(torch_bicubic_weights(g0, g, scale_factor, config.pos_interpolation_antialias))
  return weights[0], weights[1]


def resample_pos_embed(
  pos: jax.Array, config: ViTConfig, grid: tuple[int, int], square_image: bool
) -> jax.Array:
  """Position embeddings of the patch tokens for an input patch grid.

  Follows `transformers` (and the original code): the table is used as is
  when the grid is the trained one and the image is square, and resampled
  with torch's bicubic interpolation otherwise.

  Args:
    pos: (g0h * g0w, C) position embeddings of the trained grid, row-major.
    config: the tower (pos_grid and the interpolation options).
    grid: (gh, gw) patch grid of the input.
    square_image: whether the input image has H == W in pixels.

  Returns:
    (gh * gw, C) position embeddings, row-major.
  """
  if tuple(grid) == config.pos_grid and square_image:
    return pos
  w_rows, w_cols = _resample_weights(config, grid)
  table = pos.reshape(*config.pos_grid, -1).astype(jnp.float32)  # (g0h, g0w, C)
  out = jnp.einsum(
    "ih,jw,hwc->ijc", w_rows, w_cols, table, precision=jax.lax.Precision.HIGHEST
  )  # (gh, gw, C)
  return out.reshape(grid[0] * grid[1], -1).astype(pos.dtype)


def _layer_norm(config: ViTConfig, dtype: Any, name: str | None = None) -> nn.LayerNorm:
  # Two-pass variance, as torch: CLIP's residual stream has a few channels in
  # the hundreds, where E[x^2] - E[x]^2 loses float32 precision.
  return nn.LayerNorm(
    epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name
  )


class Block(nn.Module):
  """Pre-norm transformer block: x += ls_1 * Attn(ln_1(x)); x += ls_2 * MLP(ln_2(x))."""

  config: ViTConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    self.ln_1 = _layer_norm(cfg, self.dtype)
    self.query = dense(cfg.width, use_bias=cfg.qkv_bias)
    self.key = dense(cfg.width, use_bias=cfg.qkv_bias)
    self.value = dense(cfg.width, use_bias=cfg.qkv_bias)
    self.out = dense(cfg.width)
    self.ln_2 = _layer_norm(cfg, self.dtype)
    self.mlp_fc = dense(cfg.mlp_dim)
    self.mlp_proj = dense(cfg.width)
    if cfg.layer_scale:
      self.ls_1 = self.param("ls_1", nn.initializers.ones, (cfg.width,), jnp.float32)
      self.ls_2 = self.param("ls_2", nn.initializers.ones, (cfg.width,), jnp.float32)

  def _scale(self, y: jax.Array, gamma_name: str) -> jax.Array:
    if not self.config.layer_scale:
      return y
    return y * getattr(self, gamma_name).astype(y.dtype)

  def value_path(self, x: jax.Array) -> jax.Array:
    """out(value(ln_1(x))): the attention branch with each token seeing only itself.

    Args:
      x: (B, T, C) block input.

    Returns:
      (B, T, C), without LayerScale or residual (MaskCLIP's dense path).
    """
    return self.out(self.value(self.ln_1(x)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, C) -> (B, T, C)."""
    b, t, c = x.shape
    heads = self.config.heads
    h = self.ln_1(x)
    split = lambda y: y.reshape(b, t, heads, c // heads)
    attn = jax.nn.dot_product_attention(
      split(self.query(h)), split(self.key(h)), split(self.value(h))
    )  # (B, T, heads, C // heads)
    x = x + self._scale(self.out(attn.reshape(b, t, c)), "ls_1")
    act = ACTIVATIONS[self.config.activation]
    y = self.mlp_proj(act(self.mlp_fc(self.ln_2(x))))
    return x + self._scale(y, "ls_2")


class ViT(nn.Module):
  """A CLIP or DINOv2 image tower.

  Attributes:
    config: the architecture (see `ViTConfig`).
    dtype: compute dtype (parameters stay float32), e.g. jnp.bfloat16.
  """

  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the tower.

    Args:
      images: (B, H, W, 3) normalised pixels (`normalize_pixels`); H and W
        need not be equal nor multiples of the patch (the remainder is
        dropped, as a strided convolution does).

    Returns:
      (features, aux): features (B, h, w, out_dim) the dense map chosen by
      `config.dense_output`, with (h, w) = (H // p, W // p). aux holds
        `tokens`: (B, T, C) output of the last block before the final norm
          (`hidden_states[-1]` of `transformers`), T = prefix tokens + h * w;
        `tokens_normed`: (B, T, C) the same after the final norm (DINOv2's
          `last_hidden_state`);
        `pooled`: (B, C) the normed class token (`pooler_output`), with a
          class token;
        `image_embeds`: (B, D) `proj(pooled)` (`CLIPModel.get_image_features`),
          with a projection;
        `maskclip`: (B, h, w, D) MaskCLIP dense features, with a projection.
    """
    cfg = self.config
    b, height, width, _ = images.shape
    grid = grid_size((height, width), cfg.patch_size)
    p = cfg.patch_size
    x = nn.Conv(
      cfg.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=cfg.patch_bias,
      dtype=self.dtype,
      name="patch_embed",
    )(images)  # (B, h, w, C)
    x = x.reshape(b, grid[0] * grid[1], cfg.width)

    num_pos = cfg.pos_grid[0] * cfg.pos_grid[1] + int(cfg.class_token)
    init = nn.initializers.normal(0.02)
    pos = self.param("pos_embed", init, (num_pos, cfg.width), jnp.float32)
    patch_pos = resample_pos_embed(pos[int(cfg.class_token) :], cfg, grid, height == width)
    x = x + patch_pos.astype(self.dtype)
    prefix = []
    if cfg.class_token:
      cls = self.param("cls_token", init, (cfg.width,), jnp.float32)
      prefix.append(jnp.broadcast_to((cls + pos[0]).astype(self.dtype), (b, 1, cfg.width)))
    if cfg.num_registers:
      registers = self.param("register_tokens", init, (cfg.num_registers, cfg.width), jnp.float32)
      prefix.append(jnp.broadcast_to(registers.astype(self.dtype), (b, *registers.shape)))
    x = jnp.concatenate([*prefix, x], axis=1)  # (B, T, C)
    if cfg.pre_norm:
      x = _layer_norm(cfg, self.dtype, "ln_pre")(x)

    blocks = [Block(cfg, self.dtype, name=f"block{i}") for i in range(cfg.layers)]
    for block in blocks[:-1]:
      x = block(x)
    last_input = x
    x = blocks[-1](x)

    ln_post = _layer_norm(cfg, self.dtype, "ln_post")
    aux = {"tokens": x, "tokens_normed": ln_post(x)}
    if cfg.class_token:
      aux["pooled"] = aux["tokens_normed"][:, 0]
    if cfg.proj_dim is not None:
      proj = nn.Dense(cfg.proj_dim, use_bias=False, dtype=self.dtype, name="proj")
      if cfg.class_token:
        aux["image_embeds"] = proj(aux["pooled"])
      values = blocks[-1].value_path(last_input[:, cfg.num_prefix_tokens :])
      aux["maskclip"] = proj(ln_post(values)).reshape(b, *grid, cfg.proj_dim)
    if cfg.dense_output == "maskclip":
      features = aux["maskclip"]
    else:
      key = "tokens" if cfg.dense_output == "tokens_prenorm" else "tokens_normed"
      features = aux[key][:, cfg.num_prefix_tokens :].reshape(b, *grid, cfg.width)
    return features, aux


def param_count(config: ViTConfig) -> int:
  """Number of parameters of a tower (shape-only, no allocation)."""
  p = config.patch_size
  images = jax.ShapeDtypeStruct((1, config.pos_grid[0] * p, config.pos_grid[1] * p, 3), jnp.float32)
  shapes = jax.eval_shape(ViT(config).init, jax.random.key(0), images)
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


if __name__ == "__main__":
  for name, cfg in VARIANTS.items():
    print(f"{name:13s} {param_count(cfg) / 1e6:8.2f}M parameters, {cfg.out_dim}-d dense features")
