r"""Writes the ensembled class text embeddings of a teacher.

  python -m data_prep.text_embeddings --teacher clip_vitb16 --weights CKPT \
      --classes nuscenes --out text_nuscenes.npz

Reads the teacher's checkpoint (--weights: its text tower and tokenizer
files; for the synthetic teacher, the world's dataroot) and encodes every
class name of the dataset in every prompt template
(`reldistill_jax.prompts`: CLIP's 80 ImageNet templates and a few scene
templates), averages the L2-normalised embeddings per class and renormalises.
Writes an .npz with `embeddings` (C, D) float32, `classes` (C,) names, and
`teacher`, `weights_sha256`, `templates`. An existing file is kept when it
holds the same teacher, weights and classes, and refused otherwise.
"""

import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from reldistill_jax import cli, errors, prompts, teachers


def define_flags() -> None:
  """The CLI's flags (defined only when run as a program)."""
  flags.DEFINE_string(
    "teacher",
    None,
    f"Teacher with a text tower: one of {', '.join(teachers.TEXT_TEACHERS)}.",
    required=True,
  )
  flags.DEFINE_string("weights", None, "Checkpoint folder/file (synthetic: the world's dataroot).")
  flags.DEFINE_enum("classes", "nuscenes", sorted(prompts.CLASS_NAMES), "Class names to encode.")
  flags.DEFINE_string("out", None, "Output .npz file.", required=True)


def write_text_embeddings(teacher, dataset: str, out: str | pathlib.Path) -> pathlib.Path:
  """Encodes the class names of `dataset` into `out` (see module docstring)."""
  out = pathlib.Path(out)
  names = prompts.CLASS_NAMES[dataset]
  identity = {"teacher": teacher.name, "weights_sha256": teacher.weights_sha256}
  if out.exists():
    with np.load(out) as old:
      same = all(str(old[k]) == v for k, v in identity.items()) and list(old["classes"]) == list(
        names
      )
    if same:
      return out
    raise FileExistsError(
      f"{out} holds text embeddings of another teacher or class list; not overwriting"
    )
  embeddings = prompts.class_text_embeddings(teacher, names)
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".npz")
  with os.fdopen(fd, "wb") as f:
    np.savez(
      f,
      embeddings=embeddings,
      classes=np.array(names),
      templates=np.array(prompts.TEMPLATES),
      **{k: np.array(v) for k, v in identity.items()},
    )
  os.replace(tmp, out)
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if f.teacher not in teachers.TEXT_TEACHERS:
    raise errors.ConfigError(
      f"--teacher {f.teacher} has no text tower; choose one of {', '.join(teachers.TEXT_TEACHERS)}"
    )
  path = write_text_embeddings(teachers.load(f.teacher, f.weights), f.classes, f.out)
  print(f"{path}: {len(prompts.CLASS_NAMES[f.classes])} classes")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
