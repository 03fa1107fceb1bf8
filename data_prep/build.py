r"""Builds a dataset into TFDS ArrayRecord files.

  python -m data_prep.build nuscenes_lidarseg --manual_dir NUSCENES_ROOT \
      --data_dir OUT [--config v1.0-mini]
  python -m data_prep.build semantic_kitti --manual_dir KITTI_ROOT --data_dir OUT

Reads the raw dataset under --manual_dir (a nuScenes dataroot, or a
SemanticKITTI folder holding sequences/) and writes OUT/<builder>/<config>/
<version>/ (ArrayRecord shards plus TFDS metadata). For nuscenes_lidarseg
without --config, every version folder found in the dataroot is built. A split
already built is reused, never overwritten. A build stopped by an exception, SIGTERM
or Ctrl-C removes its `incomplete.*` folder; one killed outright leaves it, and the
next run replaces it.
"""

import pathlib
import shutil

import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_prep import nuscenes
from data_prep.builders import BUILDERS
from reldistill_jax import cli, errors


def define_flags() -> None:
  """Defines the CLI's flags (only when run as a program, so that other stages
  with a `--data_dir` of their own can be imported beside this module)."""
  flags.DEFINE_string("manual_dir", None, "Raw dataset folder.", required=True)
  flags.DEFINE_string("data_dir", None, "Output folder of built datasets.", required=True)
  flags.DEFINE_string(
    "config", None, "nuscenes_lidarseg: version folder to build (default: all found)."
  )


def build(builder: str, manual_dir: str, data_dir: str, config: str | None = None) -> list[str]:
  """Builds one builder (all nuScenes versions found when config is None).

  Returns:
    The folders written (or reused).
  """
  if builder not in BUILDERS:
    raise errors.ConfigError(f"unknown builder {builder!r}; choose from {sorted(BUILDERS)}")
  manual = pathlib.Path(manual_dir)
  if not manual.is_dir():
    raise FileNotFoundError(f"{manual}: --manual_dir does not exist (give the raw dataset folder)")
  configs: list[str | None] = [config]
  if builder == "nuscenes_lidarseg" and config is None:
    configs = nuscenes.available_versions(manual)
    if not configs:
      raise nuscenes.DatarootError(f"{manual}: no version folder (v1.0-*/scene.json) found")
  elif builder == "semantic_kitti" and config is not None:
    raise errors.ConfigError("semantic_kitti has no configs; drop --config")
  written = []
  for name in configs:
    cls = BUILDERS[builder]
    if name is None:
      dataset = cls(data_dir=data_dir, file_format="array_record")
    else:
      known = {c.name: c for c in cls.BUILDER_CONFIGS}
      cfg = known.get(name) or tfds.core.BuilderConfig(name=name, description=f"nuScenes {name}.")
      dataset = cls(data_dir=data_dir, config=cfg, file_format="array_record")
    _prepare(dataset, manual)
    splits = {k: v.num_examples for k, v in dataset.info.splits.items()}
    logging.info("%s: %s", dataset.data_dir, splits)
    written.append(dataset.data_dir)
  return written


def _prepare(dataset: tfds.core.DatasetBuilder, manual: pathlib.Path) -> None:
  """`download_and_prepare`, and on any stop the `incomplete.*` folders it began removed:
  TFDS removes its own, except when the stop lands between its creating the folder and
  its `try` or in its `finally`."""
  parent = pathlib.Path(dataset.data_dir).parent
  before = set(parent.glob("incomplete.*"))
  try:
    dataset.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
  except BaseException:
    with cli.signals_deferred():
      for folder in set(parent.glob("incomplete.*")) - before:
        shutil.rmtree(folder, ignore_errors=True)
    raise


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(
      f"usage: python -m data_prep.build {{{','.join(BUILDERS)}}} --manual_dir ..."
    )
  for folder in build(argv[1], flags.FLAGS.manual_dir, flags.FLAGS.data_dir, flags.FLAGS.config):
    print(folder)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
