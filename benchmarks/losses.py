"""Time and memory of the relational loss, forward and backward, on one device.

  python benchmarks/losses.py --out losses.json

For N in 4096 ... 131072 pairs, D = 512, bf16 and float32, it times
`jax.value_and_grad` (with respect to the student features) of

  naive   `losses.relational_loss` under jit: the N x N matrices materialised
          (it normalises, hence computes, in float32 whatever the input dtype);
  xla     `sharded_losses.relational_loss(implementation="xla")`: the blocked
          `lax.scan`, O(N * D) memory;
  pallas  the same with the Pallas kernel of this backend (`--pallas`, "auto":
          the Triton kernel on GPU, the Mosaic kernel on TPU; a CPU has none).

Each configuration is compiled first; when the compiled memory analysis
(arguments + outputs + scratch) exceeds `--memory_headroom` of the device's
memory, it is recorded as skipped with that estimate instead of run. Otherwise
it runs `--warmup` times, then `--repeats` timed runs (each waited for with
`block_until_ready`); the median is reported. Peak memory is the device's
`memory_stats()["peak_bytes_in_use"]`, measured in a fresh process per
configuration (`--isolate`, the default) so that peaks do not carry over;
where a backend keeps no such statistics (the CPU) it is the compiled memory
analysis estimate, and every record says which (`peak_source`).

Writes JSON (`--out`) with the machine, devices, jax version, date, command
and one record per configuration, and prints a markdown table. `--smoke` runs
tiny sizes in one process with one repetition (a test uses it); on a CPU it
times the GPU kernel in Pallas interpret mode so every path runs.
"""

import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from reldistill_jax import cli, hardware, losses
from reldistill_jax import sharded_losses as sl

