"""Packing scans into fixed-shape packs: budgets, first-fit plans, and the packed arrays."""

import dataclasses
import itertools

import numpy as np
import pytest

from reldistill_jax import errors, input_pipeline, packing
from reldistill_jax import serialization as ser

STAGES = 3


def _scan(seed: int, n: int) -> dict:
  """A bucket of a random cloud (a few hundred voxels over three stages)."""
  rng = np.random.default_rng(seed)
  points = np.c_[rng.uniform(-8, 8, (n, 3)), rng.uniform(0, 255, n)].astype(np.float32)
  pairs = rng.integers(0, n, 40)
  bucket = ser.build_bucket(
    points, rng.integers(0, 17, n), token=f"scan-{seed}", voxel_size=0.6, num_stages=STAGES,
    pairs_point=pairs, pairs_camera=rng.integers(0, 6, 40), pairs_uv=rng.uniform(0, 900, (40, 2)),
  )  # fmt: skip
  bucket["image_sizes"] = np.tile(np.array([900, 1600], np.int32), (6, 1))
  bucket["teacher"] = rng.normal(size=(6, 2, 3, 4)).astype(np.float16)
  return bucket


@pytest.fixture(scope="module")
def scans() -> list[dict]:
  return [_scan(seed, n) for seed, n in enumerate((900, 400, 1300, 700))]


def _example(bucket) -> dict:
  return input_pipeline.Transform(16, 1 / 255, grid=(2, 3))(bucket, np.random.default_rng(0))


def _cost_per_scan(sizes, budgets, costs, bins=8) -> float:
  """What `fit_budgets` minimises, restated: packs x the cost of a pack's budgets / scans."""
  need = packing.packing_sizes(sizes, budgets.patch_size)
  order = np.random.default_rng(0).permutation(len(sizes))
  packs, _ = packing.first_fit(need, order, budgets, bins)
  return len(packs) * float(np.dot(costs, budgets.limits())) / len(sizes)


