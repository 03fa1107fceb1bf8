"""Test set-up shared by every test module.

Eight host devices are simulated so that sharded code runs on a CPU; this must
happen before JAX initialises its backend, hence at import time here.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

REALDATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> pathlib.Path:
  """The real sensor samples shipped beside the repository (`../shared/realdata`)."""
  if not REALDATA.is_dir():
    pytest.skip(
      f"real data samples not found at {REALDATA} (they live beside the repository in CI)"
    )
  return REALDATA
