"""MinkUNet against spconv 2.3 and torch on real nuScenes scans: every operation, the whole
Res16UNet34C restated with spconv, the parameter count, and the packed layout."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax import input_pipeline, packing, runtime, serialization
from reldistill_jax.models import layers, minkunet

torch = pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
spconv = pytest.importorskip("spconv.pytorch", reason="the parity extra (spconv) is not installed")

STAGES = minkunet.NUM_STAGES
PATCH = 64
MOMENTUM = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """spconv's CPU kernels race with more than one thread: the same forward pass then changes
  from call to call (by up to 4 on features of magnitude 40, measured on this scan)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scans(realdata) -> list[dict]:
  """Two buckets of the real nuScenes sweep (the near ring and a far sector), 5 stages."""
  path = next((realdata / "mmdetection3d-nuscenes-demo" / "samples" / "LIDAR_TOP").glob("*.bin"))
  points = np.fromfile(path, "<f4").reshape(-1, 5)
  radius = np.linalg.norm(points[:, :2], axis=1)
  parts = [points[radius < 15][:4000], points[(radius >= 15) & (points[:, 1] < 0)][:2500]]
  return [
    serialization.build_bucket(p, token=f"part-{i}", num_stages=STAGES, voxel_size=0.2)
    for i, p in enumerate(parts)
  ]


def _batch(*packs, extra: int = 0) -> dict[str, jax.Array]:
  """A batch of packs (each a list of buckets) in budgets holding the largest plus `extra`."""
  budgets = [packing.budgets_for(np.array([b["counts"] for b in g]), PATCH, extra) for g in packs]
  widest = packing.Budgets(
    tuple(np.max([b.tokens for b in budgets], axis=0).tolist()),
    tuple(np.max([b.attention for b in budgets], axis=0).tolist()),
    max(b.scans for b in budgets),
    PATCH,
  )
  transform = input_pipeline.Transform(0, 1 / 255)
  packed = [packing.pack([transform(b) for b in group], widest) for group in packs]
  stacked = input_pipeline.stack(packed)
  return {k: jnp.asarray(v) for k, v in stacked.items() if k not in input_pipeline.HOST_KEYS}


# ----------------------------------------------------------------------------
# spconv on the same voxels.
# ----------------------------------------------------------------------------


def _sparse(scans, stage: int, features: np.ndarray):
  """An spconv tensor of the scans' stage-`stage` voxels (in the buckets' order, scan after
  scan, batch index = scan), on a grid that halves exactly down to the last stage."""
  coords = [b[f"s{stage}/coords"] for b in scans]
  extent = np.max([c.max(0) for c in coords], axis=0) + 1
  size = (-(-extent // 2 ** (STAGES - stage)) * 2 ** (STAGES - stage)).tolist()
  index = np.concatenate([np.c_[np.full(len(c), i), c] for i, c in enumerate(coords)])
  return spconv.SparseConvTensor(
    torch.from_numpy(np.asarray(features, np.float32)),
    torch.from_numpy(index.astype(np.int32)),
    size,
    len(scans),
  )


def _subm_kernel(weight) -> np.ndarray:
  """spconv's (cout, 3, 3, 3, cin) submanifold weight as our (27, cin, cout) kernel: column j
  of the neighbour map is offset NEIGHBOR_OFFSETS[j] (spconv correlates: x[i + offset])."""
  w = weight.detach().numpy()
  return np.stack([w[:, dx + 1, dy + 1, dz + 1, :].T for dx, dy, dz in _offsets()])


def _octant_kernel(weight) -> np.ndarray:
  """spconv's (cout, 2, 2, 2, cin) stride-2 weight as our (8, cin, cout): octant 4a + 2b + c."""
  w = weight.detach().numpy()
  return np.stack([w[:, a, b, c, :].T for a, b, c in itertools.product((0, 1), repeat=3)])


def _offsets():
  return [tuple(o) for o in serialization.NEIGHBOR_OFFSETS.tolist()]


def _rows(batch, stage: int) -> np.ndarray:
  return np.asarray(batch[f"s{stage}/mask"][0])


def _spconv_rows(tensor, scans, stage: int) -> np.ndarray:
  """The row of an spconv output tensor holding each of our stage-`stage` voxels."""
  index = tensor.indices.numpy()
  lookup = {tuple(row): i for i, row in enumerate(index.tolist())}
  ours = np.concatenate([np.c_[np.full(b["counts"][stage], i), b[f"s{stage}/coords"]]
                         for i, b in enumerate(scans)])  # fmt: skip
  return np.array([lookup[tuple(row)] for row in ours.tolist()])


# ----------------------------------------------------------------------------
# Each operation.
# ----------------------------------------------------------------------------


def test_submanifold_convolution_equals_spconv(scans):
  torch.manual_seed(0)
  batch = _batch(scans, extra=50)
  x = np.asarray(batch["features"][0])
  valid = _rows(batch, 0)
  conv = spconv.SubMConv3d(4, 16, 3, bias=False, indice_key="subm0")
  want = conv(_sparse(scans, 0, x[valid])).features.detach().numpy()
  got = layers.sparse_conv(batch["features"], batch["s0/neighbors"], _subm_kernel(conv.weight))
  assert got.shape == (1, valid.size, 16) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got[0])[valid], want, atol=1e-5, rtol=1e-5)


