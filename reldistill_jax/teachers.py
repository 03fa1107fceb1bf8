"""Frozen 2D teachers behind one interface.

`load(name, weights_path=None)` returns a `Teacher`:

  dense_features(images_uint8, camera_tokens=None) -> (B, h, w, D) float32
      patch-grid features of (B, H, W, 3) uint8 images already at the size to
      encode (resizing belongs to the feature-store writer); the teacher
      applies its own pixel normalisation.
  image_embedding(images_uint8) -> (B, D)   pooled, projected (CLIP, SigLIP 2)
  text_embedding(list_of_str) -> (T, D)     projected (CLIP, SigLIP 2, synthetic)

plus `name`, `dense`, `patch_size`, `feature_dim`, `default_image_size` (H, W),
`weights_sha256` and `normalisation` (a description), which the feature store
records in its manifest.

Names: the families `clip`, `siglip2`, `dinov2` and `dinov3` read the
architecture from the checkpoint's own files, so any size loads; the named
sizes (`clip_vitb16`, `clip_vitl14`, `siglip2_b16`, `siglip2_l16`,
`siglip2_so400m14`, `siglip2_so400m16`, `siglip2_g16`, `dinov2_vits14`,
`dinov2_vitb14`, `dinov2_vitl14`, `dinov3_vits16`, `dinov3_vitb16`,
`dinov3_vitl16`) also check that the checkpoint is that architecture.
`synthetic` is the teacher of the synthetic world (below): its `weights_path`
is the world's dataroot, whose rendered class maps it reads, so
`dense_features` needs the cameras' sample_data tokens.

Every teacher has a `dense` rule, which the feature store records and
training checks: for CLIP and SigLIP 2 one of `maskclip` (default), `sclip`,
`clearclip`, `naclip` (`models/vit.py`); DINOv2 `tokens_prenorm` (ScaLR's
choice), DINOv3 `tokens_postnorm` (its own dense evaluations'; registers
dropped); the synthetic teacher `class_prototypes`.

The synthetic teacher stands in for CLIP on the synthetic world: each class has
a prototype (related classes close together, as in CLIP space: vehicles,
two-wheelers, road furniture, flat ground, nature), a patch's feature is the
area-weighted mixture of the prototypes of the classes it covers plus
spatially correlated noise, and its text embeddings are the prototypes. A
student distilled from it can therefore be scored zero-shot with the same
evaluator as a CLIP-distilled one, and near-prototype classes are confused
the way CLIP confuses them.
"""

import dataclasses
import functools
import hashlib
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np
from PIL import Image

from reldistill_jax import classes, errors


class Teacher(Protocol):
  """What the feature store, the text embeddings and the evaluators use."""

  name: str
  dense: str
  patch_size: int
  feature_dim: int
  default_image_size: tuple[int, int]
  weights_sha256: str
  normalisation: str

  def dense_features(
    self, images: np.ndarray, camera_tokens: Sequence[str] | None = None
  ) -> np.ndarray: ...

  def text_embedding(self, texts: Sequence[str]) -> np.ndarray: ...


