"""Where a measurement ran: the records every benchmark in benchmarks/ writes.

machine       the host (node, cores, processor, platform, Python, load average)
devices       JAX's devices and the library versions
memory_limit  the bytes one device may use, and where that number comes from
"""

import os
import platform

import jax
import jaxlib


def machine(load_at_start: list[float] | None = None) -> dict:
  """The host; `load_at_start` (os.getloadavg() before the run) is kept beside the load now."""
  out = {
    "node": platform.node(),
    "cpu_count": os.cpu_count(),
    "processor": platform.processor() or platform.machine(),
    "platform": platform.platform(),
    "python": platform.python_version(),
  }
  if load_at_start is not None:
    out["load_average_at_start"] = list(load_at_start)
    out["load_average_at_end"] = list(os.getloadavg())
  return out


def devices(mesh: jax.sharding.Mesh | None = None) -> dict:
  """JAX's backend, device kind and count (and `mesh`'s shape), memory limit and versions."""
  import flax
  import optax

  local = jax.local_devices()
  stats = local[0].memory_stats() or {}
  out = {
    "backend": jax.default_backend(),
    "device_kind": local[0].device_kind,
    "device_count": jax.device_count(),
    "memory_bytes_limit": stats.get("bytes_limit"),
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "flax_version": flax.__version__,
    "optax_version": optax.__version__,
  }
  if mesh is not None:
    out["mesh"] = dict(mesh.shape)
  return out


def memory_limit() -> tuple[int | None, str]:
  """Bytes one device may use, and where that number comes from (the host's RAM on a CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"], "device memory_stats bytes_limit"
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host physical memory"
  except (ValueError, OSError):
    return None, "unknown"
