"""Test set-up shared by every test module.

Eight host devices are simulated so that sharded code runs on a CPU; this must
happen before JAX initialises its backend, hence at import time here.

XLA compiles the tests' programs at its CPU backend's lowest optimisation
effort (`COMPILE_FLAGS`): compiling, not running, is most of a test's time,
and this halves it. LLVM may not reorder floating-point arithmetic at any
level (XLA's CPU backend has no fast-math by default), so every result is the
one the default effort gives; the programs run somewhat slower. A process a
test starts gets the same flags through `xla_flags`.

One persistent compilation cache serves the whole test run: this process and
every process a test starts (the entry point, the benchmarks, the notebooks'
kernels) inherit its folder through the environment, so a step that several
tests compile is compiled once. XLA keys each entry by the program, its
devices and the compiler's version and flags, so a hit runs exactly what a
compilation would have produced: no check is weakened. The folder lives as long
as the run, so every run starts cold, as CI does; set JAX_COMPILATION_CACHE_DIR
to keep one across runs.
"""

import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a process a test starts: `devices` simulated CPU devices (None: one)."""
  count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
  return count + COMPILE_FLAGS


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _COMPILATION_CACHE = tempfile.mkdtemp(prefix="reldistill-jax-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
else:
  _COMPILATION_CACHE = None
# Every compilation is cached, however quick or small (the defaults skip those under a second).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()


def pytest_unconfigure(config):
  """Removes the run's compilation cache (one given by the environment is kept)."""
  if _COMPILATION_CACHE is not None:
    shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


REALDATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> pathlib.Path:
  """The real sensor samples shipped beside the repository (`../shared/realdata`)."""
  if not REALDATA.is_dir():
    pytest.skip(
      f"real data samples not found at {REALDATA} (they live beside the repository in CI)"
    )
  return REALDATA


@pytest.fixture(scope="session")
def mesh() -> jax.sharding.Mesh:
  """The 8 simulated CPU devices on one `data` axis (Auto axis type)."""
  assert jax.device_count() == 8, "XLA_FLAGS must simulate 8 devices before JAX starts"
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def random_pairs(n: int, d: int, seed: int = 0, valid: float = 0.8):
  """(k, q, mask): Gaussian (n, d) pair features and a random validity mask."""
  rng = np.random.default_rng(seed)
  k = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  return k, q, jnp.asarray(rng.random(n) < valid)


def run_at_once(
  commands: dict, cwd: pathlib.Path, env: dict | None = None, timeout: int = 240
) -> dict[object, subprocess.CompletedProcess]:
  """key -> the finished run of `python *args`, every process started at once.

  For tests of many short commands that are mostly Python's imports: they share the cores
  instead of waiting for each other.
  """
  procs = {
    key: subprocess.Popen(
      [sys.executable, *args],
      cwd=cwd,
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for key, args in commands.items()
  }
  out = {}
  for key, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=timeout)
    out[key] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  return out


class RunsInGroups:
  """key -> the finished run of `python *args`, as `run_at_once` gives, for many commands:
  they run `group` at a time, a group's processes started at once when a test first asks
  for one of its keys, so that no one test waits on every command."""

  def __init__(self, commands: dict, cwd: pathlib.Path, env: dict | None = None, group: int = 2):
    keys = list(commands)
    self._groups = [keys[i : i + group] for i in range(0, len(keys), group)]
    self._commands, self._cwd, self._env = commands, cwd, env
    self._done: dict[object, subprocess.CompletedProcess] = {}

  def __getitem__(self, key) -> subprocess.CompletedProcess:
    if key not in self._done:
      (group,) = [g for g in self._groups if key in g]
      self._done.update(run_at_once({k: self._commands[k] for k in group}, self._cwd, self._env))
    return self._done[key]


SYNTHETIC_BUILDER = "nuscenes_lidarseg/v1.0-synthetic"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict[str, pathlib.Path]:
  """A 3-scene synthetic world (1 validation, 2 training scenes), built and voxelised."""
  from data_prep import build, voxelise
  from data_prep.synthetic import writer

  tmp = tmp_path_factory.mktemp("pipeline")
  world, tfds_dir, buckets = tmp / "world", tmp / "tfds", tmp / "buckets"
  writer.generate(world, scenes=3, samples_per_scene=2, seed=11, workers=2)
  build.build("nuscenes_lidarseg", str(world), str(tfds_dir))
  source = functools.partial(voxelise.open_builder_split, str(tfds_dir), SYNTHETIC_BUILDER, "train")
  config = voxelise.bucket_config(SYNTHETIC_BUILDER, "train", len(source()), records_per_shard=3)
  voxelise.voxelise_split(source, str(buckets), config, workers=2)
  return {"world": world, "tfds": tfds_dir, "buckets": buckets}


@pytest.fixture(scope="session")
def small_training_data(pipeline, tmp_path_factory) -> dict[str, pathlib.Path]:
  """Coarse buckets (0.4 m, 2 stages) of the pipeline world's `train` and `val`
  splits and synthetic-teacher features of `train`: a training step runs in
  about a second."""
  from data_prep import teacher_features, voxelise
  from data_prep.builders import data_source
  from reldistill_jax import teachers

  tmp = tmp_path_factory.mktemp("small_training")
  for split, out in (("train", "buckets"), ("val", "val_buckets")):
    source = functools.partial(
      voxelise.open_builder_split, str(pipeline["tfds"]), SYNTHETIC_BUILDER, split
    )
    config = voxelise.bucket_config(
      SYNTHETIC_BUILDER, split, len(source()), voxel_size=0.4, num_stages=2, records_per_shard=2,
    )  # fmt: skip
    voxelise.voxelise_split(source, str(tmp / out), config, workers=1)
  teacher = teachers.load("synthetic", pipeline["world"])
  builder_split = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "train")
  teacher_features.write_store(
    teacher, builder_split, str(tmp / "features"), SYNTHETIC_BUILDER, "train"
  )
  val_split = data_source(pipeline["tfds"], SYNTHETIC_BUILDER, "val")
  teacher_features.write_store(
    teacher, val_split, str(tmp / "val_features"), SYNTHETIC_BUILDER, "val"
  )
  return {
    "buckets": tmp / "buckets",
    "val_buckets": tmp / "val_buckets",
    "features": tmp / "features",
    "val_features": tmp / "val_features",
  }


# A 4-step pretraining of the tiny student on `small_training_data`, checkpoints at 2 and 4.
PRETRAIN_ARG = "loss=relational,teacher=synthetic,dataset=synthetic,runlocal"
PRETRAIN_OVERRIDES = {
  "mesh.data": 1,
  "input.num_pairs": 256,
  "model.patch_size": 128,
  "num_steps": 4,
  "log_every": 1,
  "checkpoint.every": 2,
}


def pretrain_config(data, **extra):
  """configs/pretrain.py on `small_training_data`, with `PRETRAIN_OVERRIDES` and `extra`."""
  from configs import pretrain

  config = pretrain.get_config(PRETRAIN_ARG)
  config.input.buckets = str(data["buckets"])
  config.input.features = str(data["features"])
  for key, value in {**PRETRAIN_OVERRIDES, **extra}.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config
