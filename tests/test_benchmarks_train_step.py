"""The training-step benchmark's smoke mode runs the real step and writes consistent JSON."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from reldistill_jax.models import point_encoder

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"

# The smoke run shards its batch of 2 over 2 simulated CPU devices, whatever the
# suite's XLA_FLAGS (8 devices) say.
ENV = {
  **os.environ,
  "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  "JAX_PLATFORMS": "cpu",
}

# XLA's cost analysis of the encoder's forward + backward counts every
# elementwise operation (LayerNorm, GELU, softmax, masks) on top of the
# matmuls the analytic count holds; on the CPU, where attention is plain XLA,
# it lies within this factor of the analytic capacity count (measured: 1.15 for
# the smoke's tiny encoder, 1.03 for `base` at capacity 16,384).
XLA_OVER_ANALYTIC = (0.9, 1.5)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("train_step") / "train_step.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--smoke", f"--out={out}"],
    capture_output=True,
    text=True,
    env=ENV,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_smoke_writes_every_field(smoke):
  result, stdout = smoke
  for field in ("benchmark", "machine", "devices", "date", "command", "settings", "results"):
    assert field in result, field
  devices = result["devices"]
  assert devices["backend"] == "cpu" and devices["jax_version"]
  assert devices["device_count"] == 2 and devices["mesh"] == {"data": 2}
  assert "--smoke" in result["command"]
  settings = result["settings"]
  assert settings["variant"] == "tiny" and settings["batch_size"] == 2 and settings["smoke"]
  assert settings["implementation_resolved"] == "xla" and settings["dtype"] == "bfloat16"
  # Stage 1: round_up(4096 * ratio, 256), restated.
  assert settings["stage_capacities"] == [4096, -(-4096 * settings["stage_ratio"] // 256) * 256]
  assert stdout.startswith("| metric | value |") and "| steps/s |" in stdout


def test_smoke_numbers_are_consistent(smoke):
  result, _ = smoke
  settings, r = result["settings"], result["results"]
  batch, slots = settings["batch_size"], settings["batch_size"] * settings["num_pairs"]
  assert r["status"] == "ok" and r["loss_finite"]
  assert len(r["step_times_s"]) == settings["steps"] == 2
  assert r["compile_s"] > 0 and r["num_params"] > 0
  assert math.isclose(r["steps_per_s"], 1 / r["step_s_mean"], rel_tol=1e-9)
  assert math.isclose(r["scans_per_s"], r["steps_per_s"] * batch, rel_tol=1e-9)
  # Valid pairs: counted by the step on the devices, and on the host batches.
  assert 0 < r["pairs_per_step"] <= slots == r["pair_slots_per_step"]
  assert r["pairs_per_step"] == r["flops"]["valid_pairs_per_step"]
  assert math.isclose(r["pairs_per_s"], r["pairs_per_step"] * r["steps_per_s"], rel_tol=1e-9)
  # The CPU keeps no peak statistics: the compiled estimate stands in, and says so.
  assert r["peak_bytes"] > 0 and "memory_analysis" in r["peak_source"]
  assert r["peak_bytes"] == r["compiled_memory"]["total_bytes"]
  # No bf16 peak on a CPU: MFU is null with a reason.
  assert r["mfu"] is None and r["encoder"]["mfu"] is None and r["peak_flops_per_device"] is None
  assert "CPU" in r["mfu_reason"]
  # Scans at nuScenes scale (an HDL-32E sweep of 34,688 rays, most of them hit).
  data = result["data"]
  assert data["scans"] == batch * settings["num_batches"]
  assert 28_000 < data["points_per_scan"]["mean"] < 34_688
  assert data["pairs_per_scan_available"]["min"] > settings["num_pairs"]


def test_smoke_flops_analytic_and_xla_agree(smoke):
  result, _ = smoke
  f, settings = result["results"]["flops"], result["settings"]
  for count in ("model", "capacity"):
    forward = f[f"encoder_forward_{count}"]
    assert forward["total"] == forward["conv"] + forward["linear"] + forward["attention"]
    assert f[f"encoder_fwd_bwd_{count}"] == 3 * forward["total"]
  # Valid voxels are a subset of the slots.
  assert 0 < f["encoder_fwd_bwd_model"] <= f["encoder_fwd_bwd_capacity"]
  lo, hi = XLA_OVER_ANALYTIC
  assert lo <= f["xla_over_analytic_encoder"] <= hi, f
  assert f["xla_encoder_fwd_bwd_total"] == 2 * f["xla_encoder_fwd_bwd_per_device"]
  # The relational kernel's five N x N x D products, N the padded pair rows.
  d, rows = settings["out_dim"], f["loss_pair_rows_executed"]
  assert rows >= settings["batch_size"] * settings["num_pairs"]
  assert f["loss_executed"] == 10 * rows**2 * d
  assert f["loss_model"] == 10 * f["valid_pairs_per_step"] ** 2 * d
  assert f["step_model"] == f["encoder_fwd_bwd_model"] + f["loss_model"]
  assert f["xla_step_total"] > 0


CHECK_AGAINST_PARAMS = """
import importlib.util, json, sys
import jax, numpy as np
spec = importlib.util.spec_from_file_location("train_step", sys.argv[1])
ts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ts)
out = {}
for variant in ("tiny", "small", "base"):
  stages = len(ts.point_encoder.VARIANTS[variant][0])
  shapes = ts.point_encoder.param_shapes(variant)
  weights = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes) if len(p.shape) > 1)
  n = 3 * 1024
  flops = ts.encoder_forward_flops(variant, [n] * stages, patch_size=1024, out_dim=512)
  out[variant] = [weights, flops]
print(json.dumps(out))
"""


def test_analytic_count_matches_the_model_parameters():
  """With every stage holding n voxels, each weight matrix (dense kernel, 27 x cin x cout
  convolution kernel) is applied once per voxel: conv + linear FLOPs = 2 n weights."""
  proc = subprocess.run(
    [sys.executable, "-c", CHECK_AGAINST_PARAMS, str(SCRIPT)],
    capture_output=True,
    text=True,
    env={**ENV, "XLA_FLAGS": ""},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for variant, (weights, flops) in json.loads(proc.stdout.splitlines()[-1]).items():
    n = 3 * 1024
    assert flops["conv"] + flops["linear"] == 2 * n * weights, variant
    # Attention: 4 K c FLOPs per voxel of every block (n fills 3 patches of K = 1024).
    enc_ch, enc_d, dec_ch, dec_d = point_encoder.VARIANTS[variant]
    widths = sum(c * d for c, d in zip(enc_ch + dec_ch, enc_d + dec_d, strict=True))
    assert flops["attention"] == 4 * 1024 * n * widths, variant