def test_strided_and_transposed_convolutions_equal_spconv(scans):
  torch.manual_seed(1)
  batch = _batch(scans, extra=50)
  x = np.random.default_rng(0).standard_normal((batch["s0/mask"].shape[1], 8), np.float32)
  valid0, valid1 = _rows(batch, 0), _rows(batch, 1)
  down = spconv.SparseConv3d(8, 12, 2, stride=2, bias=False, indice_key="down1")
  coarse = down(_sparse(scans, 0, x[valid0]))
  rows = _spconv_rows(coarse, scans, 1)
  got = minkunet.down_conv(
    jnp.asarray(x)[None], batch["s0/parent"], batch["s0/octant"], _octant_kernel(down.weight),
    valid1.size,
  )  # fmt: skip
  np.testing.assert_allclose(
    np.asarray(got[0])[valid1], coarse.features.detach().numpy()[rows], atol=1e-5, rtol=1e-5
  )

  # Transposed: our stage-1 features, placed in spconv's order, back to stage 0.
  y = np.random.default_rng(1).standard_normal((valid1.size, 12), np.float32)
  placed = np.zeros((len(rows), 12), np.float32)
  placed[rows] = y[valid1]
  up = spconv.SparseInverseConv3d(12, 6, 2, indice_key="down1", bias=False)
  want = up(coarse.replace_feature(torch.from_numpy(placed))).features.detach().numpy()
  got = minkunet.up_conv(
    jnp.asarray(y)[None], batch["s0/parent"], batch["s0/octant"], _octant_kernel(up.weight)
  )
  np.testing.assert_allclose(np.asarray(got[0])[valid0], want, atol=1e-5, rtol=1e-5)