def _check_images(images: np.ndarray, patch_size: int) -> tuple[int, int]:
  """Validates (B, H, W, 3) uint8 images whose sides are multiples of the patch."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"images must be (B, H, W, 3) uint8, got {images.shape} {images.dtype}")
  height, width = images.shape[1:3]
  if height % patch_size or width % patch_size:
    raise ValueError(
      f"image size {height}x{width} is not a multiple of the patch size {patch_size}"
    )
  return height // patch_size, width // patch_size


def sha256_of(paths: Sequence[pathlib.Path]) -> str:
  """sha256 over the bytes of the given files, in order."""
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


# The synthetic teacher.

# Groups of related training ids: prototypes within a group are close.
SYNTHETIC_GROUPS = (
  (4, 10, 3, 9, 5),  # car, truck, bus, trailer, construction vehicle
  (2, 6),  # bicycle, motorcycle
  (7,),  # pedestrian
  (1, 8),  # barrier, traffic cone
  (11, 12, 13),  # driveable surface, other flat, sidewalk
  (14, 16),  # terrain, vegetation
  (15,),  # manmade
)
SKY = "sky"
OTHER = "other"  # raw ids that map to the ignore class


# How imperfect the synthetic teacher is (`SyntheticTeacher`'s `confusion` and `noise`), the
# defaults of `config.data.teacher`.
SYNTHETIC_IMPERFECTION = {"confusion": 0.55, "noise": 0.35}


class SyntheticTeacher:
  """The teacher of the synthetic world (module docstring).

  Args:
    world: the synthetic world's dataroot (holding `synthetic/meta.json` and
      `synthetic/classmaps/`).
    feature_dim: D.
    patch_size: pixels per patch at the encoded size (16, as CLIP ViT-B/16).
    within_group: cosine between prototypes of one group (0 < c < 1).
    confusion: largest weight with which a class's features lean towards a
      group-mate's prototype (the mate and the weight field vary per image).
    noise: standard deviation of the feature noise relative to a unit
      prototype, spatially correlated over neighbouring patches.
    seed: seed of the prototypes (fixed, so every world shares one teacher).
  """

  name = "synthetic"
  dense = "class_prototypes"
  FEATURE_DIM = 512

  def __init__(
    self,
    world: str | pathlib.Path,
    feature_dim: int = FEATURE_DIM,
    patch_size: int = 16,
    within_group: float = 0.7,
    confusion: float = SYNTHETIC_IMPERFECTION["confusion"],
    noise: float = SYNTHETIC_IMPERFECTION["noise"],
    seed: int = 0,
  ):
    self.world = pathlib.Path(world)
    meta_path = self.world / "synthetic" / "meta.json"
    if not meta_path.is_file():
      raise FileNotFoundError(
        f"{meta_path}: not a synthetic world (the synthetic teacher's weights_path is the "
        "world's dataroot, written by `python -m data_prep.synthetic`)"
      )
    self.meta = json.loads(meta_path.read_text())
    if not self.meta.get("cameras"):
      raise errors.DataError(
        f"{self.world}: a synthetic world without cameras (lidar only) has no class maps "
        "for the synthetic teacher; generate one with cameras for pretraining"
      )
    self.patch_size = patch_size
    self.feature_dim = feature_dim
    self.default_image_size = (224, 416)
    self.noise = noise
    self.confusion = confusion
    self.names = (*classes.NUSCENES_CLASSES, SKY, OTHER)
    self.prototypes = self._prototypes(feature_dim, within_group, seed)  # (18, D)
    settings = dict(
      d=feature_dim, p=patch_size, c=within_group, confusion=confusion, noise=noise, seed=seed
    )
    self.weights_sha256 = hashlib.sha256(
      json.dumps({"teacher": settings, "world": self.meta}, sort_keys=True).encode()
    ).hexdigest()
    self.normalisation = "class maps of the synthetic world (no pixel normalisation)"
    # raw lidarseg id (and the sky id) -> row of `prototypes`.
    self._row_of_raw = np.full(256, len(self.names) - 1, np.int64)
    train = classes.NUSCENES_RAW_TO_TRAIN
    self._row_of_raw[: len(train)] = np.where(
      train > 0, train.astype(np.int64) - 1, len(self.names) - 1
    )
    self._row_of_raw[self.meta["classmap"]["sky_id"]] = len(self.names) - 2

  def _prototypes(self, dim: int, within: float, seed: int) -> np.ndarray:
    """Unit prototypes: group centre + a class offset, cosine `within` inside a group."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    protos = np.zeros((len(self.names), dim))
    # offset weight a gives cos = 1 / (1 + a^2) between two classes of a group.
    a = np.sqrt(1.0 / within - 1.0)
    for group in SYNTHETIC_GROUPS:
      centre = unit(rng.normal(size=dim))
      for train_id in group:
        protos[train_id - 1] = unit(centre + a * unit(rng.normal(size=dim)))
    protos[len(classes.NUSCENES_CLASSES) :] = unit(rng.normal(size=(2, dim)))
    return protos.astype(np.float32)

  def classmap(self, camera_token: str) -> np.ndarray:
    """The rendered raw-id class map (h', w') uint8 of one camera image."""
    path = self.world / self.meta["classmap"]["dir"] / f"{camera_token}.png"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no class map for camera sample_data {camera_token}")
    return np.asarray(Image.open(path))

  def class_fractions(self, classmap: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h, w, K) fraction of each prototype's pixels in every grid cell.

    The image is resized directly (anisotropically) to the encoded size, so
    cell (i, j) covers the same fraction of the native image on both axes.
    """
    h, w = grid
    # Pixel p spans [p, p + 1): its centre decides its cell.
    rows = ((np.arange(classmap.shape[0]) + 0.5) * h / classmap.shape[0]).astype(np.int64)
    cols = ((np.arange(classmap.shape[1]) + 0.5) * w / classmap.shape[1]).astype(np.int64)
    cell = rows[:, None] * w + cols[None, :]  # (h', w')
    k = len(self.names)
    counts = np.bincount(
      (cell * k + self._row_of_raw[classmap]).ravel(), minlength=h * w * k
    ).reshape(h, w, k)
    return counts / counts.sum(-1, keepdims=True)

  def dense_features(
    self, images: np.ndarray, camera_tokens: Sequence[str] | None = None
  ) -> np.ndarray:
    """(B, h, w, D) features of the cameras `camera_tokens` (images give the size)."""
    grid = _check_images(images, self.patch_size)
    if camera_tokens is None or len(camera_tokens) != len(images):
      raise ValueError("the synthetic teacher needs one camera sample_data token per image")
    return np.stack([self._features(token, grid) for token in camera_tokens])

  def _features(self, camera_token: str, grid: tuple[int, int]) -> np.ndarray:
    """(h, w, D) features of one image: drifting prototypes, mixed, plus noise."""
    h, w = grid
    # Seeded by the image: the same features every time it is encoded.
    rng = np.random.default_rng(int(hashlib.sha256(camera_token.encode()).hexdigest()[:16], 16))
    smooth = lambda x: sum(x[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 3.0
    # The designed confusion: in each image every class leans towards one
    # group-mate, by a spatially smooth weight in (0, confusion); where it
    # passes 1/2 the patch is closer to the mate (a car seen as a truck).
    mates = np.arange(len(self.names))
    for group in SYNTHETIC_GROUPS:
      for train_id in group:
        others = [g for g in group if g != train_id]
        if others:
          mates[train_id - 1] = rng.choice(others) - 1
    lean = self.confusion / (1.0 + np.exp(-2.0 * smooth(rng.normal(size=(h + 2, w + 2, 1)))))
    fractions = self.class_fractions(self.classmap(camera_token), grid)  # (h, w, K)
    mix = (1.0 - lean) * (fractions @ self.prototypes) + lean * (fractions @ self.prototypes[mates])
    noise = smooth(rng.normal(size=(h + 2, w + 2, self.feature_dim))) / np.sqrt(self.feature_dim)
    feature = mix + self.noise * noise
    return (feature / np.linalg.norm(feature, axis=-1, keepdims=True)).astype(np.float32)

  def text_embedding(self, texts: Sequence[str]) -> np.ndarray:
    """(T, D) prototype of the class each text names (the longest name it holds as words)."""
    rows = []
    for text in texts:
      lowered = text.lower()
      found = [
        i for i, name in enumerate(self.names) if re.search(rf"\b{re.escape(name)}\b", lowered)
      ]
      if not found:
        raise errors.DataError(
          f"the synthetic teacher knows only its class names {list(self.names)}; got {text!r}"
        )
      rows.append(max(found, key=lambda i: len(self.names[i])))
    return self.prototypes[rows]


class VitTeacher:
  """A ViT teacher: CLIP or SigLIP 2 (dense features, image and text embeddings), DINOv2 or DINOv3.

  Args:
    name: the teacher name (module docstring).
    path: checkpoint folder (transformers layout), or an open_clip file/folder for CLIP.
    dense: the dense rule (`vit.DENSE_OUTPUTS`); None for the family's default.
  """

  def __init__(self, name: str, path: str | pathlib.Path, dense: str | None = None):
    from reldistill_jax.models import vit  # JAX models load lazily

    self.name = name
    self.path = pathlib.Path(path)
    family = name.split("_")[0]
    self.config, params = _loader(family)(self.path)
    self._check_architecture(vit.VARIANTS.get(_ARCHITECTURES.get(name)), family)
    if dense is not None and dense != self.config.dense_output:
      check_dense(name, dense)
      if dense in vit.TEXT_DENSE and not self.config.text_aligned:
        raise errors.DataError(f"{self.path}: this checkpoint has no image-text projection")
      self.config = dataclasses.replace(self.config, dense_output=dense)
    self.dense = self.config.dense_output
    self.patch_size = self.config.patch_size
    self.feature_dim = self.config.out_dim
    self.default_image_size = default_image_size(self.patch_size)
    self.normalisation = f"mean {list(self.config.pixel_mean)}, std {list(self.config.pixel_std)}"
    files = sorted(self.path.rglob("*.safetensors")) if self.path.is_dir() else [self.path]
    self.weights_sha256 = sha256_of(files)
    model = vit.ViT(self.config)
    self._params = jax.device_put({"params": params})
    self._normalize = functools.partial(vit.normalize_pixels, config=self.config)
    self._apply = jax.jit(lambda p, x: model.apply(p, x))
    self._text = None
    if self.config.text_aligned:
      from reldistill_jax.models import clip_text

      self._text = clip_text.load_clip_text(self.path)
      self._encode_text = clip_text.encode_text

  def _check_architecture(self, want, family: str) -> None:
    """A named teacher's checkpoint must be that architecture."""
    got = (self.config.patch_size, self.config.width, self.config.layers)
    if want is not None and got != (want.patch_size, want.width, want.layers):
      raise errors.DataError(
        f"{self.path}: {self.name} expects patch {want.patch_size}, width {want.width}, "
        f"{want.layers} layers; the checkpoint has patch {got[0]}, width {got[1]}, {got[2]} "
        f"layers (load it as {family!r} to accept any size)"
      )

  def _run(self, images: np.ndarray):
    _check_images(images, self.patch_size)
    return self._apply(self._params, self._normalize(images))

  def dense_features(
    self, images: np.ndarray, camera_tokens: Sequence[str] | None = None
  ) -> np.ndarray:
    """(B, h, w, D): the features of the teacher's dense rule (`self.dense`)."""
    del camera_tokens  # the images themselves are encoded
    return np.asarray(self._run(images)[0], np.float32)

  def image_embedding(self, images: np.ndarray) -> np.ndarray:
    """(B, D) pooled image embeddings (`get_image_features` of CLIP / SigLIP)."""
    if self._text is None:
      raise errors.ConfigError(f"{self.name} has no image-text embedding (not a CLIP-type model)")
    return np.asarray(self._run(images)[1]["image_embeds"], np.float32)

  def text_embedding(self, texts: Sequence[str]) -> np.ndarray:
    """(T, D) text embeddings (`get_text_features` of CLIP / SigLIP)."""
    if self._text is None:
      raise errors.ConfigError(f"{self.name} has no text tower (not a CLIP-type model)")
    config, params, tokenizer = self._text
    return self._encode_text(params, config, tokenizer, list(texts))