_OUT = flags.DEFINE_string("out", "losses.json", "JSON output file.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes, one repetition, one process (tests).")
_N = flags.DEFINE_list("n", ["4096", "16384", "32768", "65536", "131072"], "Numbers of pairs N.")
_D = flags.DEFINE_integer("d", 512, "Feature size D.")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Input dtypes.")
_METHODS = flags.DEFINE_list("methods", ["naive", "xla", "pallas"], "Methods to time.")
_PALLAS = flags.DEFINE_enum(
  "pallas",
  "auto",
  ["auto", "pallas_gpu", "pallas_tpu", "interpret_gpu", "interpret_tpu"],
  "Kernel of the `pallas` method; auto: this backend's.",
)
_TILE_ROWS = flags.DEFINE_integer("tile_rows", None, "Pallas row tile (default: the kernel's).")
_TILE_COLS = flags.DEFINE_integer("tile_cols", None, "Pallas column tile (default: the kernel's).")
_XLA_TILE = flags.DEFINE_integer("xla_tile", None, "Tile of the xla scan (default: its own).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per configuration.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs before timing.")
_ISOLATE = flags.DEFINE_bool("isolate", True, "One fresh process per configuration.")
_HEADROOM = flags.DEFINE_float(
  "memory_headroom", 0.9, "Skip configurations estimated above this fraction of device memory."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random features.")
_ONE = flags.DEFINE_string("one", None, "Internal: run one METHOD:N:DTYPE and write --record.")
_RECORD = flags.DEFINE_string("record", None, "Internal: where --one writes its record.")

_SMOKE_SIZES = {"n": [200], "d": 32}
METHODS = ("naive", "xla", "pallas")


def _settings() -> dict:
  smoke = _SMOKE.value
  methods = [m for m in _METHODS.value if m]
  if unknown := set(methods) - set(METHODS):
    raise app.UsageError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
  return {
    "n": _SMOKE_SIZES["n"] if smoke else [int(n) for n in _N.value],
    "d": _SMOKE_SIZES["d"] if smoke else _D.value,
    "dtypes": _DTYPES.value,
    "methods": methods,
    "pallas": _PALLAS.value,
    "tiles": {"pallas": [_TILE_ROWS.value, _TILE_COLS.value], "xla": _XLA_TILE.value},
    "repeats": 1 if smoke else _REPEATS.value,
    "warmup": 1 if smoke else _WARMUP.value,
    "isolate": _ISOLATE.value and not smoke,
    "memory_headroom": _HEADROOM.value,
    "seed": _SEED.value,
    "smoke": smoke,
  }


# One configuration. With --isolate the orchestrating process never calls
# these, so it never starts the accelerator nor holds memory on it.


def _loss_fn(method: str, implementation: str, settings: dict):
  if method == "naive":
    return lambda k, q, m: losses.relational_loss(k, q, m)["loss"]
  tile = settings["tiles"]["xla"] if method == "xla" else settings["tiles"]["pallas"]
  if method == "pallas":
    rows, cols = tile
    tile = None if rows is None and cols is None else (rows or cols, cols or rows)
  return lambda k, q, m: sl.relational_loss(
    k, q, m, mesh=None, tile=tile, implementation=implementation
  )["loss"]


def _implementation(method: str, settings: dict) -> tuple[str | None, str | None]:
  """(implementation, reason it cannot run here or None)."""
  if method == "naive":
    return "naive", None
  if method == "xla":
    return "xla", None
  requested = settings["pallas"]
  if requested == "auto" and settings["smoke"]:
    requested = sl.resolve_implementation("auto")
    requested = "interpret_gpu" if requested == "xla" else requested
  resolved = sl.resolve_implementation(requested)
  if resolved == "xla":
    return None, f"no Pallas kernel for the {jax.default_backend()} backend"
  return resolved, None


def run_one(method: str, n: int, dtype_name: str, settings: dict) -> dict:
  """Compiles, checks the memory estimate, then times one configuration."""
  d = settings["d"]
  record = {"method": method, "n": n, "d": d, "dtype": dtype_name}
  implementation, reason = _implementation(method, settings)
  record["implementation"] = implementation
  if reason:
    return {**record, "status": "skipped", "reason": reason}

  dtype = jnp.dtype(dtype_name)
  key_k, key_q, key_m = jax.random.split(jax.random.key(settings["seed"]), 3)
  k = jax.random.normal(key_k, (n, d), dtype)
  q = jax.random.normal(key_q, (n, d), dtype)
  mask = jax.random.uniform(key_m, (n,)) < 0.9
  step = jax.jit(jax.value_and_grad(_loss_fn(method, implementation, settings)))

  start = time.perf_counter()
  compiled = step.lower(k, q, mask).compile()
  record["compile_s"] = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  estimate = None
  if analysis is not None:
    record["compiled_memory"] = {
      "argument_bytes": analysis.argument_size_in_bytes,
      "output_bytes": analysis.output_size_in_bytes,
      "temp_bytes": analysis.temp_size_in_bytes,
      "alias_bytes": analysis.alias_size_in_bytes,
    }
    estimate = (
      analysis.argument_size_in_bytes
      + analysis.output_size_in_bytes
      + analysis.temp_size_in_bytes
      - analysis.alias_size_in_bytes
    )
  limit, limit_source = hardware.memory_limit()
  record["memory_estimate_bytes"] = estimate
  if estimate is not None and limit is not None and estimate > settings["memory_headroom"] * limit:
    reason = (
      f"compiled memory analysis needs {_size(estimate)}, over "
      f"{settings['memory_headroom']:.0%} of {_size(limit)} ({limit_source})"
    )
    return {**record, "status": "skipped", "reason": reason}

  for _ in range(settings["warmup"]):
    jax.block_until_ready(compiled(k, q, mask))
  times = []
  for _ in range(settings["repeats"]):
    start = time.perf_counter()
    loss, _ = jax.block_until_ready(compiled(k, q, mask))
    times.append(time.perf_counter() - start)

  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak = stats["peak_bytes_in_use"]
    source = "device memory_stats peak_bytes_in_use" + (
      " (fresh process)" if settings["isolate"] else " (whole process so far: an upper bound)"
    )
  else:
    peak, source = estimate, "compiled memory_analysis arguments + outputs + temp"
  return {
    **record,
    "status": "ok",
    "median_ms": 1e3 * statistics.median(times),
    "min_ms": 1e3 * min(times),
    "times_ms": [1e3 * t for t in times],
    "loss": float(loss),
    "peak_bytes": peak,
    "peak_source": source,
  }


# Orchestration.


def _run_isolated(method: str, n: int, dtype_name: str) -> dict:
  """run_one in a fresh process, so its peak memory is its own."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "record.json"
    args = [sys.executable, __file__, *sys.argv[1:], f"--one={method}:{n}:{dtype_name}"]
    proc = subprocess.run([*args, f"--record={path}"], capture_output=True, text=True)
    if proc.returncode == 0 and path.exists():
      return json.loads(path.read_text())
  record = {"method": method, "n": n, "d": _D.value, "dtype": dtype_name}
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {**record, "status": "failed", "reason": " / ".join(tail) or f"exit {proc.returncode}"}


def _size(x: float | None) -> str:
  if x is None:
    return "-"
  return f"{x / 2**20:,.0f} MiB" if x >= 2**20 else f"{x / 2**10:,.0f} KiB"


def _table(results: list[dict]) -> str:
  lines = [
    "| N | dtype | method | kernel | median ms | peak memory | note |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    ms = f"{r['median_ms']:.2f}" if r["status"] == "ok" else r["status"]
    note = r.get("reason", "") if r["status"] != "ok" else f"loss {r['loss']:.6f}"
    lines.append(
      f"| {r['n']} | {r['dtype']} | {r['method']} | {r.get('implementation') or '-'} | {ms} "
      f"| {_size(r.get('peak_bytes'))} | {note} |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  settings = _settings()
  if _ONE.value:
    method, n, dtype_name = _ONE.value.split(":")
    record = {**run_one(method, int(n), dtype_name, settings), "devices": hardware.devices()}
    pathlib.Path(_RECORD.value).write_text(json.dumps(record))
    return

  results = []
  for n in settings["n"]:
    for dtype_name in settings["dtypes"]:
      for method in settings["methods"]:
        if settings["isolate"]:
          record = _run_isolated(method, n, dtype_name)
        else:
          try:
            record = run_one(method, n, dtype_name, settings)
          except Exception as e:  # Recorded; the other configurations still run.
            record = {"method": method, "n": n, "d": settings["d"], "dtype": dtype_name}
            record |= {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
        print(f"{method} N={n} {dtype_name}: {record['status']}", file=sys.stderr, flush=True)
        results.append(record)

  # In isolated runs the orchestrating process never starts the accelerator;
  # the children report the devices instead.
  if settings["isolate"]:
    children = [r.pop("devices") for r in results if "devices" in r]
    devices = children[0] if children else None
  else:
    devices = hardware.devices()
  result = {
    "benchmark": "relational loss, value_and_grad with respect to the student features",
    "machine": hardware.machine(),
    "devices": devices,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
    "settings": settings,
    "results": results,
  }
  pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=2))
  print(_table(results))


if __name__ == "__main__":
  cli.run(main)
