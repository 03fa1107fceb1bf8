"""The training-step benchmark's smoke mode runs the real step and writes consistent JSON."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags

from reldistill_jax.models import point_encoder

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"

# The smoke run shards its batch of 2 over 2 simulated CPU devices, whatever the
# suite's XLA_FLAGS (8 devices) say.
ENV = {
  **os.environ,
  "XLA_FLAGS": xla_flags(2),
  "JAX_PLATFORMS": "cpu",
}

# XLA's cost analysis of the encoder's forward + backward counts every
# elementwise operation (LayerNorm, GELU, softmax, masks) on top of the
# matmuls the analytic count holds, and the body of the loop that runs the CPU's
# attention once; it lies within this factor of the analytic executed count.
XLA_OVER_ANALYTIC = (0.5, 1.5)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One smoke run of both layouts (about 40 s, so its tests are slow)."""
  out = tmp_path_factory.mktemp("train_step") / "train_step.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--smoke", "--layout=packed", "--layout=padded", f"--out={out}"],
    capture_output=True,
    text=True,
    env=ENV,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [r["name"] for r in result["runs"]] == ["packed", "padded 8192"]
  return result, proc.stdout


def _run(result, name="packed"):
  """The settings, data and results of one run."""
  return next(r for r in result["runs"] if r["name"] == name)


@pytest.mark.slow
def test_smoke_writes_every_field(smoke):
  result, stdout = smoke
  for field in ("benchmark", "machine", "devices", "date", "command", "runs"):
    assert field in result, field
  devices = result["devices"]
  assert devices["backend"] == "cpu" and devices["jax_version"]
  assert devices["device_count"] == 2 and devices["mesh"] == {"data": 2}
  assert "--smoke" in result["command"]
  settings = _run(result)["settings"]
  assert settings["variant"] == "tiny" and settings["batch_size"] == 2 and settings["smoke"]
  assert settings["implementation_resolved"] == "xla" and settings["dtype"] == "bfloat16"
  assert settings["layout"] == "packed" and settings["pack_size"] == 1
  assert stdout.startswith("| metric | packed | padded 8192 |") and "| steps/s |" in stdout


@pytest.mark.slow
def test_smoke_numbers_are_consistent(smoke):
  result, _ = smoke
  settings, r = _run(result)["settings"], _run(result)["results"]
  batch, slots = settings["batch_size"], settings["batch_size"] * settings["num_pairs"]
  assert r["status"] == "ok" and r["loss_finite"]
  assert len(r["step_times_s"]) == settings["steps"] == 2
  assert r["compile_s"] > 0 and r["num_params"] > 0
  assert math.isclose(r["steps_per_s"], 1 / r["step_s_mean"], rel_tol=1e-9)
  scans = _run(result)["data"]["scans_per_step_stepped"]
  assert scans == batch  # packs of one scan: every pack full
  assert math.isclose(r["scans_per_s"], r["steps_per_s"] * scans, rel_tol=1e-9)
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
  # The packing statistics: every voxel of every scan in its pack.
  data = _run(result)["data"]
  assert data["scans"] == batch * settings["num_batches"] and data["dropped_voxels_total"] == 0
  for fill in data["budget_fill"].values():
    assert all(0 < f <= 1 for f in fill)