def default_image_size(patch_size: int) -> tuple[int, int]:
  """224 rows and the width nearest 416 that are whole numbers of patches (224x416 for /16)."""
  return 224 // patch_size * patch_size, round(416 / patch_size) * patch_size


def _loader(family: str):
  """The checkpoint importer of a teacher family."""
  from reldistill_jax.models import vit_import

  return {
    "clip": vit_import.load_clip_vision,
    "siglip2": vit_import.load_siglip_vision,
    "dinov2": vit_import.load_dinov2,
    "dinov3": vit_import.load_dinov3,
  }[family]


# Named teachers whose checkpoint must be that architecture (vit.VARIANTS names).
_ARCHITECTURES = {
  "clip_vitb16": "clip_b16",
  "clip_vitl14": "clip_l14",
  "siglip2_b16": "siglip2_b16",
  "siglip2_l16": "siglip2_l16",
  "siglip2_so400m14": "siglip2_so400m14",
  "siglip2_so400m16": "siglip2_so400m16",
  "siglip2_g16": "siglip2_g16",
  "dinov2_vits14": "dinov2_s14",
  "dinov2_vitb14": "dinov2_b14",
  "dinov2_vitl14": "dinov2_l14",
  "dinov3_vits16": "dinov3_s16",
  "dinov3_vitb16": "dinov3_b16",
  "dinov3_vitl16": "dinov3_l16",
}
FAMILIES = ("clip", "siglip2", "dinov2", "dinov3")
TEACHERS = ("synthetic", *FAMILIES, *_ARCHITECTURES)
# The teachers with a text tower, for zero-shot (`data_prep.text_embeddings`).
TEXT_TEACHERS = tuple(t for t in TEACHERS if t.split("_")[0] in ("synthetic", "clip", "siglip2"))


