"""Multi-process (multi-host) set-up: joining the cluster and each process's batch slice.

One process runs per host (or per GPU); every process runs the same program on
the global mesh of all processes' devices, reads only its own slice of every
global batch and assembles the global batch with
`jax.make_array_from_process_local_data`.

`initialize` must run before anything touches a JAX backend (`jax.devices()`,
a computation, a `device_put`). On CPU, jax >= 0.5 uses gloo collectives
across processes by default (`jax_cpu_collectives_implementation`).
"""

import jax
from absl import logging

from reldistill_jax import errors


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  auto: bool = False,
) -> bool:
  """Joins a multi-process JAX cluster; returns whether it did.

  Nothing happens (a single-process run) unless `auto` is set or one of the
  three arguments is given. Arguments left None are detected by
  `jax.distributed.initialize` (Cloud TPU pod slices, SLURM, Open MPI,
  Kubernetes; the coordinator also from the environment variable
  `JAX_COORDINATOR_ADDRESS`).
  """
  if not auto and coordinator_address is None and num_processes is None and process_id is None:
    return False
  if jax.distributed.is_initialized():
    return True
  logging.info(
    "jax.distributed.initialize(coordinator_address=%s, num_processes=%s, process_id=%s)",
    coordinator_address,
    num_processes,
    process_id,
  )
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  except ValueError as e:
    if "defined" not in str(e):  # not a setting JAX could not detect
      raise
    raise errors.ConfigError(
      f"jax.distributed.initialize: {e} No cluster (Cloud TPU pod slice, SLURM, Open MPI) "
      "was detected to tell it: pass --coordinator_address, --num_processes and --process_id"
    ) from e
  logging.info(
    "process %d of %d: %d local of %d devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def batch_slice(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
  """(index, count): this process holds block `index` of `count` equal blocks of the leading
  axis of a global batch of `batch_size` laid out by `sharding`.

  The block is where `jax.make_array_from_process_local_data` puts this process's rows, so a
  process must read exactly that slice of every global batch; it is the process index only
  when the mesh orders devices by process.

  Raises:
    ValueError: when this process holds no devices of the sharding, or a leading-axis range
      that is not one contiguous block of equal size to every other process's.
  """
  indices = sharding.addressable_devices_indices_map((batch_size,))
  if not indices:
    raise errors.ConfigError(
      f"process {jax.process_index()} holds none of the mesh's devices: the data axis must "
      "span every process (config.mesh.data = -1)"
    )
  rows = sorted(
    {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in indices.values()}
  )
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  size = stop - start
  if covered != size or batch_size % size or start % size:
    raise errors.ConfigError(
      f"process {jax.process_index()} holds rows {rows} of a batch of {batch_size}: not one "
      "contiguous equal block per process"
    )
  return start // size, batch_size // size
