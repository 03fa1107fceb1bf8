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

Position embeddings are resampled, and RoPE and NACLIP's window computed, by
`positions.py`.

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

from reldistill_jax.models import positions

# Pixel statistics of each family's training data (RGB, on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Dense rules of text-aligned towers (CLIP, SigLIP): the last block changed
# so that patch features stay in the image-text space (module docstring).
TEXT_DENSE = ("maskclip", "sclip", "clearclip", "naclip")
DENSE_OUTPUTS = (*TEXT_DENSE, "tokens_prenorm", "tokens_postnorm")


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names.
ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": functools.partial(nn.gelu, approximate=False),
  "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
  "silu": nn.silu,
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
    head: `"map"` for SigLIP's attention-pooling head (a learned probe
      attends over the normed tokens, then a residual MLP); None otherwise.
    patch_bias: whether the patch embedding has a bias (DINOv2 yes, CLIP no).
    qkv_bias: whether the query, key and value projections have biases: one
      bool for all three or a (query, key, value) triple (DINOv3: no key bias).
    out_bias: whether the attention output projection has a bias.
    mlp_bias: whether the MLP layers have biases.
    gated_mlp: a gated MLP, proj(act(gate(x)) * fc(x)) (DINOv3's SwiGLU sizes).
    rope_theta: RoPE base (DINOv3): the patch tokens' queries and keys are
      rotated by their centre coordinates (normalised to [-1, 1] per axis), and
      there is no position-embedding table; None for learned embeddings.
    pos_interpolation_offset: 0 resamples position embeddings to the target
      size (`transformers`); > 0 reproduces the original DINOv2 code, which
      passes `scale_factor=(g + offset) / g0` to torch (offset 0.1).
    pos_interpolation_antialias: torch's antialiased bicubic (DINOv2 with
      registers) instead of the plain one.
    dense_output: which per-patch map `ViT` returns as its features: a
      `TEXT_DENSE` rule (needs proj_dim or the SigLIP head), `tokens_prenorm`
      or `tokens_postnorm`.
    naclip_std: standard deviation, in patches, of NACLIP's Gaussian window.
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
  head: str | None = None
  patch_bias: bool = True
  qkv_bias: bool | tuple[bool, bool, bool] = True
  out_bias: bool = True
  mlp_bias: bool = True
  gated_mlp: bool = False
  rope_theta: float | None = None
  pos_interpolation_offset: float = 0.0
  pos_interpolation_antialias: bool = False
  dense_output: str = "tokens_prenorm"
  naclip_std: float = 5.0
  pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
  pixel_std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")
    if self.dense_output not in DENSE_OUTPUTS:
      raise ValueError(f"unknown dense_output {self.dense_output!r}; choose from {DENSE_OUTPUTS}")
    if self.head not in (None, "map"):
      raise ValueError(f"unknown head {self.head!r}; choose 'map' or None")
    if self.dense_output in TEXT_DENSE and not self.text_aligned:
      raise ValueError(
        f"dense_output={self.dense_output!r} needs an image-text tower (a projection or a "
        "SigLIP head); use tokens_prenorm or tokens_postnorm"
      )
    bias = self.qkv_bias
    bias = (bias,) * 3 if isinstance(bias, bool) else tuple(bool(b) for b in bias)
    if len(bias) != 3:
      raise ValueError(f"qkv_bias must be one bool or three, got {self.qkv_bias!r}")
    object.__setattr__(self, "qkv_bias", bias)
    # Tuples keep the config hashable when built from JSON lists.
    object.__setattr__(self, "pos_grid", tuple(int(g) for g in self.pos_grid))
    object.__setattr__(self, "pixel_mean", tuple(float(m) for m in self.pixel_mean))
    object.__setattr__(self, "pixel_std", tuple(float(s) for s in self.pixel_std))

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: the class token and the registers."""
    return int(self.class_token) + self.num_registers

  @property
  def text_aligned(self) -> bool:
    """Whether the tower maps images into an image-text space (CLIP, SigLIP)."""
    return self.proj_dim is not None or self.head == "map"

  @property
  def out_dim(self) -> int:
    """Channels of the dense feature map."""
    if self.dense_output in TEXT_DENSE and self.proj_dim is not None:
      return self.proj_dim
    return self.width


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


def siglip_config(
  width: int, layers: int, heads: int, mlp_dim: int, patch_size: int, pos_grid: int, **overrides
) -> ViTConfig:
  """A SigLIP / SigLIP 2 image tower (no class token, tanh GELU, the pooling head)."""
  kwargs = dict(
    patch_size=patch_size,
    width=width,
    layers=layers,
    heads=heads,
    mlp_dim=mlp_dim,
    pos_grid=(pos_grid, pos_grid),
    activation="gelu_pytorch_tanh",
    class_token=False,
    head="map",
    dense_output="maskclip",
    pixel_mean=SIGLIP_MEAN,
    pixel_std=SIGLIP_STD,
  )
  return ViTConfig(**(kwargs | overrides))


def dinov3_config(width: int, layers: int, heads: int, **overrides) -> ViTConfig:
  """A DINOv3 tower (patch 16, RoPE, 4 registers, LayerScale, no key bias, normed tokens)."""
  kwargs = dict(
    patch_size=16,
    width=width,
    layers=layers,
    heads=heads,
    mlp_dim=4 * width,
    pos_grid=(14, 14),
    layer_norm_eps=1e-5,
    layer_scale=True,
    num_registers=4,
    qkv_bias=(True, False, True),
    rope_theta=100.0,
    dense_output="tokens_postnorm",
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
  "siglip2_b16": siglip_config(768, 12, 12, 3072, 16, 14),
  "siglip2_l16": siglip_config(1024, 24, 16, 4096, 16, 16),
  "siglip2_so400m14": siglip_config(1152, 27, 16, 4304, 14, 16),
  "siglip2_so400m16": siglip_config(1152, 27, 16, 4304, 16, 16),
  "siglip2_g16": siglip_config(1536, 40, 16, 6144, 16, 16),
  "dinov3_s16": dinov3_config(384, 12, 6),
  "dinov3_b16": dinov3_config(768, 12, 12),
  "dinov3_l16": dinov3_config(1024, 24, 16),
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
    weights.append(
      positions.torch_bicubic_weights(g0, g, scale_factor, config.pos_interpolation_antialias)
    )
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
    self.query, self.key, self.value = (dense(cfg.width, use_bias=b) for b in cfg.qkv_bias)
    self.out = dense(cfg.width, use_bias=cfg.out_bias)
    self.ln_2 = _layer_norm(cfg, self.dtype)
    self.mlp_fc = dense(cfg.mlp_dim, use_bias=cfg.mlp_bias)
    if cfg.gated_mlp:
      self.mlp_gate = dense(cfg.mlp_dim, use_bias=cfg.mlp_bias)
    self.mlp_proj = dense(cfg.width, use_bias=cfg.mlp_bias)
    if cfg.layer_scale:
      self.ls_1 = self.param("ls_1", nn.initializers.ones, (cfg.width,), jnp.float32)
      self.ls_2 = self.param("ls_2", nn.initializers.ones, (cfg.width,), jnp.float32)

  def _scale(self, y: jax.Array, gamma_name: str) -> jax.Array:
    if not self.config.layer_scale:
      return y
    return y * getattr(self, gamma_name).astype(y.dtype)

  def _heads(self, x: jax.Array, rope) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v), each (B, T, heads, head_dim), of the normed input; RoPE on q and k."""
    b, t, c = x.shape
    h = self.ln_1(x)
    split = lambda y: y.reshape(b, t, self.config.heads, c // self.config.heads)
    q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
    if rope is not None:
      q, k = positions.apply_rope(q, rope), positions.apply_rope(k, rope)
    return q, k, v

  def _mlp(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.config.activation]
    if self.config.gated_mlp:
      return self.mlp_proj(act(self.mlp_gate(x)) * self.mlp_fc(x))
    return self.mlp_proj(act(self.mlp_fc(x)))

  def __call__(self, x: jax.Array, rope=None) -> jax.Array:
    """(B, T, C) -> (B, T, C); rope: `rope_tables` of the grid, or None."""
    q, k, v = self._heads(x, rope)
    attn = jax.nn.dot_product_attention(q, k, v)  # (B, T, heads, C // heads)
    x = x + self._scale(self.out(attn.reshape(x.shape)), "ls_1")
    return x + self._scale(self._mlp(self.ln_2(x)), "ls_2")

  def dense(self, x: jax.Array, rule: str, window=None, rope=None) -> jax.Array:
    """The block as a `TEXT_DENSE` rule changes it (module docstring).

    Args:
      x: (B, T, C) block input.
      rule: maskclip, sclip, clearclip or naclip.
      window: NACLIP's (T, T) `naclip_window`.
      rope: as `__call__`.

    Returns:
      (B, T, C) for every token.
    """
    q, k, v = self._heads(x, rope)
    if rule == "maskclip":
      return self.out(v.reshape(x.shape))
    scale = q.shape[-1] ** -0.5
    similarity = lambda a, b: jnp.einsum("bqhd,bkhd->bhqk", a, b) * scale
    if rule == "sclip":
      attn = jax.nn.softmax(similarity(q, q), -1) + jax.nn.softmax(similarity(k, k), -1)
    elif rule == "clearclip":
      attn = jax.nn.softmax(similarity(q, q), -1)
    elif rule == "naclip":
      attn = jax.nn.softmax(similarity(k, k) + jnp.asarray(window, k.dtype), -1)
    else:
      raise ValueError(f"unknown dense rule {rule!r}; choose from {TEXT_DENSE}")
    y = self.out(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(x.shape))
    if rule != "sclip":
      return y  # ClearCLIP and NACLIP drop the residual and the MLP
    y = x + self._scale(y, "ls_1")
    return y + self._scale(self._mlp(self.ln_2(y)), "ls_2")


class MapHead(nn.Module):
  """SigLIP's attention-pooling head: a probe attends over the tokens, then a residual MLP."""

  config: ViTConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    dense = functools.partial(nn.Dense, cfg.width, dtype=self.dtype)
    self.probe = self.param("probe", nn.initializers.normal(0.02), (cfg.width,), jnp.float32)
    self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()
    self.ln = _layer_norm(cfg, self.dtype)
    self.mlp_fc = nn.Dense(cfg.mlp_dim, dtype=self.dtype)
    self.mlp_proj = dense()

  def _residual_mlp(self, u: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.config.activation]
    return u + self.mlp_proj(act(self.mlp_fc(self.ln(u))))

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, C) normed tokens -> (B, C), `pooler_output` of transformers."""
    b, t, c = x.shape
    heads = self.config.heads
    query = self.query(self.probe.astype(self.dtype)).reshape(1, 1, heads, c // heads)
    split = lambda y: y.reshape(b, t, heads, c // heads)
    attn = jax.nn.dot_product_attention(
      jnp.broadcast_to(query, (b, 1, heads, c // heads)), split(self.key(x)), split(self.value(x))
    )
    return self._residual_mlp(self.out(attn.reshape(b, c)))

  def value_path(self, x: jax.Array) -> jax.Array:
    """(..., C) -> (..., C): the head with each token attending only to itself."""
    return self._residual_mlp(self.out(self.value(x)))


class ViT(nn.Module):
  """A CLIP, SigLIP, DINOv2 or DINOv3 image tower.

  Attributes:
    config: the architecture (see `ViTConfig`).
    dtype: compute dtype (parameters stay float32), e.g. jnp.bfloat16.
  """

  config: ViTConfig
  dtype: Any = jnp.float32

  def _embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """(B, T, C) tokens (prefix, then row-major patches) and the patch grid."""
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
    init = nn.initializers.normal(0.02)
    cls_pos = 0.0
    if cfg.rope_theta is None:
      num_pos = cfg.pos_grid[0] * cfg.pos_grid[1] + int(cfg.class_token)
      pos = self.param("pos_embed", init, (num_pos, cfg.width), jnp.float32)
      patch_pos = resample_pos_embed(pos[int(cfg.class_token) :], cfg, grid, height == width)
      x = x + patch_pos.astype(self.dtype)
      cls_pos = pos[0]
    prefix = []
    if cfg.class_token:
      cls = self.param("cls_token", init, (cfg.width,), jnp.float32)
      prefix.append(jnp.broadcast_to((cls + cls_pos).astype(self.dtype), (b, 1, cfg.width)))
    if cfg.num_registers:
      registers = self.param("register_tokens", init, (cfg.num_registers, cfg.width), jnp.float32)
      prefix.append(jnp.broadcast_to(registers.astype(self.dtype), (b, *registers.shape)))
    x = jnp.concatenate([*prefix, x], axis=1)  # (B, T, C)
    if cfg.pre_norm:
      x = _layer_norm(cfg, self.dtype, "ln_pre")(x)
    return x, grid

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
        `tokens_normed`: (B, T, C) the same after the final norm
          (`last_hidden_state`);
        `pooled`: (B, C) the normed class token, or SigLIP's head output
          (`pooler_output`), when the tower has either;
        `image_embeds`: (B, D) the image embedding of an image-text tower
          (`get_image_features`): `proj(pooled)` for CLIP, `pooled` for SigLIP.
    """
    cfg = self.config
    x, grid = self._embed(images)
    rope = None
    if cfg.rope_theta is not None:
      rope = positions.rope_tables(grid, cfg.width // cfg.heads, cfg.rope_theta)
    blocks = [Block(cfg, self.dtype, name=f"block{i}") for i in range(cfg.layers)]
    for block in blocks[:-1]:
      x = block(x, rope)
    last_input = x
    x = blocks[-1](x, rope)

    ln_post = _layer_norm(cfg, self.dtype, "ln_post")
    aux = {"tokens": x, "tokens_normed": ln_post(x)}
    to_text_space = None
    if cfg.head == "map":
      head = MapHead(cfg, self.dtype, name="head")
      aux["pooled"] = aux["image_embeds"] = head(aux["tokens_normed"])
      to_text_space = head.value_path
    elif cfg.class_token:
      aux["pooled"] = aux["tokens_normed"][:, 0]
    if cfg.proj_dim is not None:
      to_text_space = nn.Dense(cfg.proj_dim, use_bias=False, dtype=self.dtype, name="proj")
      if cfg.class_token:
        aux["image_embeds"] = to_text_space(aux["pooled"])

    prefix = cfg.num_prefix_tokens
    if cfg.dense_output in TEXT_DENSE:
      window = None
      if cfg.dense_output == "naclip":
        window = positions.naclip_window(grid, prefix, cfg.naclip_std)
      y = blocks[-1].dense(last_input, cfg.dense_output, window, rope)[:, prefix:]
      features = to_text_space(ln_post(y))
    else:
      key = "tokens" if cfg.dense_output == "tokens_prenorm" else "tokens_normed"
      features = aux[key][:, prefix:]
    return features.reshape(x.shape[0], *grid, features.shape[-1]), aux


def param_count(config: ViTConfig) -> int:
  """Number of parameters of a tower (shape-only, no allocation)."""
  p = config.patch_size
  images = jax.ShapeDtypeStruct((1, config.pos_grid[0] * p, config.pos_grid[1] * p, 3), jnp.float32)
  shapes = jax.eval_shape(ViT(config).init, jax.random.key(0), images)
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


if __name__ == "__main__":
  for name, cfg in VARIANTS.items():
    print(f"{name:17s} {param_count(cfg) / 1e6:8.2f}M parameters, {cfg.out_dim}-d dense features")