_DEFAULT_DENSE = {
  "synthetic": SyntheticTeacher.dense,
  "clip": "maskclip",
  "siglip2": "maskclip",
  "dinov2": "tokens_prenorm",
  "dinov3": "tokens_postnorm",
}


def default_dense(name: str) -> str:
  """The dense rule a teacher uses when none is asked for."""
  return _DEFAULT_DENSE[name.split("_")[0]]


def check_dense(name: str, dense: str) -> None:
  """Refuses a dense rule the teacher `name` cannot give, naming the ones it can."""
  from reldistill_jax.models import vit

  family = name.split("_")[0]
  if family == "synthetic":
    allowed = (SyntheticTeacher.dense,)
  elif family in ("clip", "siglip2"):
    allowed = vit.DENSE_OUTPUTS
  else:
    allowed = tuple(d for d in vit.DENSE_OUTPUTS if d not in vit.TEXT_DENSE)
  if dense not in allowed:
    raise errors.ConfigError(
      f"dense rule {dense!r} is not one of {name}'s: {', '.join(allowed)} "
      "(the text rules need an image-text teacher: CLIP or SigLIP 2)"
    )


def feature_dim(name: str) -> int:
  """D of a named teacher's dense features (its default rule; every text rule gives the same)."""
  from reldistill_jax.models import vit

  if name == "synthetic":
    return SyntheticTeacher.FEATURE_DIM
  if name not in _ARCHITECTURES:
    raise errors.ConfigError(
      f"teacher {name!r} has no fixed size; choose one of {sorted(_ARCHITECTURES)} or 'synthetic'"
    )
  return vit.VARIANTS[_ARCHITECTURES[name]].out_dim


