"""Every command in the README's bash blocks is exercised.

  * the synthetic-world data commands run verbatim (in a scratch folder);
  * commands on real data (/data, /ckpt, /runs paths that do not exist here)
    run until they fail, and must fail on the missing input they name, not
    on a flag, a config field or an argument;
  * the set-up commands are what .ci/run does, the long runs are covered by
    named tests, and their flags must exist.

A command the README gains must fall into one of these, or this test fails.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import run_at_once, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REAL_PATHS = re.compile(r"(?<![\w.])/(data|ckpt|runs)/[\w./-]*")
# Failures that mean the command itself is wrong, whatever the data.
BAD_USAGE = (
  "UnrecognizedFlagError",
  "FATAL Flags parsing error",
  "Unknown command line flag",
  "unknown config argument",
  "usage error",
  "UsageError",
  "error: unrecognized arguments",
  "error: the following arguments are required",
  "KeyError",
  "AttributeError",
  "ModuleNotFoundError",
)


def readme_commands() -> list[str]:
  """The commands of the README's bash blocks, continuation lines joined."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
    for command in block.replace("\\\n", " ").splitlines():
      command = " ".join(command.split())
      if command and not command.startswith("#"):
        commands.append(command)
  return commands


def _is_setup(command: str) -> bool:
  return command.startswith("python3 -m venv")


def _is_quick(command: str) -> bool:
  """The synthetic-world data stages: relative paths only, a minute in all."""
  return command.startswith("python -m data_prep.") and not REAL_PATHS.search(command)


def _is_multiprocess(command: str) -> bool:
  return "--coordinator_address" in command or "--distributed" in command


LONG = {
  # command prefix -> the tests that cover it
  "python -m reldistill_jax.main --config configs/default.py": "tests/test_default.py",
  "python -m reldistill_jax.study": "tests/test_notebooks.py",  # 03 runs study.run_study
  "python benchmarks/": "tests/test_benchmarks_*.py",
}


def _long(command: str) -> str | None:
  return next((covered for prefix, covered in LONG.items() if command.startswith(prefix)), None)


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(1)
  env["PYTHONPATH"] = str(ROOT)
  return env


def _run(command: str, cwd: pathlib.Path, timeout: int = 600) -> subprocess.CompletedProcess:
  args = command.split()
  assert args[0] == "python", command
  return subprocess.run(
    [sys.executable, *args[1:]], cwd=cwd, env=_env(), capture_output=True, text=True,
    timeout=timeout,
  )  # fmt: skip


def test_every_command_is_classified():
  commands = readme_commands()
  assert len(commands) >= 15
  for command in commands:
    kinds = [
      _is_setup(command),
      _is_quick(command),
      bool(REAL_PATHS.search(command)) and not _is_multiprocess(command),
      _is_multiprocess(command),
      _long(command) is not None and not _is_quick(command),
    ]
    assert sum(kinds) == 1, f"README command not exercised by any test: {command}"


def test_setup_commands_are_what_ci_runs():
  setup = [c for c in readme_commands() if _is_setup(c)]
  assert len(setup) == 2, setup
  ci = (ROOT / ".ci" / "run").read_text()
  install, test = setup
  assert install.endswith(
    "pip install . && python -m reldistill_jax.main --config configs/default.py --workdir workdir/default"
  )
  assert 'pip install ".[test]" && python -m pytest -q' in test
  assert 'pip install --quiet ".[test' in ci and "\npython -m pytest -q --durations=15\n" in ci


@pytest.mark.slow
def test_synthetic_world_commands_run_verbatim(tmp_path):
  quick = [c for c in readme_commands() if _is_quick(c)]
  assert [c.split()[2] for c in quick] == [
    "data_prep.synthetic", "data_prep.build", "data_prep.voxelise", "data_prep.voxelise",
    "data_prep.teacher_features", "data_prep.text_embeddings",
  ]  # fmt: skip
  for command in quick:
    proc = _run(command, tmp_path)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
  work = tmp_path / "workdir"
  assert (work / "world" / "v1.0-synthetic" / "sample.json").is_file()
  assert (work / "tfds" / "nuscenes_lidarseg" / "v1.0-synthetic").is_dir()
  for store in ("buckets/train", "features/train"):
    assert (work / store / "manifest.json").is_file(), store
  assert (work / "text.npz").is_file()


@pytest.mark.slow
def test_real_data_commands_fail_only_on_missing_data(tmp_path):
  real = [c for c in readme_commands() if REAL_PATHS.search(c) and not _is_multiprocess(c)]
  assert len(real) >= 8
  checked = 0
  for command in real:
    paths = [m.group(0) for m in REAL_PATHS.finditer(command)]
    if any(pathlib.Path(p).exists() for p in paths):
      continue  # real data on this machine: running the command would use it
    checked += 1
    proc = _run(command, ROOT, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, command
    assert not any(bad in output for bad in BAD_USAGE), f"{command}\n{output[-3000:]}"
    named = [p for p in paths if p.rstrip("/").split(",")[0] in output]
    assert named, f"{command}: the error names none of {paths}\n{output[-3000:]}"
    # A command that fails on its inputs writes nothing (not even its output folder).
    made = [p for p in paths if pathlib.Path(p).exists()]
    assert not made, f"{command}: failed, yet created {made}"
  if not checked:
    pytest.skip("every real-data path of the README exists on this machine")


def _helpfull(modules: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
  """Each module's `--helpfull` output, the modules' processes run at once."""
  runs = run_at_once({module: [*module, "--helpfull"] for module in modules}, ROOT, _env())
  for run in runs.values():
    assert "--helpfull" in run.stdout, run.stderr[-2000:]  # absl prints it and exits 1
  return {module: run.stdout for module, run in runs.items()}


def test_flags_of_the_long_and_multiprocess_commands_exist():
  checked = []
  for command in readme_commands():
    covered = _long(command) or (
      "tests/test_multiprocess.py" if _is_multiprocess(command) else None
    )
    if covered is None or _is_quick(command):
      continue
    assert list(ROOT.glob(covered)), f"{command}: {covered} does not exist"
    args = command.split()
    checked.append((command, tuple(args[1:3] if args[1] == "-m" else args[1:2])))
  helps = _helpfull(sorted({module for _, module in checked}))
  for command, module in checked:
    for flag in re.findall(r"--(\w+)", command):
      if flag != "config":  # config_flags documents --config only
        assert f"--{flag}" in helps[module] or f"--[no]{flag}" in helps[module], (command, flag)
