"""WaffleIron against the official code (valeoai/WaffleIron v0.3, ScaLR's options) restated in
PyTorch, on a real nuScenes keyframe and a real SemanticKITTI scan packed together: the inputs
(kNN, cells), the embedding, one SpatialMix, one ChannelMix, the whole WI-48 network in training
and evaluation (BatchNorm statistics too), the checkpoint mapping, the initialisation, the
parameter count and the packed layout.

"Equal" is max |jax - torch| <= 1e-5 max |torch| per tensor, in float32 on both sides.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reldistill_jax.models import waffleiron, waffleiron_inputs

torch = pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
from waffleiron_torch import (  # noqa: E402
  TorchSegmenter,
  randomise_norms,
)

FOV, GRIDS = waffleiron.GRIDS["semantickitti"]  # WI-48-256's grids
DIM_PROJ = (2, 1, 0)  # the official configs' `dim_proj`: (x, y), (x, z), (y, z)
POINTS = 2048  # per scan, after the official 0.1 m voxel downsampling and crop
PADDING = 96
SLOTS = 3  # one slot of the pack stays empty
K = waffleiron_inputs.NUM_NEIGHBORS


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Two CPU threads make PyTorch's CPU kernels here about ten times slower (measured on the
  48-layer forward pass): one thread for the module."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _close(got, want, tol: float = 1e-5, name: str = "") -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
  assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _close_trees(got, want, tol: float = 1e-5) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                          strict=True):  # fmt: skip
    _close(g, w, tol, jax.tree_util.keystr(path))


# Gradients whose float32 value is ill-conditioned (measured against PyTorch in float64 on this
# data): the input BatchNorm's scale (PyTorch float32 off by 1.2e-5, here 4e-5) and the first
# neighbour BatchNorm's scale (both off by 2.6e-3): the BatchNorm after the bias-free 1x1 conv
# nearly cancels them. The first neighbour BatchNorm's bias it cancels exactly: both
# gradients are rounding noise.
_GRAD_TOLERANCE = {("embed", "norm", "scale"): 2e-4, ("embed", "neighbor_norm_in", "scale"): 2e-2}
_ZERO_GRAD = ("embed", "neighbor_norm_in", "bias")


def _close_grads(got, want, tol: float = 1e-5) -> None:
  """Gradients leaf by leaf (`_GRAD_TOLERANCE`, `_ZERO_GRAD`)."""
  scale = np.max(np.abs(want["embed"]["neighbor_norm_in"]["scale"]))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    key = tuple(k.key for k in path)
    if key == _ZERO_GRAD:
      assert max(np.max(np.abs(g)), np.max(np.abs(flat_want[path]))) < 1e-4 * scale
    else:
      _close(g, flat_want[path], max(tol, _GRAD_TOLERANCE.get(key, 0)), jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------
# The official inputs of a cropped, downsampled scan (datasets/pc_dataset.py, utils/transforms.py).
# ----------------------------------------------------------------------------


def _official_voxelize(pc: np.ndarray, voxel_size: float = 0.1) -> np.ndarray:
  shift = pc[:, :3] - pc[:, :3].min(0, keepdims=True)
  _, ind = np.unique((shift / voxel_size).astype("int"), return_index=True, axis=0)
  return pc[ind]


def _official_cells(pc: np.ndarray) -> np.ndarray:
  fov = np.concatenate([np.array(f)[None] for f in FOV], axis=0)
  lut_axis_plane = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
  cell_ind = []
  for dim, grid in zip(DIM_PROJ, [np.array(g) for g in GRIDS], strict=True):
    dims = lut_axis_plane[dim]
    res = (fov[1, dims] - fov[0, dims]) / grid[None]
    pc_quant = ((pc[:, dims] - fov[0, dims]) / res).astype("int")
    assert pc_quant.min() >= 0 and np.all(pc_quant.max(0) < grid)
    cell_ind.append((pc_quant[:, 0] * grid[1] + pc_quant[:, 1])[None])
  return np.vstack(cell_ind)


def _official_inputs(pc: np.ndarray):
  """(features (5, N): intensity, xyz, radius; cell_ind (3, N); neighbors (K + 1, N))."""
  from scipy.spatial import cKDTree

  feats = np.concatenate(
    [pc[:, 3:], pc[:, :3], np.linalg.norm(pc[:, :3], axis=1, keepdims=True)], 1
  )
  _, neighbors = cKDTree(pc[:, :3]).query(pc[:, :3], k=K + 1)
  return feats.T, _official_cells(pc), neighbors.T


@pytest.fixture(scope="module")
def clouds(realdata) -> list[np.ndarray]:
  """The nuScenes keyframe and the SemanticKITTI scan: 0.1 m voxels, cropped to WI-48-256's
  field of view, POINTS of each (x, y, z, intensity)."""
  lidar = realdata / "mmdetection3d-nuscenes-demo" / "samples" / "LIDAR_TOP"
  nuscenes = np.fromfile(next(lidar.glob("*.bin")), "<f4").reshape(-1, 5)[:, :4]
  kitti = np.fromfile(realdata / "spvnas-semantickitti" / "000000.bin", "<f4").reshape(-1, 4)
  out = []
  for i, pc in enumerate((nuscenes, kitti)):
    pc = _official_voxelize(pc)
    pc = pc[waffleiron_inputs.crop_mask(pc, FOV)]
    pick = np.sort(np.random.default_rng(i).choice(len(pc), POINTS, replace=False))
    out.append(np.ascontiguousarray(pc[pick], np.float32))
  return out


def _pack(scans: list[np.ndarray], tokens: int, slots: int, garbage: float = 0.0) -> dict:
  """A batch of one pack holding `scans` back to back, then padding (features `garbage`)."""
  n = sum(len(s) for s in scans)
  features = np.full((tokens, 4), garbage, np.float32)
  features[:n] = np.concatenate(scans)
  keys = waffleiron_inputs.pack_inputs(
    [waffleiron_inputs.knn_indices(s) for s in scans], tokens, slots
  )
  batch = {"features": features, "s0/mask": np.arange(tokens) < n, **keys}
  return {k: jnp.asarray(v)[None] for k, v in batch.items()}


@pytest.fixture(scope="module")
def data(clouds):
  """(the JAX batch: one pack of both scans and padding; the official batch of the two)."""
  official = [_official_inputs(c) for c in clouds]
  feats, cells, neighbors = (np.stack(a) for a in zip(*official, strict=True))
  torch_inputs = (
    torch.from_numpy(feats.astype(np.float32)),
    torch.from_numpy(cells.astype(np.int64)),
    torch.ones(2, POINTS),
    torch.from_numpy(neighbors.astype(np.int64)),
  )
  return _pack(clouds, 2 * POINTS + PADDING, SLOTS, garbage=1e3), torch_inputs


def _valid(x) -> np.ndarray:
  """(1, T, C) of the pack -> (2, C, POINTS), the official layout."""
  x = np.asarray(x)[0, : 2 * POINTS]
  return x.reshape(2, POINTS, -1).transpose(0, 2, 1)


def _variables(torch_model, **model_args) -> dict:
  return waffleiron.load_torch_checkpoint(torch_model.state_dict(), model_args)


def _small(which_norm="batchnorm", gelu=False, width=32, depth=3, randomise=True):
  torch.manual_seed(0)
  model = TorchSegmenter(5, width, 7, depth, GRIDS, which_norm=which_norm, gelu=gelu)
  args = dict(variant=None, depth=depth, width=width, out_dim=7, fov=FOV, grids=GRIDS,
              norm="batch" if which_norm == "batchnorm" else "layer",
              activation="gelu" if gelu else "relu", normalize=False)  # fmt: skip
  return randomise_norms(model, 1) if randomise else model, args


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------


def test_inputs_equal_the_official_pipeline(clouds):
  for pc in clouds:
    _, cells, neighbors = _official_inputs(pc)
    assert np.array_equal(neighbors[0], np.arange(len(pc)))  # the point itself comes first
    np.testing.assert_array_equal(waffleiron_inputs.knn_indices(pc), neighbors[1:].T)
    np.testing.assert_array_equal(waffleiron_inputs.cell_indices(pc, FOV, GRIDS), cells.T)
    for i, (plane, grid) in enumerate(zip(DIM_PROJ, GRIDS, strict=True)):
      got = waffleiron.grid_cells(jnp.asarray(pc[:, :3]), FOV, plane, grid)
      np.testing.assert_array_equal(got, cells[i])


def test_knn_excludes_the_point_even_behind_a_duplicate():
  xyz = np.random.default_rng(0).normal(size=(40, 3))
  xyz[7] = xyz[3]  # the query of 3 may list 7 first, and the reverse
  knn = waffleiron_inputs.knn_indices(xyz, k=5)
  assert not np.any(knn == np.arange(40)[:, None])
  assert 7 in knn[3] and 3 in knn[7]
  with pytest.raises(ValueError, match="more than 5 points"):
    waffleiron_inputs.knn_indices(xyz[:5], k=5)


def test_pack_inputs_offsets_every_scan():
  knns = [np.zeros((20, K), np.int32) + 3, np.zeros((30, K), np.int32) + 5]
  keys = waffleiron_inputs.pack_inputs(knns, tokens=64, slots=3)
  assert np.all(keys["knn"][:20] == 3) and np.all(keys["knn"][20:50] == 25)
  assert np.all(keys["knn"][50:] == 64)
  np.testing.assert_array_equal(keys["scan"], [0] * 20 + [1] * 30 + [3] * 14)
  np.testing.assert_array_equal(keys["slots"], [True, True, False])
  with pytest.raises(ValueError, match="exceed"):
    waffleiron_inputs.pack_inputs(knns, tokens=40, slots=3)


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------


def test_embedding_equals_official(data):
  """Training (output, gradients of a fixed linear loss, running statistics), then
  evaluation."""
  batch, (feats, _, _, neighbors) = data
  torch_model, args = _small()
  embed = {k: v["embed"] for k, v in _variables(torch_model, **args).items()}
  module = waffleiron.Embedding(args["width"])
  x = waffleiron.input_features(batch["features"], waffleiron.INPUT_FEAT)
  w = np.random.default_rng(6).normal(size=(2, args["width"], POINTS)).astype(np.float32)
  w_pack = np.zeros((1, x.shape[1], args["width"]), np.float32)
  w_pack[0, : 2 * POINTS] = w.transpose(0, 2, 1).reshape(2 * POINTS, -1)

  def loss(params):
    y, updated = module.apply({**embed, "params": params}, x, batch["knn"], batch["s0/mask"],
                              mutable=["batch_stats"])  # fmt: skip
    return jnp.sum(y * w_pack), (y, updated)

  grads, (got, updated) = jax.jit(jax.grad(loss, has_aux=True))(embed["params"])
  reference = copy.deepcopy(torch_model.embed).train()
  want = reference(feats, neighbors)
  want.backward(torch.from_numpy(w))
  _close(_valid(got), want.detach())
  assert not np.any(np.asarray(got)[0, 2 * POINTS :])
  state = {
    **torch_model.state_dict(),
    **{f"embed.{k}": v for k, v in reference.state_dict().items()},
  }
  torch_grads = {f"embed.{k}": p.grad for k, p in reference.named_parameters()}
  _close_grads(
    {"embed": grads}, waffleiron.load_torch_checkpoint({**state, **torch_grads}, args)["params"]
  )
  _close_trees(
    updated["batch_stats"], waffleiron.load_torch_checkpoint(state, args)["batch_stats"]["embed"]
  )
  reference.eval()
  with torch.no_grad():
    want = reference(feats, neighbors)
  apply = jax.jit(lambda v: module.apply(v, x, batch["knn"], batch["s0/mask"]))
  _close(_valid(apply({**embed, "batch_stats": updated["batch_stats"]})), want)


def _layer(variables, name: str, step: int = 0) -> dict:
  return {
    k: jax.tree.map(lambda a: a[step], v["layers"][name])
    for k, v in variables.items()
    if "layers" in v  # no batch_stats with LayerNorm
  }


def _tokens(width: int) -> tuple[jax.Array, torch.Tensor]:
  """Random tokens of the pack (huge on padding) and the official (2, F, N) of the same."""
  x = np.random.default_rng(3).normal(1.0, 2.0, (1, 2 * POINTS + PADDING, width))
  x[0, 2 * POINTS :] = 1e4
  x = x.astype(np.float32)
  return jnp.asarray(x), torch.from_numpy(np.ascontiguousarray(_valid(x)))


def _check_block(torch_model, args, prefix: str, layer: str, call, forward) -> None:
  """A block in training (its output, the gradients of a fixed linear loss for its parameters
  and its input, its running statistics), then in evaluation, against its official
  counterpart `prefix` of `torch_model` (run by `call(module, tokens)`)."""
  reference = copy.deepcopy(torch_model.get_submodule(prefix))
  params = _layer(_variables(torch_model, **args), layer)
  x, tokens = _tokens(args["width"])
  w = np.random.default_rng(5).normal(size=tokens.shape).astype(np.float32)
  w_pack = np.zeros(x.shape, np.float32)
  w_pack[0, : 2 * POINTS] = w.transpose(0, 2, 1).reshape(2 * POINTS, -1)

  def loss(p, x):
    y, updated = forward({**params, "params": p}, x, ("batch_stats",))
    return jnp.sum(y * w_pack), (y, updated)

  (grads, grad_x), (got, updated) = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(
    params["params"], x
  )
  reference.train()
  tokens.requires_grad_()
  want = call(reference, tokens)
  want.backward(torch.from_numpy(w))
  _close(_valid(got), want.detach())
  _close(_valid(grad_x), tokens.grad)
  torch_grads = {f"{prefix}.{k}": p.grad for k, p in reference.named_parameters()}
  torch_grads = waffleiron.load_torch_checkpoint({**torch_model.state_dict(), **torch_grads}, args)
  _close_trees(grads, _layer(torch_grads, layer)["params"])
  if args["norm"] == "batch":
    _close(updated["batch_stats"]["norm"]["bn"]["mean"], reference.norm.running_mean)
    _close(updated["batch_stats"]["norm"]["bn"]["var"], reference.norm.running_var)
    params = {**params, "batch_stats": updated["batch_stats"]}
  reference.eval()
  with torch.no_grad():
    want = call(reference, tokens)
  _close(_valid(jax.jit(forward, static_argnums=2)(params, x, False)), want)


@pytest.mark.parametrize("which_norm", ["batchnorm", "layernorm"])
def test_spatial_mix_equals_official(data, which_norm):
  batch, (_, cells, _, _) = data
  torch_model, args = _small(which_norm)
  plane = 1  # layer 1 projects on (x, z)
  mask, scan = batch["s0/mask"], batch["scan"]
  cell = waffleiron.grid_cells(batch["features"][..., :3], FOV, DIM_PROJ[plane], GRIDS[plane])
  proj = waffleiron.Projection.build(cell, scan, mask, GRIDS[plane], SLOTS)
  module = waffleiron.SpatialMix(norm=args["norm"])
  sp_mat = {"inflate": cells[:, plane : plane + 1].expand(-1, args["width"], -1)}
  _check_block(
    torch_model, args, f"waffleiron.spatial_mix.{plane}", f"spatial_mix_{plane}",
    lambda reference, tokens: reference(tokens, sp_mat),
    lambda v, x, mutable: module.apply(v, x, mask, proj, scan, mutable=mutable),
  )  # fmt: skip


@pytest.mark.parametrize(("which_norm", "gelu"), [("batchnorm", False), ("layernorm", True)])
def test_channel_mix_equals_official(data, which_norm, gelu):
  batch, _ = data
  torch_model, args = _small(which_norm, gelu)
  mask, scan = batch["s0/mask"], batch["scan"]
  module = waffleiron.ChannelMix(norm=args["norm"], activation=args["activation"])
  _check_block(
    torch_model, args, "waffleiron.channel_mix.2", "channel_mix_2",
    lambda reference, tokens: reference(tokens),
    lambda v, x, mutable: module.apply(v, x, mask, scan, SLOTS, mutable=mutable),
  )  # fmt: skip


def test_drop_path_drops_whole_scans(data):
  batch, _ = data
  x, _ = _tokens(8)
  mask, scan = batch["s0/mask"], batch["scan"]
  module = waffleiron.ChannelMix(drop_path=0.5)
  variables = module.init(jax.random.key(0), x, mask, scan, SLOTS)
  branch = np.asarray(module.apply(variables, x, mask, scan, SLOTS) - x)[0]  # no rng: no drop
  seen = set()
  for seed in range(6):
    y = module.apply(variables, x, mask, scan, SLOTS, rngs={"dropout": jax.random.key(seed)})
    residual = np.asarray(y - x)[0]
    for j in range(2):
      part, ref = residual[j * POINTS : (j + 1) * POINTS], branch[j * POINTS : (j + 1) * POINTS]
      kept = bool(np.any(part))
      np.testing.assert_allclose(part, 2 * ref if kept else 0 * ref, rtol=1e-6, atol=1e-4)
      seen.add(kept)
  assert seen == {True, False}


# ----------------------------------------------------------------------------
# The whole network.
# ----------------------------------------------------------------------------


def _network_parity(data, width: int) -> None:
  """WI-48-`width` (5 inputs, 19 classes, WI-48-256's grids): a training pass (its output and
  the running statistics it leaves), then an evaluation pass with those statistics.

  Gradients are compared block by block above: through 48 float32 layers, rounding moves a
  few ReLU inputs near 0 (1e-7 of the layer's range on this data) across the kink in one
  implementation only, and the BatchNorm after a bias-free conv nearly cancels some
  gradients, so the network's gradients differ by up to 1e-2 while its outputs agree to 1e-6.
  """
  batch, torch_inputs = data
  torch.manual_seed(0)
  reference = randomise_norms(TorchSegmenter(5, width, 19, 48, GRIDS), 1)
  args = dict(variant=None, depth=48, width=width, out_dim=19, fov=FOV, grids=GRIDS,
              normalize=False)  # fmt: skip
  model = waffleiron.Model(**args)
  variables = _variables(reference, **args)
  (got, _), updated = jax.jit(lambda v: model.apply(v, batch, mutable=["batch_stats"]))(variables)
  reference.train()
  with torch.no_grad():
    want = reference(*torch_inputs)
  _close(_valid(got), want)
  assert not np.any(np.asarray(got)[0, 2 * POINTS :])
  _close_trees(updated["batch_stats"], _variables(reference, **args)["batch_stats"])
  reference.eval()
  with torch.no_grad():
    want = reference(*torch_inputs)
  got, _ = jax.jit(model.apply)({**variables, **updated}, batch)
  _close(_valid(got), want)


def test_waffleiron_48_narrow_equals_official(data):
  _network_parity(data, width=16)


@pytest.mark.slow
def test_waffleiron_48_256_equals_official(data):
  _network_parity(data, width=256)


def test_a_scan_alone_equals_the_scan_in_a_pack(clouds):
  """Evaluation features and their gradients of the nuScenes scan alone in a pack and after
  the SemanticKITTI scan in another (BatchNorm by its running statistics)."""
  nus, kitti = clouds
  alone = _pack([nus], 2 * POINTS + 72, 3, garbage=7.0)  # one shape: one compilation
  packed = _pack([kitti, nus], 2 * POINTS + 72, 3, garbage=-3.0)
  model = waffleiron.Model(variant="tiny", out_dim=8)
  torch.manual_seed(0)
  depth, width, _, grids = model.sizes()
  reference = randomise_norms(TorchSegmenter(5, width, 8, depth, grids), 1)
  variables = waffleiron.load_torch_checkpoint(reference.state_dict(), model)
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(POINTS, 8)), jnp.float32)

  def loss(params, batch, start):
    out, _ = model.apply({**variables, "params": params}, batch)
    out = jax.lax.dynamic_slice_in_dim(out[0], start, POINTS)
    return jnp.sum(out * weights), out

  grad = jax.jit(jax.grad(loss, has_aux=True))
  grads_alone, out_alone = grad(variables["params"], alone, 0)
  grads_packed, out_packed = grad(variables["params"], packed, POINTS)
  _close(out_packed, out_alone)
  _close_trees(grads_packed, grads_alone)


# ----------------------------------------------------------------------------
# Checkpoints, initialisation, parameter count.
# ----------------------------------------------------------------------------


def test_checkpoint_file_with_trainer_wrapper_and_ddp_prefix(tmp_path):
  reference, args = _small()
  state = reference.state_dict()
  path = tmp_path / "ckpt_last.pth"
  torch.save({"epoch": 3, "net": {f"module.{k}": v for k, v in state.items()}}, path)
  _close_trees(waffleiron.load_torch_checkpoint(path, args), _variables(reference, **args))
  with pytest.raises(ValueError, match="lacks waffleiron.spatial_mix.1.ffn.0.weight"):
    waffleiron.load_torch_checkpoint(
      {k: v for k, v in state.items() if k != "waffleiron.spatial_mix.1.ffn.0.weight"}, args
    )
  with pytest.raises(ValueError, match="no layer"):
    waffleiron.load_torch_checkpoint({**state, "extra.weight": torch.zeros(1)}, args)
  with pytest.raises(ValueError, match="do not match"):
    waffleiron.load_torch_checkpoint(state, {**args, "width": 64})


def test_initialisation_follows_pytorch_defaults(data):
  """Every parameter starts with the spread of its official counterpart (PyTorch's defaults:
  U(+-1/sqrt(fan_in)), so LayerScale in U(-1, 1))."""
  batch, _ = data
  reference, args = _small(width=64, randomise=False)
  want = _variables(reference, **args)["params"]
  got = jax.jit(waffleiron.Model(**args).init)(jax.random.key(0), batch)["params"]
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                          strict=True):  # fmt: skip
    g, w = np.abs(g).max(), np.abs(w).max()
    if w == 0:  # BatchNorm's bias
      assert g == 0, jax.tree_util.keystr(path)
    elif w.size >= 64:
      assert 0.85 < g / w < 1.18, (jax.tree_util.keystr(path), g / w)
  scales = np.asarray(got["layers"]["spatial_mix_0"]["scale"])
  assert scales.min() < -0.8 and scales.max() > 0.8


@pytest.mark.parametrize(
  ("width", "classes", "hidden", "count"),
  [(256, 19, 0, 6_840_615), (768, 1024, 0, 60_222_996), (768, 1024, 2048, None)],
)
def test_parameter_count_equals_official(capsys, width, classes, hidden, count):
  """WI-48-256 (SemanticKITTI) and WI-48-768 (ScaLR, and ScaLR+'s MLP head), 5 inputs."""
  with torch.device("meta"):
    reference = TorchSegmenter(5, width, classes, 48, GRIDS, mlp_hidden_size=hidden or None)
  official = sum(p.numel() for p in reference.parameters() if p.requires_grad)
  if count is not None:  # the analytic count: 4C + 2CF + 3F^2 + 4F + L (2F^2 + 28F) + F K + K
    c, f, k = 5, width, classes
    assert count == 4 * c + 2 * c * f + 3 * f * f + 4 * f + 48 * (2 * f * f + 28 * f) + f * k + k
    assert official == count
  assert waffleiron.param_count(48, width, 5, classes, hidden) == official
  argv = [
    "--depth",
    "48",
    "--width",
    str(width),
    "--in_channels",
    "5",
    "--num_classes",
    str(classes),
  ]
  waffleiron.main(argv + (["--head_hidden", str(hidden)] if hidden else []))
  assert capsys.readouterr().out == f"48-{width} {official}\n"


def test_batch_without_the_model_keys_is_refused(data):
  batch, _ = data
  model = waffleiron.Model(variant="tiny")
  with pytest.raises(ValueError, match="pack_inputs"):
    jax.eval_shape(model.init, jax.random.key(0), {k: batch[k] for k in ("features", "s0/mask")})