def load(
  name: str,
  weights_path: str | pathlib.Path | None = None,
  dense: str | None = None,
  imperfection: dict | None = None,
) -> Teacher:
  """The teacher `name` (module docstring), weights read from local files only.

  Args:
    name: a `TEACHERS` name.
    weights_path: the checkpoint (the synthetic teacher: the world's dataroot).
    dense: the dense rule (`vit.DENSE_OUTPUTS`: maskclip, sclip, clearclip,
      naclip for CLIP and SigLIP 2); None for the teacher's default.
    imperfection: the synthetic teacher's `confusion` and `noise` (None:
      `SYNTHETIC_IMPERFECTION`); no other teacher takes it.
  """
  if name not in TEACHERS:
    raise errors.ConfigError(f"unknown teacher {name!r}; choose from {sorted(TEACHERS)}")
  if weights_path is None:
    what = "the synthetic world's dataroot" if name == "synthetic" else "a local checkpoint"
    raise errors.ConfigError(f"teacher {name!r} needs weights_path: {what} (nothing is downloaded)")
  if dense is not None:
    check_dense(name, dense)
  if imperfection is not None and name != "synthetic":
    raise errors.ConfigError(f"teacher {name!r} is what it is: only `synthetic` takes settings")
  if name == "synthetic":
    return SyntheticTeacher(weights_path, **(imperfection or {}))
  if not pathlib.Path(weights_path).exists():
    raise FileNotFoundError(f"{weights_path}: teacher checkpoint not found")
  return VitTeacher(name, weights_path, dense)