def test_masked_batch_norm_equals_torch_and_ignores_padding(scans):
  batch = _batch(scans, extra=300)
  valid = _rows(batch, 0)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, valid.size, 5), np.float32) * 3 + 1
  x[0, ~valid] = 1e4  # padding must not move the statistics
  bn = torch.nn.BatchNorm1d(5, momentum=MOMENTUM, eps=1e-5)
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 5).astype(np.float32)))
    bn.bias.copy_(torch.from_numpy(rng.standard_normal(5).astype(np.float32)))
  want = bn(torch.from_numpy(x[0, valid])).detach().numpy()
  module = minkunet.MaskedBatchNorm(MOMENTUM)
  mask = jnp.asarray(valid)[None]
  variables = module.init(jax.random.key(0), jnp.asarray(x), mask)
  variables["params"] = {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()}
  got, updated = module.apply(variables, jnp.asarray(x), mask, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got[0])[valid], want, atol=1e-5, rtol=1e-5)
  assert not np.any(np.asarray(got[0])[~valid])
  stats = updated["batch_stats"]
  np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), atol=1e-6, rtol=1e-5)

  # Evaluation: the running statistics, in both.
  bn.eval()
  variables["batch_stats"] = stats
  got = module.apply(variables, jnp.asarray(x), mask)
  want = bn(torch.from_numpy(x[0, valid])).detach().numpy()
  np.testing.assert_allclose(np.asarray(got[0])[valid], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Res16UNet34C restated with spconv.
# ----------------------------------------------------------------------------


class _Norm(torch.nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.bn = torch.nn.BatchNorm1d(channels, momentum=MOMENTUM, eps=1e-5)

  def forward(self, t):
    return t.replace_feature(self.bn(t.features))


def _relu(t):
  return t.replace_feature(torch.relu(t.features))


class _Block(torch.nn.Module):
  def __init__(self, inplanes, planes, key):
    super().__init__()
    self.conv1 = spconv.SubMConv3d(inplanes, planes, 3, bias=False, indice_key=key)
    self.bn1 = _Norm(planes)
    self.conv2 = spconv.SubMConv3d(planes, planes, 3, bias=False, indice_key=key)
    self.bn2 = _Norm(planes)
    self.downsample = torch.nn.Linear(inplanes, planes, bias=False) if inplanes != planes else None
    self.downsample_bn = _Norm(planes) if inplanes != planes else None

  def forward(self, t):
    out = self.bn2(self.conv2(_relu(self.bn1(self.conv1(t)))))
    residual = t
    if self.downsample is not None:
      residual = self.downsample_bn(t.replace_feature(self.downsample(t.features)))
    return out.replace_feature(torch.relu(out.features + residual.features))


class _Res16UNet(torch.nn.Module):
  """MinkowskiEngine's Res16UNet with spconv operations, module names as ours."""

  def __init__(self, variant, in_channels, out_dim):
    super().__init__()
    init_dim, planes, depths = minkunet.VARIANTS[variant]
    m = torch.nn.ModuleDict()
    m["conv0"] = spconv.SubMConv3d(in_channels, init_dim, 3, bias=False, indice_key="subm0")
    m["bn0"] = _Norm(init_dim)
    width, widths = init_dim, [init_dim]
    for s in range(1, STAGES):
      m[f"down{s}"] = spconv.SparseConv3d(width, width, 2, stride=2, bias=False,
                                          indice_key=f"down{s}")  # fmt: skip
      m[f"down{s}_bn"] = _Norm(width)
      for d in range(depths[s - 1]):
        m[f"block{s}_{d}"] = _Block(width if d == 0 else planes[s - 1], planes[s - 1], f"subm{s}")
      width = planes[s - 1]
      widths.append(width)
    for i, s in enumerate(reversed(range(STAGES - 1)), start=4):
      m[f"up{s}"] = spconv.SparseInverseConv3d(width, planes[i], 2, indice_key=f"down{s + 1}",
                                               bias=False)  # fmt: skip
      m[f"up{s}_bn"] = _Norm(planes[i])
      for d in range(depths[i]):
        inplanes = planes[i] + widths[s] if d == 0 else planes[i]
        m[f"block{i + 1}_{d}"] = _Block(inplanes, planes[i], f"subm{s}")
      width = planes[i]
    m["final"] = torch.nn.Linear(width, out_dim, bias=True)
    self.m, self.depths = m, depths

  def forward(self, t):
    m = self.m
    t = _relu(m["bn0"](m["conv0"](t)))
    skips = [t]
    for s in range(1, STAGES):
      t = _relu(m[f"down{s}_bn"](m[f"down{s}"](t)))
      for d in range(self.depths[s - 1]):
        t = m[f"block{s}_{d}"](t)
      skips.append(t)
    for i, s in enumerate(reversed(range(STAGES - 1)), start=4):
      t = _relu(m[f"up{s}_bn"](m[f"up{s}"](t)))
      t = t.replace_feature(torch.cat([t.features, skips[s].features], 1))
      for d in range(self.depths[i]):
        t = m[f"block{i + 1}_{d}"](t)
    y = m["final"](t.features)
    return y / torch.linalg.norm(y, dim=1, keepdim=True)


def _copy_weights(net: _Res16UNet, variables: dict) -> dict:
  """Our variables with every weight and statistic taken from the restatement."""
  params, stats = {}, {}
  for name, module in net.m.named_modules():
    key = name.split(".")
    if isinstance(module, _Norm):
      _put(params, key, {"scale": module.bn.weight.detach().numpy(),
                         "bias": module.bn.bias.detach().numpy()})  # fmt: skip
      _put(stats, key, {"mean": module.bn.running_mean.numpy().copy(),
                        "var": module.bn.running_var.numpy().copy()})  # fmt: skip
    elif isinstance(module, spconv.SubMConv3d):
      _put(params, key, {"kernel": _subm_kernel(module.weight)})
    elif isinstance(module, (spconv.SparseConv3d, spconv.SparseInverseConv3d)):
      _put(params, key, {"kernel": _octant_kernel(module.weight)})
    elif isinstance(module, torch.nn.Linear) and name != "final":
      _put(params, key, {"kernel": module.weight.detach().numpy().T[None]})
  params["final"] = {"kernel": net.m["final"].weight.detach().numpy().T[None]}
  params["final_bias"] = net.m["final"].bias.detach().numpy()
  out = {"params": params, "batch_stats": stats}
  assert jax.tree.structure(out) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(variables), strict=True):
    assert a.shape == b.shape
  return out


def _put(tree: dict, key: list[str], value: dict) -> None:
  for k in key[:-1]:
    tree = tree.setdefault(k, {})
  tree[key[-1]] = value


@pytest.fixture(scope="module")
def network(scans):
  """(torch restatement, our model, our variables with its weights, the batch)."""
  torch.manual_seed(3)
  net = _Res16UNet("34c", 4, 32)
  for module in net.modules():  # BatchNorm away from its identity start
    if isinstance(module, torch.nn.BatchNorm1d):
      with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
  model = minkunet.Model(variant="34c", out_dim=32, bn_momentum=MOMENTUM)
  batch = _batch(scans, extra=90)
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  return net, model, _copy_weights(net, variables), batch


def test_parameter_count_equals_the_restatement(network, capsys):
  net, model, variables, _ = network
  want = sum(p.numel() for p in net.parameters())
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == want
  assert minkunet.param_count("34c", 4, 32) == want
  minkunet.main(["--in_channels", "4", "--out_dim", "32"])
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines] == list(minkunet.VARIANTS)
  assert f"34c {want}" in lines


