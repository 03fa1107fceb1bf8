"""Class-name prompts and their ensembled text embeddings (PROTOCOLS.md section 5).

A class's text embedding is the mean of the L2-normalised text embeddings of
its name in every template, renormalised. The templates are CLIP's 80 ImageNet
prompt templates plus a few templates of driving scenes.
"""

from collections.abc import Sequence

import numpy as np

from reldistill_jax import classes

# CLIP's prompt-engineering templates for ImageNet.
IMAGENET_TEMPLATES = (
  "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
  "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
  "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
  "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
  "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
  "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
  "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
  "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
  "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
  "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
  "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
  "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
  "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
  "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
  "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
  "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
  "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
  "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
  "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
  "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
  "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
  "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
  "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
  "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

SCENE_TEMPLATES = (
  "there is a {} in the scene.",
  "there is the {} in the scene.",
  "a photo of a {} in the scene.",
  "a photo of the {} in the scene.",
  "a photo of one {} in the scene.",
)

TEMPLATES = IMAGENET_TEMPLATES + SCENE_TEMPLATES

CLASS_NAMES = {
  "nuscenes": classes.NUSCENES_CLASSES,
  "semantic_kitti": tuple(name.replace("-", " ") for name in classes.SEMANTIC_KITTI_CLASSES),
}


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_text_embeddings(
  teacher, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> np.ndarray:
  """(C, D) ensembled, renormalised text embeddings of the classes.

  Args:
    teacher: anything with `text_embedding(list_of_str) -> (T, D)`.
    class_names: the C class names, as words.
    templates: prompt templates with one `{}`.
  """
  out = []
  for name in class_names:
    embeddings = np.asarray(teacher.text_embedding([t.format(name) for t in templates]))
    out.append(_unit(_unit(embeddings.astype(np.float64)).mean(0)))
  return np.stack(out).astype(np.float32)