@pytest.mark.slow
def test_smoke_flops_analytic_and_xla_agree(smoke):
  result, _ = smoke
  f, settings = _run(result)["results"]["flops"], _run(result)["settings"]
  for count in ("model", "executed"):
    forward = f[f"encoder_forward_{count}"]
    assert forward["total"] == forward["conv"] + forward["linear"] + forward["attention"]
    assert f[f"encoder_fwd_bwd_{count}"] == 3 * forward["total"]
  # Valid voxels are a subset of the tokens.
  assert 0 < f["encoder_fwd_bwd_model"] <= f["encoder_fwd_bwd_executed"]
  assert f["executed_over_model"] == f["step_executed"] / f["step_model"] >= 1
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
sys.path.insert(0, sys.argv[2])
from benchmarks import flops as ts
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
    [sys.executable, "-c", CHECK_AGAINST_PARAMS, str(SCRIPT), str(SCRIPT.parents[1])],
    capture_output=True,
    text=True,
    env={**ENV, "XLA_FLAGS": xla_flags()},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  for variant, (weights, flops) in json.loads(proc.stdout.splitlines()[-1]).items():
    n = 3 * 1024
    assert flops["conv"] + flops["linear"] == 2 * n * weights, variant
    # Attention: 4 K c FLOPs per voxel of every block (n fills 3 patches of K = 1024).
    enc_ch, enc_d, dec_ch, dec_d = point_encoder.VARIANTS[variant]
    widths = sum(c * d for c, d in zip(enc_ch + dec_ch, enc_d + dec_d, strict=True))
    assert flops["attention"] == 4 * 1024 * n * widths, variant


@pytest.mark.slow
def test_the_padded_layout_executes_what_its_capacities_hold(smoke):
  """The layout before packing, measured in the same run on the same scans: one scan a pack,
  every stage at round_up(C0 ratio^s, K); it executes more than the packs."""
  result, _ = smoke
  padded, packed = _run(result, "padded 8192"), _run(result)
  caps = [-(-8192 * 0.75**s // 256) * 256 for s in range(2)]
  assert padded["data"]["budgets"] == {"tokens": caps, "attention": caps}
  assert padded["settings"]["pack_size"] == 1 and padded["data"]["dropped_voxels_total"] == 0
  f, g = padded["results"]["flops"], packed["results"]["flops"]
  assert f["encoder_fwd_bwd_model"] == g["encoder_fwd_bwd_model"]  # the same scans
  assert f["encoder_fwd_bwd_executed"] > g["encoder_fwd_bwd_executed"]


def test_minkunet_executed_count_matches_its_parameters():
  """Every stage at n tokens: each kernel (27 taps, 8 octants, 1x1) runs once per token (a
  strided one once per parent token over its 8 slots), so executed FLOPs = 2 n kernel weights;
  the useful count runs a strided kernel once per child, an eighth of its weights."""
  from benchmarks import flops
  from reldistill_jax.models import minkunet

  for variant in minkunet.VARIANTS:
    shapes = jax.eval_shape(
      minkunet.Model(variant=variant, out_dim=64).init, jax.random.key(0),
      minkunet.example_batch(4),
    )["params"]  # fmt: skip
    kernels = [p for p in jax.tree.leaves(shapes) if len(p.shape) > 1]
    weights = sum(int(np.prod(p.shape)) for p in kernels)
    strided = sum(int(np.prod(p.shape)) for p in kernels if p.shape[0] == 8)
    n = 1000
    executed = flops.minkunet_forward_flops(variant, [n] * 5, out_dim=64, executed=True)
    useful = flops.minkunet_forward_flops(variant, [n] * 5, out_dim=64, executed=False)
    assert executed["total"] == 2 * n * weights, variant
    assert useful["total"] == 2 * n * (weights - strided + strided // 8), variant


@pytest.mark.slow
def test_minkunet_smoke_runs_beside_the_attention_encoder(tmp_path):
  out = tmp_path / "mink.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--smoke", "--model=point_encoder,minkunet", "--layout=packed",
     "--noencoder", f"--out={out}"],
    capture_output=True, text=True, env=ENV,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads(out.read_text())["runs"]
  assert [r["name"] for r in runs] == ["point_encoder packed", "minkunet packed"]
  mink = runs[1]
  assert mink["settings"]["model"] == "minkunet" and mink["settings"]["variant"] == "tiny"
  assert mink["settings"]["num_stages"] == 5 and "model=minkunet34c" in mink["settings"]["config"]
  r = mink["results"]
  assert r["status"] == "ok" and r["loss_finite"] and r["num_params"] > 0
  f = r["flops"]
  assert 0 < f["encoder_fwd_bwd_model"] <= f["encoder_fwd_bwd_executed"]
  assert mink["data"]["dropped_voxels_total"] == 0