def test_budgets_are_the_cheapest_per_scan_and_hold_every_scan():
  rng = np.random.default_rng(0)
  # Stage 0 barely varies, stage 1 varies much (as the deep stages of real scans).
  sizes = np.c_[rng.integers(950, 1050, 500), rng.integers(100, 500, 500)]
  sizes[7] = [3000, 100]  # one scan larger than three typical ones
  costs = [1.0, 8.0, 0.1, 0.8]  # the deep stage costs more a token
  budgets = packing.fit_budgets(sizes, 4, 256, costs)
  assert budgets.scans == 4 and budgets.patch_size == 256
  assert all(t % 128 == 0 for t in budgets.tokens) and all(a % 256 == 0 for a in budgets.attention)
  assert budgets.tokens[0] >= 3000 and budgets.attention[0] >= 3072  # the largest fits alone
  # The deep stage, which varies more, gets more slack over its mean than stage 0.
  slack = np.asarray(budgets.tokens) / (4 * sizes.mean(axis=0))
  assert slack[1] > slack[0] >= 1
  # No member of the family of budgets is cheaper per scan under first-fit packing.
  chosen = _cost_per_scan(sizes, budgets, costs)
  need = packing.packing_sizes(sizes, 256)
  for z in (-0.5, 0.0, 1.0, 1.64, 3.0):
    fitted = np.maximum(4 * need.mean(0) + z * 2 * need.std(0), need.max(0))
    other = packing.Budgets(
      tuple(int(-(-v // 128) * 128) for v in fitted[:2]),
      tuple(int(-(-v // 256) * 256) for v in fitted[2:]), 4, 256,
    )  # fmt: skip
    assert chosen <= _cost_per_scan(sizes, other, costs) + 1e-9, z
  held = packing.budgets_for(np.array([[100, 65, 1], [30, 1, 1]]), 64)
  # Attention: each scan rounded up to the patch, 128 + 64, 128 + 64, 64 + 64.
  assert held.tokens == (192, 128, 64) and held.attention == (192, 192, 128) and held.scans == 2


def test_first_fit_places_every_scan_once_within_the_budgets():
  rng = np.random.default_rng(1)
  counts = np.c_[rng.integers(100, 900, 300), rng.integers(50, 300, 300)]
  sizes = packing.packing_sizes(counts, 64)
  budgets = packing.Budgets((2048, 640), (2304, 896), 4, 64)
  packs, carried = packing.first_fit(sizes, rng.permutation(300), budgets, bins=4)
  placed = np.concatenate(packs)
  np.testing.assert_array_equal(np.sort(placed), np.arange(300))  # none dropped, none twice
  for members in packs:
    assert 1 <= len(members) <= 4
    assert np.all(counts[members].sum(axis=0) <= budgets.tokens)
    assert np.all((-(-counts[members] // 64) * 64).sum(axis=0) <= budgets.attention)
  assert carried > 0  # scans that did not fit the oldest open pack went to a later one
  # First fit: a scan never skips an open pack it fits. Replayed with one open pack, the
  # packing is consecutive runs of the order.
  order = np.arange(300)
  runs, _ = packing.first_fit(sizes, order, budgets, bins=1)
  np.testing.assert_array_equal(np.concatenate(runs), order)


def test_the_plan_is_a_function_of_the_store_and_the_seed():
  rng = np.random.default_rng(2)
  sizes = np.c_[rng.integers(100, 900, 50), rng.integers(50, 300, 50), rng.integers(5, 80, 50)]
  budgets = packing.Budgets((2048, 640, 128), (2304, 960, 192), 3, 64)
  plan = packing.PackPlan(sizes, budgets, seed=5)
  again = packing.PackPlan(sizes, budgets, seed=5)
  first = [plan[i].tolist() for i in range(60)]  # crosses into the next epochs
  assert [again[i].tolist() for i in reversed(range(60))][::-1] == first  # random access
  epoch0 = np.concatenate(plan.epoch(0)[0])
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(50))  # every scan once per epoch
  assert not np.array_equal(np.concatenate(plan.epoch(1)[0]), epoch0)  # reshuffled
  assert [p.tolist() for p in packing.PackPlan(sizes, budgets, seed=6).epoch(0)[0]] != first[:5]
  ordered = packing.PackPlan(sizes, budgets, shuffle=False)
  np.testing.assert_array_equal(
    np.concatenate([ordered[i] for i in range(len(ordered))]), range(50)
  )
  with pytest.raises(errors.DataError, match="more than the pack budgets"):
    packing.PackPlan(sizes, packing.Budgets((64,) * 3, (64,) * 3, 3, 64))


def test_a_pack_holds_each_scan_unchanged_at_its_offset(scans):
  examples = [_example(b) for b in scans[:3]]
  counts = np.array([b["counts"] for b in scans[:3]])
  k = 64
  budgets = packing.budgets_for(counts, k, extra=300)
  budgets = dataclasses.replace(budgets, scans=4)  # and a slot to spare
  packed = packing.pack(examples, budgets)
  starts = np.vstack([np.zeros(STAGES, int), np.cumsum(counts, axis=0)])
  for s, (tokens, view) in enumerate(zip(budgets.tokens, budgets.attention, strict=True)):
    assert tokens % 64 == 0 and view % k == 0 and view >= sum(-(-c // k) * k for c in counts[:, s])
    used = starts[-1, s]
    np.testing.assert_array_equal(packed[f"s{s}/mask"], np.arange(tokens) < used)
    order, inverse = packed[f"s{s}/order"], packed[f"s{s}/inverse"]
    assert order.shape == (4, view) and inverse.shape == (4, tokens)
    # Every token sits at one view slot, and that slot reads it back.
    for r in range(4):
      np.testing.assert_array_equal(order[r][inverse[r, :used]], np.arange(used))
    assert np.sum(order[0] < tokens) == used  # the rest of the view reads the zero row
    neighbors = packed[f"s{s}/neighbors"]
    np.testing.assert_array_equal(neighbors[used:], tokens)
    lengths = packed[f"s{s}/lengths"]
    view_start = 0
    for j, example in enumerate(examples):
      a, b, n = starts[j, s], starts[j + 1, s], counts[j, s]
      # In the view, the scan starts on a patch boundary and lists its voxels by its own order.
      assert view_start % k == 0
      np.testing.assert_array_equal(
        order[:, view_start : view_start + n] - a, example[f"s{s}/order"]
      )
      np.testing.assert_array_equal(inverse[:, a:b] - view_start, example[f"s{s}/inverse"])
      blocks = lengths[view_start // k : view_start // k + -(-n // k)]
      assert blocks.sum() == n and np.all(blocks[:-1] == k)
      view_start += -(-n // k) * k
      # Unshifted by the scan's offset, its neighbours and parents are its own.
      mine, own = neighbors[a:b], example[f"s{s}/neighbors"]
      np.testing.assert_array_equal(mine == tokens, own == n)
      np.testing.assert_array_equal(np.where(mine == tokens, n, mine - a), own)
      if s + 1 < STAGES:
        parent = packed[f"s{s}/parent"][a:b] - starts[j, s + 1]
        np.testing.assert_array_equal(parent, example[f"s{s}/parent"])
    assert lengths[view_start // k :].sum() == 0
    if s + 1 < STAGES:  # a padded token's parent is the next stage's sentinel
      np.testing.assert_array_equal(packed[f"s{s}/parent"][used:], budgets.tokens[s + 1])
  for j, example in enumerate(examples):
    a, b = starts[j, 0], starts[j + 1, 0]
    np.testing.assert_array_equal(packed["features"][a:b], example["features"])
    np.testing.assert_array_equal(packed["labels"][a:b], example["labels"])
    pairs = slice(16 * j, 16 * (j + 1))
    np.testing.assert_array_equal(packed["pairs_voxel"][pairs] - a, example["pairs_voxel"])
    np.testing.assert_array_equal(packed["pairs_mask"][pairs], example["pairs_mask"])
    np.testing.assert_array_equal(packed["teacher"][j], example["teacher"])
    assert (packed["scan_start"][j], packed["scan_voxels"][j]) == (a, b - a)
  # The empty fourth slot.
  assert packed["token"].tolist() == ["scan-0", "scan-1", "scan-2", ""]
  assert packed["scan_voxels"][3] == 0 and not packed["pairs_mask"][48:].any()
  assert not packed["teacher"][3].any() and not packed["features"][starts[-1, 0] :].any()


def test_pack_refuses_what_does_not_fit(scans):
  examples = [_example(b) for b in scans[:2]]
  with pytest.raises(ValueError, match="exceed budgets"):
    packing.pack(examples, packing.Budgets((64,) * 3, (64,) * 3, 2, 1))
  with pytest.raises(ValueError, match="a pack holds 1 to 1 scans"):
    packing.pack(examples, packing.Budgets((10**5,) * 3, (10**5,) * 3, 1, 1))


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_scan_has_the_same_patches_in_any_slot(scans, order):
  """The patches of a scan in the view are those it has alone, wherever it sits."""
  k = 64
  alone = packing.pack([_example(scans[0])], packing.budgets_for(scans[0]["counts"][None], k))
  examples = [_example(scans[i]) for i in order]
  budgets = packing.budgets_for(np.array([scans[i]["counts"] for i in order]), k, extra=100)
  packed = packing.pack(examples, budgets)
  slot = order.index(0)
  for s in range(STAGES):
    offset = sum(int(scans[i]["counts"][s]) for i in order[:slot])
    view = sum(-(-int(scans[i]["counts"][s]) // k) * k for i in order[:slot])
    n = int(scans[0]["counts"][s])
    width = -(-n // k) * k
    mine = packed[f"s{s}/order"][:, view : view + width]
    np.testing.assert_array_equal(np.where(mine < budgets.tokens[s], mine - offset, -1),
                                  np.where(alone[f"s{s}/order"][:, :width] < alone[f"s{s}/mask"].size,
                                           alone[f"s{s}/order"][:, :width], -1))  # fmt: skip
  assert packed["token"].tolist() == [f"scan-{i}" for i in order]
