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


def built_configs(data_dir: str | pathlib.Path, name: str) -> list[str]:
  """The configs of builder `name` with a finished build in `data_dir` ("" for a
  builder without configs); an interrupted build (only `incomplete.*`) is not one."""
  folder = pathlib.Path(data_dir) / name
  if not BUILDERS[name].BUILDER_CONFIGS:
    return [""] if any(folder.glob("[0-9]*/dataset_info.json")) else []
  return sorted(p.parent.parent.name for p in folder.glob("[!.]*/[0-9]*/dataset_info.json"))


def check_builder(data_dir: str | pathlib.Path, builder: str) -> None:
  """Fails unless `builder` (`name[/config]`) names one finished build in `data_dir`.

  Raises:
    errors.ConfigError: an unknown builder, a builder with configs named
      without one (the message lists the configs), or a config given to a
      builder that has none.
    FileNotFoundError: that builder or config was not built in `data_dir`.
  """
  name, _, config = builder.partition("/")
  if name not in BUILDERS:
    raise errors.ConfigError(
      f"--builder {builder}: unknown builder {name!r}; choose from {', '.join(sorted(BUILDERS))}"
    )
  built = built_configs(data_dir, name)
  known = [c.name for c in BUILDERS[name].BUILDER_CONFIGS]
  if known and not config:
    example = (built or known)[0]
    raise errors.ConfigError(
      f"--builder {name}: this builder has several configs and none is named; pass one, e.g. "
      f"--builder {name}/{example} (built in {data_dir}: {', '.join(built) or 'none'}; "
      f"known: {', '.join(known)})"
    )
  if config and not known:
    raise errors.ConfigError(f"--builder {builder}: {name} has no configs; pass --builder {name}")
  if config not in built:
    others = f" (built there: {', '.join(f'{name}/{c}' for c in built)})" if built else ""
    raise FileNotFoundError(
      f"{pathlib.Path(data_dir) / builder}: no built dataset {builder!r} in {data_dir}{others}; "
      f"run `python -m data_prep.build {name} --manual_dir RAW --data_dir {data_dir}"
      f"{' --config ' + config if config else ''}`"
    )


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
    errors.ConfigError: see `check_builder`.
    errors.DataError: the split (or slice) holds no records.
  """
  check_builder(data_dir, builder)
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
