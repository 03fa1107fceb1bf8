"""Teacher throughput (images/s) and feature-store size per sample.

  python benchmarks/teacher.py --out teacher.json [--teachers clip_b16,dinov2_b14] [--batch 12]
      [--dense maskclip,naclip]

Times the dense-feature forward pass of the named image towers
(`reldistill_jax.models.vit.VARIANTS`; speed does not depend on the weights,
so random ones are used) at the field's image sizes (224x416 for /16,
224x420 for /14), with each `--dense` rule for the image-text towers (CLIP,
SigLIP 2; the others use their own), jitted, median of `--repeats` runs after a warm-up, on the
default backend. Also reports the fp16 store bytes per sample (six cameras)
of each grid. Writes JSON and prints a markdown table. `--smoke` runs a tiny
tower (a test uses it).
"""

import dataclasses
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from reldistill_jax import cli, hardware
from reldistill_jax.models import vit

_OUT = flags.DEFINE_string("out", "teacher.json", "JSON output file.")
_TEACHERS = flags.DEFINE_list("teachers", ["clip_b16", "dinov2_b14"], "vit.VARIANTS names.")
_BATCH = flags.DEFINE_integer("batch", 12, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_DENSE = flags.DEFINE_list(
  "dense", [], "Dense rules for the image-text towers (default: each tower's own)."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny tower, one repetition.")


def measure(
  name: str, config: vit.ViTConfig, size: tuple[int, int], batch: int, repeats: int, dtype
):
  """Median seconds per batch of the jitted dense-feature pass, and the grid."""
  model = vit.ViT(config, dtype=dtype)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *size, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images[:1])
  apply = jax.jit(lambda p, x: model.apply(p, x)[0])
  jax.block_until_ready(apply(params, images))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(apply(params, images))
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  grid = out.shape[1:3]
  return {
    "teacher": name,
    "dense": config.dense_output,
    "image_size": list(size),
    "grid": list(grid),
    "feature_dim": int(out.shape[-1]),
    "batch": batch,
    "dtype": str(jnp.dtype(dtype)),
    "seconds_per_batch": seconds,
    "images_per_second": batch / seconds,
    "store_bytes_per_sample_fp16": int(6 * grid[0] * grid[1] * out.shape[-1] * 2),
  }


def main(argv):
  del argv
  if _SMOKE.value:
    jobs = [("tiny_clip", vit.clip_config(64, 1, 16, 14, 32), (32, 64))]
    batch, repeats = 2, 1
  else:
    jobs = []
    for name in _TEACHERS.value:
      config = vit.VARIANTS[name]
      size = (224, 416) if config.patch_size == 16 else (224, 420)
      rules = (_DENSE.value or [config.dense_output]) if config.text_aligned else []
      for dense in rules or [config.dense_output]:
        jobs.append((name, dataclasses.replace(config, dense_output=dense), size))
    batch, repeats = _BATCH.value, _REPEATS.value
  results = [measure(n, c, s, batch, repeats, jnp.dtype(_DTYPE.value)) for n, c, s in jobs]
  device = jax.devices()[0]
  report = {
    "benchmark": "teacher dense features",
    "machine": hardware.machine(),
    "device": f"{device.platform} {device.device_kind}",
    "jax_version": jax.__version__,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join(["benchmarks/teacher.py", *sys.argv[1:]]),
    "results": results,
  }
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=2)
  print("| teacher | dense | image | grid x D | batch | images/s | store MB/sample (fp16) |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['teacher']} | {r['dense']} | {r['image_size'][0]}x{r['image_size'][1]} | "
      f"{r['grid'][0]}x{r['grid'][1]}x{r['feature_dim']} | {r['batch']} | "
      f"{r['images_per_second']:.2f} | {r['store_bytes_per_sample_fp16'] / 1e6:.2f} |"
    )


if __name__ == "__main__":
  cli.run(main)
