"""The CLIP and SigLIP text towers in JAX: transformer and checkpoint import.

Transformer. Token + learned position embeddings, pre-LN self-attention
blocks, a final LayerNorm, one pooled position and a linear projection; the
two families differ in three settings of `TextConfig`:
  * CLIP (`CLIPModel.get_text_features` of transformers, `encode_text` of
    OpenAI/open_clip, before any normalisation): causal attention, pooled at
    the end-of-text token, projection without bias. The end-of-text position
    is the first position holding `eos_token_id` when the transformers config
    names one other than 2, else the argmax of the ids (the end token has the
    largest id); open_clip always takes the argmax.
  * SigLIP and SigLIP 2 (`SiglipModel` / `Siglip2Model.get_text_features`,
    models/siglip/modeling_siglip.py `SiglipTextModel.forward`): attention
    over all positions, without a mask (called with `input_ids` only, as the
    SigLIP 2 processor returns them, transformers builds no mask, so padding
    is attended), pooled at the last position (`last_hidden_state[:, -1]`,
    a pad token for short texts), and the `head` projection with a bias.
    Rows must therefore be padded to the context length, as the tokenizer
    does.

Checkpoints. `load_clip_text(path)` reads a transformers folder
(`config.json` + `model.safetensors`, `text_model.*`; CLIP's
`text_projection.weight`, or SigLIP's `text_model.head`, for model_type
`siglip` (`SiglipModel`, also the layout of the fixed-resolution SigLIP 2
checkpoints) and `siglip2` (`Siglip2Model`, NaFlex)) or an open_clip
`.safetensors` file (or a folder holding one), whose sizes are read from the
tensor shapes. Tokenizers: `clip_tokenizer` for CLIP, `siglip_tokenizer`
(the folder's `tokenizer.json`) for SigLIP.
"""

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reldistill_jax.models import checkpoints, clip_tokenizer, siglip_tokenizer
from reldistill_jax.models.checkpoints import CheckpointError