def test_res16unet34c_equals_spconv_restatement(network, scans):
  """Training mode (batch statistics over both scans of the pack, padding excluded), the
  running statistics it leaves, then evaluation mode with them."""
  net, model, variables, batch = network
  valid = _rows(batch, 0)
  x = np.asarray(batch["features"][0])[valid]
  net.train()
  want = net(_sparse(scans, 0, x)).detach().numpy()
  (got, aux), updated = jax.jit(lambda v, b: model.apply(v, b, mutable=["batch_stats"]))(
    variables, batch
  )
  assert got.shape == (1, valid.size, 32) and got.dtype == jnp.float32
  assert aux["backbone"].shape == (1, valid.size, 96)
  np.testing.assert_allclose(np.asarray(got[0])[valid], want, atol=1e-5, rtol=1e-5)
  assert not np.any(np.asarray(got[0])[~valid])
  torch_stats = _copy_weights(net, variables)["batch_stats"]
  for a, b in zip(jax.tree.leaves(updated["batch_stats"]), jax.tree.leaves(torch_stats),
                  strict=True):  # fmt: skip
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)

  net.eval()
  want = net(_sparse(scans, 0, x)).detach().numpy()
  got, _ = jax.jit(model.apply)({**variables, **updated}, batch)
  np.testing.assert_allclose(np.asarray(got[0])[valid], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# The packed layout.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(scans):
  model = minkunet.Model(variant="tiny", out_dim=16)
  return model, jax.jit(model.init)(jax.random.key(1), _batch(scans[:1]))


def test_evaluation_features_do_not_depend_on_the_pack(tiny, scans):
  """With running statistics a scan's features are the same alone or second in a pack."""
  model, variables = tiny
  n0, n1 = (int(b["num_voxels"]) for b in scans)
  alone = jax.jit(model.apply)(variables, _batch(scans[1:]))[0][0, :n1]
  packed = jax.jit(model.apply)(variables, _batch(scans, extra=3 * PATCH))[0][0, n0 : n0 + n1]
  np.testing.assert_allclose(packed, alone, atol=2e-5)


def test_training_step_ignores_padding_and_stays_finite(tiny, scans):
  """Batch statistics and gradients are the same with more padding, and never NaN."""
  model, variables = tiny

  def loss(params, batch):
    (y, _), updated = model.apply({**variables, "params": params}, batch, mutable=["batch_stats"])
    return jnp.sum(y[..., 0] * jnp.cos(jnp.arange(y.shape[1]))), updated

  run = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l1, s1), g1 = run(variables["params"], _batch(scans[:1]))
  (l2, s2), g2 = run(variables["params"], _batch(scans[:1], extra=5 * PATCH))
  for tree in (g1, g2, s1, s2):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2)), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=1e-4)


def test_train_state_keeps_statistics_out_of_the_optimizer(tiny):
  """The optimizer sees the trainable parameters only; the statistics ride beside them."""
  _, variables = tiny
  trainable, stats = runtime.split_statistics(variables)
  assert set(trainable) == {"params"} and set(stats) == {"batch_stats"}
  merged = runtime.merge(trainable, stats)
  assert jax.tree.structure(merged) == jax.tree.structure(variables)
  nested = runtime.split_statistics({"encoder": variables, "head": {"params": {"w": 1}}})
  assert set(nested[1]) == {"encoder"} and set(nested[0]["encoder"]) == {"params"}


def test_sgd_equals_torch_sgd_with_dampening():
  """runtime.sgd is torch.optim.SGD (momentum 0.9, dampening 0.1, weight decay) step for step."""
  rng = np.random.default_rng(4)
  w0 = rng.standard_normal((3, 4)).astype(np.float32)
  grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4)]
  weight = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  opt = torch.optim.SGD([weight], lr=0.5, momentum=0.9, dampening=0.1, weight_decay=1e-2)
  tx = runtime.sgd(0.5, 0.9, 0.1, 1e-2)
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  for g in grads:
    weight.grad = torch.from_numpy(g)
    opt.step()
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(params["w"], weight.detach().numpy(), atol=1e-6, rtol=1e-6)
