"""Every command line has a --help that says what it reads and what it writes."""

import pathlib

import pytest
from conftest import RunsInGroups

ROOT = pathlib.Path(__file__).resolve().parents[1]
# command -> whether it reads input files (else it only generates or measures).
CLIS = {
  "-m data_prep.synthetic": False,
  "-m data_prep.build": True,
  "-m data_prep.voxelise": True,
  "-m data_prep.teacher_features": True,
  "-m data_prep.text_embeddings": True,
  "-m reldistill_jax.main": True,
  "-m reldistill_jax.study": False,
  "-m reldistill_jax.models.point_encoder": False,
  "-m reldistill_jax.models.waffleiron": False,
  "benchmarks/data_prep.py": False,
  "benchmarks/losses.py": False,
  "benchmarks/teacher.py": False,
  "benchmarks/train_step.py": False,
  "benchmarks/input_pipeline.py": True,
  "benchmarks/class_stats.py": True,
  "benchmarks/capacity.py": True,
  "benchmarks/regime.py": False,
}


def test_every_cli_is_listed():
  listed = {c.split()[-1] for c in CLIS}
  scripts = [p for p in (ROOT / "benchmarks").glob("*.py") if "__main__" in p.read_text()]
  assert {f"benchmarks/{p.name}" for p in scripts} <= listed


@pytest.fixture(scope="module")
def helps() -> RunsInGroups:
  """Every command's --help, the processes started a few at once (each is mostly imports)."""
  return RunsInGroups({command: [*command.split(), "--help"] for command in CLIS}, ROOT)


@pytest.mark.parametrize("command", list(CLIS))
def test_help_says_what_it_reads_and_writes(command, helps):
  proc = helps[command]
  text = proc.stdout + proc.stderr
  assert proc.returncode in (0, 1) and "Traceback" not in text, text[-2000:]  # absl exits 1
  lower = text.lower()
  assert "writes" in lower or "prints" in lower or "write" in lower, f"{command}: no output named"
  if CLIS[command]:
    assert "reads" in lower or "read " in lower, f"{command}: no input named\n{text[:1500]}"
