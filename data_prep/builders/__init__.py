"""TFDS builders of the project's datasets and the one way to read them back.

`nuscenes_lidarseg` (configs: the version folders of a nuScenes dataroot) and
`semantic_kitti`. Both write ArrayRecord files that `tfds.data_source` and
`tfds.builder_from_directory` read without this code and without TensorFlow.
"""

import pathlib

import tensorflow_datasets as tfds

from data_prep.builders.nuscenes_lidarseg import NuscenesLidarseg
from data_prep.builders.semantic_kitti import SemanticKitti
from reldistill_jax import errors

BUILDERS = {"nuscenes_lidarseg": NuscenesLidarseg, "semantic_kitti": SemanticKitti}


def data_source(data_dir: str | pathlib.Path, builder: str, split: str):
  """Random-access source over a built split (works as a grain data source).

  Args:
    data_dir: the folder given to the builder as `--data_dir`.
    builder: `name[/config]`, e.g. `nuscenes_lidarseg/v1.0-mini` or
      `semantic_kitti`.
    split: a split name, with TFDS slicing if wanted (`train[:10]`).

  Returns:
    A sequence of records (dicts of numpy arrays, bytes and scalars).

  Raises:
    FileNotFoundError: if that builder, config or split was not built there.
    errors.DataError: the split (or slice) holds no records, or a builder with
      configs is named without one.
  """
  name, _, config = builder.partition("/")
  if name in BUILDERS and BUILDERS[name].BUILDER_CONFIGS and not config:
    built = sorted(p.name for p in (pathlib.Path(data_dir) / name).glob("[!.]*") if p.is_dir())
    raise errors.DataError(
      f"{name} has one config per version folder: name one, e.g. {name}/v1.0-trainval "
      f"(built in {data_dir}: {', '.join(f'{name}/{c}' for c in built) or 'none'})"
    )
  root = pathlib.Path(data_dir) / name / config if config else pathlib.Path(data_dir) / name
  if not root.is_dir():
    raise FileNotFoundError(
      f"{root}: no built dataset {builder!r} in {data_dir} "
      f"(run `python -m data_prep.build {name} --manual_dir RAW --data_dir {data_dir}"
      f"{' --config ' + config if config else ''}`)"
    )
  dataset = tfds.builder(builder, data_dir=str(data_dir))
  base_split = split.split("[")[0]
  if base_split not in dataset.info.splits:
    raise FileNotFoundError(
      f"{dataset.data_dir}: split {base_split!r} not built "
      f"(available: {sorted(dataset.info.splits)})"
    )
  try:
    size = dataset.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise errors.DataError(f"{builder}: split {split!r} cannot be read ({e})") from None
  if not size:
    raise errors.DataError(
      f"{dataset.data_dir}: split {split!r} holds no records; choose a split (or slice) with "
      f"records (sizes: { {k: v.num_examples for k, v in dataset.info.splits.items()} })"
    )
  return dataset.as_data_source(split=split)
