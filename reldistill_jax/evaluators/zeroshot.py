"""Zero-shot segmentation: each point takes the class whose text embedding is closest.

PROTOCOLS.md section 5: a point's class is the argmax over the C class text
embeddings of the cosine similarity with its 3D feature. The text embeddings
come from `data_prep.text_embeddings` (the prompt-ensembled class names, one
row per training id 1..C).
"""

import jax
import jax.numpy as jnp
import numpy as np


def zero_shot_predict(features, text_embeddings):
  """Training ids 1..C by cosine similarity to the class text embeddings.

  Works on numpy arrays (numpy out) and on jax arrays or tracers (jax out, so
  it can run inside `jax.jit`). Only the text embeddings are normalised: a
  feature's own norm scales all of its C similarities alike and cannot change
  the argmax (a zero feature gets class 1). Ties go to the lower id.

  Args:
    features: (..., D) 3D features, any scale.
    text_embeddings: (C, D) class text embeddings, any scale; row c - 1 is
      training id c.

  Returns:
    (...) int32 training ids in 1..C.
  """
  xp = jnp if isinstance(features, jax.Array) or isinstance(text_embeddings, jax.Array) else np
  features = xp.asarray(features)
  text = xp.asarray(text_embeddings).astype(xp.float32)
  if text.ndim != 2 or features.shape[-1] != text.shape[-1]:
    raise ValueError(
      f"features (..., D) and text (C, D) expected; got {features.shape}, {text.shape}"
    )
  text = text / xp.maximum(xp.linalg.norm(text, axis=-1, keepdims=True), 1e-12)
  features = features.astype(xp.float32)
  if xp is jnp:  # full float32 products: TF32 on GPUs could flip near-ties
    scores = jnp.matmul(features, text.T, precision=jax.lax.Precision.HIGHEST)
  else:
    scores = features @ text.T  # (..., C), cosine times |feature|
  return (xp.argmax(scores, axis=-1) + 1).astype(xp.int32)