# --------------------------------------------------------------- transformer


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x), the activation of OpenAI's CLIP."""
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names of the activations CLIP and SigLIP checkpoints use.
ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Sizes and settings of a CLIP or SigLIP text tower (defaults: CLIP ViT-B).

  Attributes:
    vocab_size: V, rows of the token embedding.
    width: W, the residual width.
    layers: number of transformer blocks.
    heads: attention heads (W divisible by it).
    mlp_dim: hidden width of the MLPs.
    context_length: L, rows of the position embedding.
    embed_dim: D, the projected output dimension.
    hidden_act: an `ACTIVATIONS` name.
    layer_norm_eps: epsilon of every LayerNorm.
    eos_token_id: with pool "eos", pool at the first position holding this
      id; None to pool at the argmax of the ids (OpenAI, open_clip,
      transformers with id 2).
    causal: causal attention (CLIP) or attention over every position (SigLIP).
    pool: "eos", the end-of-text position (CLIP), or "last", the last
      position of the row (SigLIP).
    projection_bias: whether the projection adds a bias (SigLIP's `head`).
  """

  vocab_size: int = 49408
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  context_length: int = 77
  embed_dim: int = 512
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int | None = None
  causal: bool = True
  pool: str = "eos"
  projection_bias: bool = False


POOLS = ("eos", "last")


class SelfAttention(nn.Module):
  """Multi-head self-attention (causal or not) with separate q, k, v projections."""

  width: int
  heads: int
  dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, _ = x.shape  # x: (B, L, W)
    head_dim = self.width // self.heads
    dense = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)
    q, k, v = (
      dense(n)(x).reshape(b, length, self.heads, head_dim) for n in ("query", "key", "value")
    )
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # (B, L, heads, head_dim)
    return dense("out")(out.reshape(b, length, self.width))


class Block(nn.Module):
  """Pre-LN residual block: x += Attn(LN(x)); x += MLP(LN(x))."""

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    norm = lambda name: nn.LayerNorm(
      cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name=name
    )
    attn = SelfAttention(cfg.width, cfg.heads, self.dtype, cfg.causal, name="attn")
    x = x + attn(norm("ln_1")(x))
    h = nn.Dense(cfg.mlp_dim, dtype=self.dtype, name="mlp_fc")(norm("ln_2")(x))
    h = ACTIVATIONS[cfg.hidden_act](h)
    return x + nn.Dense(cfg.width, dtype=self.dtype, name="mlp_proj")(h)


def pool_index(ids: jax.Array, config: TextConfig) -> jax.Array:
  """(B,) position pooled in each row of ids (B, L), as transformers picks it."""
  if config.pool == "last":
    return jnp.full(ids.shape[:1], ids.shape[-1] - 1)
  if config.eos_token_id is None:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax(ids == config.eos_token_id, axis=-1)


class TextTransformer(nn.Module):
  """The CLIP / SigLIP text tower: ids -> projected text features.

  Attributes:
    config: the tower's sizes.
    dtype: compute dtype (parameters stay float32).
  """

  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encodes token rows.

    Args:
      ids: (B, L') int token ids, L' <= context_length; with pool "eos" one
        end token per row, with pool "last" rows padded to the context
        length as the model was trained.

    Returns:
      (features, aux): features (B, embed_dim) float32, projected, not
      normalised; aux {"tokens": (B, L', W) after the final LayerNorm,
      "pooled": (B, W) the pooled features before the projection}.
    """
    cfg = self.config
    if ids.shape[-1] > cfg.context_length:
      raise ValueError(f"{ids.shape[-1]} tokens exceed the context length {cfg.context_length}")
    if cfg.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unknown activation {cfg.hidden_act!r}; choose from {sorted(ACTIVATIONS)}")
    if cfg.pool not in POOLS:
      raise ValueError(f"unknown pool {cfg.pool!r}; choose from {POOLS}")
    x = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding")(ids)  # (B, L', W)
    pos = self.param(
      "position_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width)
    )
    x = (x + pos[: ids.shape[-1]]).astype(self.dtype)
    for i in range(cfg.layers):
      x = Block(cfg, self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(
      cfg.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name="ln_final"
    )(x)
    pooled = x[jnp.arange(x.shape[0]), pool_index(ids, cfg)]  # (B, W)
    projection = self.param(
      "text_projection", nn.initializers.normal(cfg.width**-0.5), (cfg.width, cfg.embed_dim)
    )
    features = jnp.dot(pooled, projection.astype(self.dtype))
    if cfg.projection_bias:
      bias = self.param("text_projection_bias", nn.initializers.zeros, (cfg.embed_dim,))
      features = features + bias.astype(self.dtype)
    return features.astype(jnp.float32), {"tokens": x, "pooled": pooled}


@functools.cache
def _encode_fn(config: TextConfig):
  model = TextTransformer(config)
  return jax.jit(lambda params, ids: model.apply(params, ids)[0])


def encode_text(
  params: Any,
  config: TextConfig,
  tokenizer: clip_tokenizer.Tokenizer | siglip_tokenizer.Tokenizer,
  texts: Sequence[str],
  batch_size: int = 256,
) -> np.ndarray:
  """Projected text features of texts, as `get_text_features` of transformers.

  Runs in float32 with full-precision matmuls, in batches of a fixed size (the
  last one padded) so one compilation serves every call.

  Args:
    params: the tower's variables ({"params": ...}).
    config: its sizes.
    tokenizer: its tokenizer.
    texts: T texts.
    batch_size: rows per device call.

  Returns:
    (T, embed_dim) float32, not normalised.
  """
  ids = tokenizer(list(texts), config.context_length)  # (T, L)
  if len(ids) == 0:
    return np.zeros((0, config.embed_dim), np.float32)
  batch_size = min(batch_size, len(ids))
  pad = -len(ids) % batch_size
  ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
  fn = _encode_fn(config)
  params = jax.device_put(params)  # once, not per batch
  with jax.default_matmul_precision("float32"):
    out = [np.asarray(fn(params, ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)]
  return np.concatenate(out)[: len(ids) - pad]


# --------------------------------------------------------------- checkpoints


# Our attention Dense names and transformers' projection names.
_QKVO = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out"))


def _variables(blocks: list[dict], **top) -> dict:
  return {"params": {**top, **{f"block{i}": b for i, b in enumerate(blocks)}}}


def _dense(kernel: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
  return {"kernel": kernel, "bias": bias}


def _norm(scale: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
  return {"scale": scale, "bias": bias}


def _read_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """`model.safetensors`, or the shards a `model.safetensors.index.json` lists."""
  index = folder / "model.safetensors.index.json"
  if index.is_file() and not (folder / "model.safetensors").is_file():
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
      tensors |= checkpoints.read_safetensors(folder / shard)
    return tensors
  return checkpoints.read_safetensors(folder / "model.safetensors")


# transformers model_type -> text tower family; SigLIP's text towers are read
# from the full models, whose config.json nests a text_config.
_FAMILIES = {"clip": "clip", None: "clip", "siglip": "siglip", "siglip2": "siglip"}


def _text_settings(folder: pathlib.Path, raw: dict) -> tuple[str, dict]:
  """(family, text config dict) of a transformers config.json."""
  model_type = raw.get("model_type")
  if model_type == "clip_text_model":
    return "clip", raw
  if isinstance(raw.get("text_config"), dict) and model_type in _FAMILIES:
    return _FAMILIES[model_type], raw["text_config"]
  raise CheckpointError(
    f"{folder}: expected a CLIP or SigLIP checkpoint (config.json with model_type 'clip', "
    f"'siglip' or 'siglip2' and a text_config), found model_type {model_type!r}, "
    f"architectures {raw.get('architectures')}"
  )


def _config(folder: pathlib.Path, raw: dict) -> TextConfig:
  """The TextConfig of a transformers config.json (missing keys: transformers' defaults)."""
  family, text = _text_settings(folder, raw)
  if family == "siglip":  # SiglipTextConfig / Siglip2TextConfig defaults
    width = text.get("hidden_size", 768)
    return TextConfig(
      vocab_size=text.get("vocab_size", 32000),
      width=width,
      layers=text.get("num_hidden_layers", 12),
      heads=text.get("num_attention_heads", 12),
      mlp_dim=text.get("intermediate_size", 3072),
      context_length=text.get("max_position_embeddings", 64),
      embed_dim=text.get("projection_size") or width,
      hidden_act=text.get("hidden_act", "gelu_pytorch_tanh"),
      layer_norm_eps=text.get("layer_norm_eps", 1e-6),
      causal=False,
      pool="last",
      projection_bias=True,
    )
  eos = text.get("eos_token_id", 49407)
  if not isinstance(eos, int):
    raise CheckpointError(f"{folder}: eos_token_id {eos!r} is not a single id")
  return TextConfig(
    vocab_size=text.get("vocab_size", 49408),
    width=text.get("hidden_size", 512),
    layers=text.get("num_hidden_layers", 12),
    heads=text.get("num_attention_heads", 8),
    mlp_dim=text.get("intermediate_size", 2048),
    context_length=text.get("max_position_embeddings", 77),
    embed_dim=raw.get("projection_dim", 512),
    hidden_act=text.get("hidden_act", "quick_gelu"),
    layer_norm_eps=text.get("layer_norm_eps", 1e-5),
    eos_token_id=None if eos == 2 else eos,
  )


def from_transformers(folder: str | pathlib.Path) -> tuple[TextConfig, dict]:
  """Text tower of a transformers CLIP or SigLIP folder.

  Reads `CLIPModel` / `CLIPTextModelWithProjection` (projection
  `text_projection.weight`) and `SiglipModel` / `Siglip2Model` (projection
  `text_model.head`, with bias) folders.

  Returns:
    (config, params) with params {"params": ...} for `TextTransformer.apply`.

  Raises:
    CheckpointError: missing files, another architecture, or shape mismatches.
  """
  folder = pathlib.Path(folder)
  config = _config(folder, checkpoints.read_config(folder))
  if config.hidden_act not in ACTIVATIONS:
    raise CheckpointError(f"{folder}: unsupported hidden_act {config.hidden_act!r}")
  tensors = _read_weights(folder)
  source = str(folder / "model.safetensors")
  w, m = config.width, config.mlp_dim
  get = lambda name, shape: checkpoints.take(tensors, name, shape, source)
  linear = lambda name, n_in, n_out: _dense(
    get(f"{name}.weight", (n_out, n_in)).T, get(f"{name}.bias", (n_out,))
  )
  layer_norm = lambda name: _norm(get(f"{name}.weight", (w,)), get(f"{name}.bias", (w,)))
  blocks = []
  for i in range(config.layers):
    p = f"text_model.encoder.layers.{i}"
    attn = {n: linear(f"{p}.self_attn.{t}_proj", w, w) for n, t in _QKVO}
    blocks.append(
      {
        "ln_1": layer_norm(f"{p}.layer_norm1"),
        "attn": attn,
        "ln_2": layer_norm(f"{p}.layer_norm2"),
        "mlp_fc": linear(f"{p}.mlp.fc1", w, m),
        "mlp_proj": linear(f"{p}.mlp.fc2", m, w),
      }
    )
  if f"text_model.encoder.layers.{config.layers}.layer_norm1.weight" in tensors:
    raise CheckpointError(f"{source}: more text layers than num_hidden_layers={config.layers}")
  params = _variables(
    blocks,
    token_embedding={
      "embedding": get("text_model.embeddings.token_embedding.weight", (config.vocab_size, w))
    },
    position_embedding=get(
      "text_model.embeddings.position_embedding.weight", (config.context_length, w)
    ),
    ln_final=layer_norm("text_model.final_layer_norm"),
  )
  top = params["params"]
  if config.projection_bias:  # SigLIP's head
    top["text_projection"] = get("text_model.head.weight", (config.embed_dim, w)).T
    top["text_projection_bias"] = get("text_model.head.bias", (config.embed_dim,))
  else:
    top["text_projection"] = get("text_projection.weight", (config.embed_dim, w)).T
  return config, params


_OPEN_CLIP_BLOCK_KEYS = {
  "ln_1.weight",
  "ln_1.bias",
  "attn.in_proj_weight",
  "attn.in_proj_bias",
  "attn.out_proj.weight",
  "attn.out_proj.bias",
  "ln_2.weight",
  "ln_2.bias",
  "mlp.c_fc.weight",
  "mlp.c_fc.bias",
  "mlp.c_proj.weight",
  "mlp.c_proj.bias",
}


def _open_clip_settings(path: pathlib.Path) -> dict:
  """`model_cfg` of an `open_clip_config.json` beside the weights, if any."""
  cfg = path.parent / "open_clip_config.json"
  if not cfg.is_file():
    return {}
  return json.loads(cfg.read_text()).get("model_cfg", {})


def from_open_clip(
  path: str | pathlib.Path, hidden_act: str | None = None, heads: int | None = None
) -> tuple[TextConfig, dict]:
  """Text tower of an open_clip (or OpenAI) `CLIP` state dict in safetensors.

  Sizes come from the shapes. The two settings shapes do not fix come from an
  `open_clip_config.json` beside the file if present (`quick_gelu`,
  `text_cfg.heads`), else from the arguments, else OpenAI's (quick_gelu,
  64 channels per head).

  Args:
    path: the `.safetensors` file.
    hidden_act: overrides the activation (an `ACTIVATIONS` name).
    heads: overrides the number of attention heads.

  Returns:
    (config, params) with params {"params": ...} for `TextTransformer.apply`.

  Raises:
    CheckpointError: missing file, another architecture, or shape mismatches.
  """
  path = pathlib.Path(path)
  tensors = checkpoints.read_safetensors(path)
  prefix = "text." if "text.token_embedding.weight" in tensors else ""
  if prefix + "token_embedding.weight" not in tensors:
    found = sorted({k.split(".")[0] for k in tensors})
    raise CheckpointError(
      f"{path}: not an open_clip CLIP text tower (no token_embedding.weight); "
      f"top-level names found: {found[:12]}"
    )
  vocab_size, width = tensors[prefix + "token_embedding.weight"].shape
  layers = 0
  while f"{prefix}transformer.resblocks.{layers}.ln_1.weight" in tensors:
    layers += 1
  block0 = f"{prefix}transformer.resblocks.0."
  if layers == 0:
    raise CheckpointError(f"{path}: no {block0}ln_1.weight: not an open_clip text transformer")
  unsupported = {k[len(block0) :] for k in tensors if k.startswith(block0)} - _OPEN_CLIP_BLOCK_KEYS
  if unsupported:
    raise CheckpointError(f"{path}: unsupported text block parameters {sorted(unsupported)}")
  if prefix + "text_projection" not in tensors:
    raise CheckpointError(
      f"{path}: parameter {prefix}text_projection not found (wrong architecture?)"
    )
  settings = _open_clip_settings(path)
  if settings:  # open_clip's own default is nn.GELU unless the config says quick_gelu
    default_act = "quick_gelu" if settings.get("quick_gelu", False) else "gelu"
  else:  # a bare state dict: OpenAI's weights
    default_act = "quick_gelu"
  config = TextConfig(
    vocab_size=vocab_size,
    width=width,
    layers=layers,
    heads=heads or settings.get("text_cfg", {}).get("heads") or max(1, width // 64),
    mlp_dim=tensors[block0 + "mlp.c_fc.weight"].shape[0],
    context_length=tensors[prefix + "positional_embedding"].shape[0]
    if prefix + "positional_embedding" in tensors
    else 77,
    embed_dim=tensors[prefix + "text_projection"].shape[-1],
    hidden_act=hidden_act or default_act,
    eos_token_id=None,
  )
  if config.hidden_act not in ACTIVATIONS:
    raise CheckpointError(f"{path}: unsupported activation {config.hidden_act!r}")
  if width % config.heads:
    raise CheckpointError(f"{path}: width {width} is not divisible by {config.heads} heads")
  w, m = width, config.mlp_dim
  get = lambda name, shape: checkpoints.take(tensors, prefix + name, shape, str(path))
  linear = lambda name, n_in, n_out: _dense(
    get(f"{name}.weight", (n_out, n_in)).T, get(f"{name}.bias", (n_out,))
  )
  layer_norm = lambda name: _norm(get(f"{name}.weight", (w,)), get(f"{name}.bias", (w,)))
  blocks = []
  for i in range(layers):
    p = f"transformer.resblocks.{i}"
    in_w = get(f"{p}.attn.in_proj_weight", (3 * w, w))  # rows: q, k, v
    in_b = get(f"{p}.attn.in_proj_bias", (3 * w,))
    attn = {
      n: _dense(in_w[j * w : (j + 1) * w].T, in_b[j * w : (j + 1) * w])
      for j, n in enumerate(("query", "key", "value"))
    }
    attn["out"] = linear(f"{p}.attn.out_proj", w, w)
    blocks.append(
      {
        "ln_1": layer_norm(f"{p}.ln_1"),
        "attn": attn,
        "ln_2": layer_norm(f"{p}.ln_2"),
        "mlp_fc": linear(f"{p}.mlp.c_fc", w, m),
        "mlp_proj": linear(f"{p}.mlp.c_proj", m, w),
      }
    )
  params = _variables(
    blocks,
    token_embedding={"embedding": get("token_embedding.weight", (vocab_size, w))},
    position_embedding=get("positional_embedding", (config.context_length, w)),
    ln_final=layer_norm("ln_final"),
    text_projection=get("text_projection", (w, config.embed_dim)),  # used as x @ P
  )
  return config, params


def load_clip_text(
  path: str | pathlib.Path,
  tokenizer_path: str | pathlib.Path | None = None,
  hidden_act: str | None = None,
  heads: int | None = None,
) -> tuple[TextConfig, dict, clip_tokenizer.Tokenizer | siglip_tokenizer.Tokenizer]:
  """CLIP or SigLIP text tower and its tokenizer from local files.

  Args:
    path: a transformers folder (`config.json`, `model.safetensors`; CLIP:
      `vocab.json` + `merges.txt` or `tokenizer.json`; SigLIP / SigLIP 2:
      Gemma's `tokenizer.json` + `tokenizer_config.json`), an open_clip
      `.safetensors` file, or a folder holding exactly one open_clip
      `.safetensors` (and its tokenizer files: `bpe_simple_vocab_16e6.txt.gz`
      or `vocab.json` + `merges.txt`).
    tokenizer_path: where the tokenizer files are, if elsewhere (a folder or
      the `.gz`).
    hidden_act, heads: open_clip only, see `from_open_clip`.

  Returns:
    (config, params, tokenizer); params {"params": ...} for
    `TextTransformer(config).apply`, the tokenizer's context length the
    model's. The tokenizer is a `clip_tokenizer.Tokenizer` for CLIP and a
    `siglip_tokenizer.Tokenizer` for SigLIP (config.pool "last").

  Raises:
    CheckpointError: missing files, another architecture, or shape mismatches.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: checkpoint not found")
  if path.is_dir() and (path / "config.json").is_file():
    config, params = from_transformers(path)
    tokenizer_dir = path
  else:
    weights = path
    if path.is_dir():
      candidates = sorted(path.glob("*.safetensors"))
      if len(candidates) != 1:
        found = sorted(p.name for p in path.iterdir())
        raise CheckpointError(
          f"{path}: expected config.json (transformers) or one open_clip .safetensors file; "
          f"found {found}"
        )
      weights = candidates[0]
    config, params = from_open_clip(weights, hidden_act=hidden_act, heads=heads)
    tokenizer_dir = weights.parent
  # Only SigLIP towers pool the last position; they use SigLIP 2's Gemma tokenizer.
  family = siglip_tokenizer if config.pool == "last" else clip_tokenizer
  tokenizer = family.load_tokenizer(tokenizer_path or tokenizer_dir, config.context_length)
  if tokenizer.vocab_size > config.vocab_size:
    raise CheckpointError(
      f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model embeds {config.vocab_size}"
    )
  if config.eos_token_id is not None and config.eos_token_id != tokenizer.eot_id:
    raise CheckpointError(
      f"{path}: the model pools at eos_token_id {config.eos_token_id}, the tokenizer's "
      f"{clip_tokenizer.EOT} is {tokenizer.eot_id}"
    )
  return config, params, tokenizer
