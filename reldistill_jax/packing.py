"""Packed batches: the scans of a device's batch in one token stream per encoder stage.

Every scan is padded to one shape in a sparse-as-dense model, so the work of a
batch is its shape, not its voxels. Here the scans of a device's batch are
packed back to back into one stream per stage, each stage with a fixed token
budget fitted to the store, the way language-model training packs sequences:
the executed work follows the valid voxels at every stage, and a batch still
has one static shape.

  Budgets       the token budget of every stage (a multiple of the attention
                patch) and the scans a pack may hold.
  fit_budgets   budgets from a store's per-scan voxel counts (its manifest):
                the `quantile` of the stage counts of `pack_size` scans drawn
                at random, and never less than the largest scan, so any scan
                fits a pack alone.
  first_fit     the packs of a sequence of scans: each scan goes to the first
                open pack it fits in every stage; when it fits none, the
                oldest open pack closes. No scan is dropped or cut.
  PackPlan      the packs of a store's stream: per epoch a seeded shuffle then
                `first_fit` (training), or the store in order (evaluation).
                It reads only the manifest's counts, so every process of a run
                computes the same packs whatever the number of processes.
  pack          the examples of one pack as one fixed-shape example.

Two streams per stage. The layers (convolutions, linear layers, norms,
pooling) run on the compact stream: the scans' voxels back to back, then
padding, `tokens` long. Attention cuts a scan's voxels, in curve order, into
patches of K counted from the scan's first voxel (as PTv3 pads every scan to a
multiple of K): so that a scan's patches, and its features, do not depend on
where it sits in a pack, attention runs on an aligned view where every scan
starts on a patch boundary, `attention` long; the gaps read zeros and the
valid keys of every patch are a prefix (`key_value_seq_lengths`). Only the
attention products pay for the alignment, not the layers.

Why packs are planned from the manifest rather than packed from the stream
(grain's `FirstFitPackIterDataset`): the plan needs only the counts, so every
process computes the same packs and a run's losses do not depend on how many
processes it has; the data stays a `MapDataset` (random access, parallel reads,
an iterator state that is one index); and a benchmark can count the work of a
pack without reading it.
"""

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from reldistill_jax import errors
from reldistill_jax.models import waffleiron_inputs

# The length of an endless stream (grain datasets need one that batching and slicing keep finite).
ENDLESS = 2**48
# Pack keys that hold one entry per scan slot, not per token.
SCAN_KEYS = ("token", "scan_start", "scan_voxels")
# Of them, what stays on the host (never sent to the devices).
HOST_KEYS = SCAN_KEYS


@dataclasses.dataclass(frozen=True)
class Budgets:
  """The fixed shape of a pack.

  Attributes:
    tokens: T_s, the compact token budget of every stage (multiples of
      `TOKEN_ALIGN`, or of the patch when it is smaller).
    attention: A_s, the aligned attention budget of every stage (multiples of
      the patch): the scans' voxels, each scan's rounded up to the patch.
    scans: S, the scans a pack may hold.
    patch_size: K, the attention patch.
  """

  tokens: tuple[int, ...]
  attention: tuple[int, ...]
  scans: int
  patch_size: int

  def limits(self) -> np.ndarray:
    """(2 * stages,) the budgets `first_fit` checks `packing_sizes` against."""
    return np.asarray(self.tokens + self.attention, np.int64)


# Compact budgets round up to this many tokens (TPU lanes; a little padding on every backend).
TOKEN_ALIGN = 128


def _round_up(values, multiple: int) -> tuple[int, ...]:
  return tuple(int(-(-int(v) // multiple) * multiple) for v in values)


def packing_sizes(counts: np.ndarray, patch_size: int) -> np.ndarray:
  """(N, 2 * stages) what each scan takes of a pack: its voxels per stage, then the same
  rounded up to the patch (its share of the aligned attention view)."""
  counts = np.asarray(counts, np.int64)
  return np.concatenate([counts, -(-counts // patch_size) * patch_size], axis=-1)


def fit_budgets(
  sizes: np.ndarray,
  pack_size: int,
  patch_size: int,
  costs: Sequence[float] | None = None,
  bins: int = 8,
  seed: int = 0,
  sample: int = 4096,
) -> Budgets:
  """Budgets fitted to a store's per-scan counts: the cheapest per scan under first-fit packing.

  Budgets of the family B_s = S mean_s + z sqrt(S) std_s over the scans' needs
  (the z-quantile of the need of S random scans, per stage; never less than
  the largest scan) are tried for z from -0.5 to 3; for each, a seeded shuffle
  of the store (at most `sample` scans) is packed with `first_fit` and the cost
  of a scan is (packs x the cost of one pack's budgets) / scans. Tight budgets
  carry more scans to later packs; loose ones leave more padding: the cheapest
  z wins. A stage whose scans vary much (the deep stages) gets more slack than
  one that barely varies.

  Args:
    sizes: (N, stages) voxel counts of every scan of the store.
    pack_size: S, the scans of a pack.
    patch_size: K.
    costs: (2 * stages,) relative cost of a token of every stage's compact
      stream, then of its aligned attention view (the model's
      `token_costs()`); default 1 each.
    bins: open packs of the first-fit packing.
    seed: of the shuffle (the budgets are a function of the store).
    sample: scans packed per trial.
  """
  need = packing_sizes(sizes, patch_size)  # (N, 2 * stages)
  stages = need.shape[1] // 2
  costs = np.ones(2 * stages) if costs is None else np.asarray(costs, np.float64)
  order = np.random.default_rng(seed).permutation(len(need))[:sample]
  mean, std = need.mean(axis=0), need.std(axis=0)
  align = min(TOKEN_ALIGN, patch_size)
  best = None
  for z in np.linspace(-0.5, 3.0, 15):
    fitted = np.maximum(pack_size * mean + z * np.sqrt(pack_size) * std, need.max(axis=0))
    budgets = Budgets(
      _round_up(fitted[:stages], align), _round_up(fitted[stages:], patch_size), pack_size,
      patch_size,
    )  # fmt: skip
    packs, _ = first_fit(need, order, budgets, bins)
    cost = len(packs) * float(costs @ budgets.limits()) / len(order)
    if best is None or cost < best[0]:
      best = (cost, budgets)
  return best[1]


def budgets_for(counts: np.ndarray, patch_size: int, extra: int = 0) -> Budgets:
  """The smallest budgets holding these scans in one pack (plus `extra` tokens a stage).

  Args:
    counts: (n, stages) voxel counts of the scans.
    patch_size: K.
    extra: padding tokens added to every stage's budgets.
  """
  need = packing_sizes(np.asarray(counts).reshape(len(counts), -1), patch_size).sum(axis=0)
  stages = len(need) // 2
  align = min(TOKEN_ALIGN, patch_size)
  return Budgets(
    _round_up(need[:stages] + extra, align), _round_up(need[stages:] + extra, patch_size),
    len(counts), patch_size,
  )  # fmt: skip


def first_fit(
  sizes: np.ndarray, order: np.ndarray, budgets: Budgets, bins: int
) -> tuple[list[np.ndarray], int]:
  """Packs the scans `order` first-fit into at most `bins` open packs.

  A scan goes to the first open pack with room in every stage, compact and
  aligned (and fewer than `budgets.scans` scans); a pack that is full closes;
  when a scan fits no open pack and `bins` are open, the oldest closes. Packs
  come out in the order they close, then the open ones in order.

  Args:
    sizes: (N, 2 * stages) `packing_sizes` of the scans.
    order: the scans to pack, in order.
    budgets: the pack shape.
    bins: open packs at most.

  Returns:
    (packs, carried): the scan indices of every pack, in the order they were
    added, and how many scans went to a later pack than the oldest open one.
  """
  limits = budgets.limits()
  fill = np.zeros((bins, len(limits)), np.int64)
  members: list[list[int]] = []
  done, carried = [], 0
  for index in order:
    need = sizes[index]
    room = np.all(fill[: len(members)] + need <= limits, axis=1)
    room &= np.array([len(m) < budgets.scans for m in members], bool)
    if room.any():
      k = int(np.argmax(room))
    else:
      if len(members) == bins:
        done.append(members.pop(0))
        fill[:-1], fill[-1] = fill[1:].copy(), 0
      k = len(members)
      members.append([])
    carried += k > 0
    members[k].append(int(index))
    fill[k] += need
    if len(members[k]) == budgets.scans:
      done.append(members.pop(k))
      fill[k:-1], fill[-1] = fill[k + 1 :].copy(), 0
  done += members
  return [np.asarray(m, np.int64) for m in done], carried


class PackPlan:
  """The packs of a store: an endless shuffled stream (training) or one ordered pass.

  Args:
    sizes: (N, k) voxel counts of the store's scans per stage (its manifest);
      the first `len(budgets.tokens)` columns are used.
    budgets: the pack shape.
    seed: of the per-epoch shuffles (training).
    shuffle: shuffle every epoch and repeat forever; else one pass in store
      order (evaluation), packing consecutive scans (one open pack).
    bins: open packs of `first_fit` when shuffling.

  Raises:
    errors.DataError: a scan larger than the budgets (fit them to the store).
  """

  def __init__(
    self, sizes: np.ndarray, budgets: Budgets, *, seed: int = 0, shuffle: bool = True, bins: int = 8
  ):
    counts = np.asarray(sizes, np.int64)[:, : len(budgets.tokens)]
    self.sizes = packing_sizes(counts, budgets.patch_size)  # (N, 2 * stages)
    self.budgets = budgets
    self.seed, self.shuffle, self.bins = seed, shuffle, bins
    too_big = np.flatnonzero(np.any(self.sizes > budgets.limits(), axis=1))
    if len(too_big):
      raise errors.DataError(
        f"scan {int(too_big[0])} has stage counts {counts[too_big[0]].tolist()}, more than "
        f"the pack budgets {list(budgets.tokens)} / {list(budgets.attention)}; fit the budgets "
        "to the store"
      )
    self._starts = [0]  # first global pack index of every planned epoch
    self._epochs: dict[int, tuple[tuple[np.ndarray, ...], int]] = {}
    # grain reads packs from several threads: planning is serialised.
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def epoch(self, epoch: int) -> tuple[tuple[np.ndarray, ...], int]:
    """(packs, carried) of one epoch (the last few are kept)."""
    with self._lock:
      return self._epoch(epoch)

  def _epoch(self, epoch: int) -> tuple[tuple[np.ndarray, ...], int]:
    if epoch not in self._epochs:
      if not self.shuffle:
        packs, carried = first_fit(self.sizes, np.arange(len(self.sizes)), self.budgets, 1)
      else:
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.sizes))
        packs, carried = first_fit(self.sizes, order, self.budgets, self.bins)
      if len(self._epochs) >= 4:
        self._epochs.pop(min(self._epochs))
      self._epochs[epoch] = (tuple(packs), carried)
    return self._epochs[epoch]

  def __len__(self) -> int:
    return ENDLESS if self.shuffle else len(self.epoch(0)[0])

  def __getitem__(self, index: int) -> np.ndarray:
    """The scan indices of pack `index` of the stream."""
    with self._lock:
      if not self.shuffle:
        return self._epoch(0)[0][index]
      while self._starts[-1] <= index:
        self._starts.append(self._starts[-1] + len(self._epoch(len(self._starts) - 1)[0]))
      epoch = int(np.searchsorted(self._starts, index, side="right")) - 1
      return self._epoch(epoch)[0][index - self._starts[epoch]]


def pack(examples: Sequence[Mapping[str, Any]], budgets: Budgets) -> dict[str, np.ndarray]:
  """The examples of one pack as one example of the pack's fixed shape.

  Args:
    examples: 1 to `budgets.scans` examples of `input_pipeline.Transform`
      (each scan's arrays at its own size, indices into its own voxels).
    budgets: the pack shape.

  Returns:
    The pack (keys: `input_pipeline`'s docstring). In the compact stream the
    scans' voxels follow one another in every stage, every index moved by its
    scan's offset, padding last, with the sentinels T_s (an absent neighbour)
    and T_{s+1} (a padded voxel's parent). In the aligned attention view scan
    j starts at patch boundary a_j = sum of the earlier scans' voxels rounded
    up to the patch.
  """
  stages = len(budgets.tokens)
  if not 1 <= len(examples) <= budgets.scans:
    raise ValueError(f"a pack holds 1 to {budgets.scans} scans, got {len(examples)}")
  counts = np.array([[e[f"s{s}/inverse"].shape[1] for s in range(stages)] for e in examples])
  need = packing_sizes(counts, budgets.patch_size).sum(axis=0)
  if np.any(need > budgets.limits()):
    raise ValueError(f"scans needing {need.tolist()} exceed budgets {budgets.limits().tolist()}")
  starts = np.vstack([np.zeros(stages, np.int64), np.cumsum(counts, axis=0)])  # (n + 1, stages)
  out = {
    "features": _padded([e["features"] for e in examples], budgets.tokens[0], 0),
    "labels": _padded([e["labels"] for e in examples], budgets.tokens[0], 0),
  }
  for s in range(stages):
    out.update(_pack_stage(examples, budgets, starts, s))
  out.update(_pack_scans(examples, budgets, starts[:, 0]))
  if "knn" in examples[0]:  # WaffleIron's keys
    knns = [e["knn"] for e in examples]
    out.update(waffleiron_inputs.pack_inputs(knns, budgets.tokens[0], budgets.scans))
  return out


def _padded(parts: Sequence[np.ndarray], length: int, fill, axis: int = 0) -> np.ndarray:
  """The parts concatenated along `axis` and padded with `fill` to `length`."""
  joined = np.concatenate(parts, axis=axis)
  shape = list(joined.shape)
  shape[axis] = length - joined.shape[axis]
  return np.concatenate([joined, np.full(shape, fill, joined.dtype)], axis=axis)


def _pack_stage(examples, budgets: Budgets, starts: np.ndarray, s: int) -> dict[str, np.ndarray]:
  """The stage-s arrays of a pack (`pack`)."""
  tokens, view, k = budgets.tokens[s], budgets.attention[s], budgets.patch_size
  offsets, counts = starts[:-1, s], np.diff(starts[:, s])
  aligned = np.concatenate([[0], np.cumsum(-(-counts // k) * k)])  # a_j, view start of scan j
  num_curves = examples[0][f"s{s}/order"].shape[0]
  order = np.full((num_curves, view), tokens, np.int32)  # gaps read the zero row
  inverse = np.full((num_curves, tokens), view - 1, np.int32)  # padding: any view slot
  lengths = np.zeros(view // k, np.int32)
  for e, offset, a, n in zip(examples, offsets, aligned[:-1], counts, strict=True):
    order[:, a : a + n] = e[f"s{s}/order"] + offset
    inverse[:, offset : offset + n] = e[f"s{s}/inverse"] + a
    blocks = -(-n // k)
    lengths[a // k : a // k + blocks] = np.minimum(n - k * np.arange(blocks), k)
  neighbors = [
    np.where(e[f"s{s}/neighbors"] == n, tokens, e[f"s{s}/neighbors"] + offset)  # absent: T_s
    for e, offset, n in zip(examples, offsets, counts, strict=True)
  ]
  out = {
    f"s{s}/mask": np.arange(tokens) < starts[-1, s],
    f"s{s}/order": order,
    f"s{s}/inverse": inverse,
    f"s{s}/lengths": lengths,
    f"s{s}/neighbors": _padded(neighbors, tokens, tokens).astype(np.int32),
  }
  if s + 1 < len(budgets.tokens):
    parents = [e[f"s{s}/parent"] + o for e, o in zip(examples, starts[:-1, s + 1], strict=True)]
    out[f"s{s}/parent"] = _padded(parents, tokens, budgets.tokens[s + 1]).astype(np.int32)
    if f"s{s}/octant" in examples[0]:
      out[f"s{s}/octant"] = _padded([e[f"s{s}/octant"] for e in examples], tokens, 0)
  return out


def _pack_scans(examples, budgets: Budgets, starts0: np.ndarray) -> dict[str, np.ndarray]:
  """The per-scan arrays of a pack: pairs (P slots per scan), teacher maps, tokens."""
  n, slots = len(examples), budgets.scans
  empty = slots - n
  out = {
    "token": np.array([e["token"] for e in examples] + [""] * empty, object),
    "scan_start": np.concatenate([starts0[:-1], np.full(empty, starts0[-1])]).astype(np.int32),
    "scan_voxels": np.concatenate([np.diff(starts0), np.zeros(empty)]).astype(np.int32),
  }
  first = examples[0]
  if "pairs_voxel" in first:
    shifted = [e["pairs_voxel"] + o for e, o in zip(examples, starts0[:-1], strict=True)]
    num_pairs = len(first["pairs_voxel"])
    total = slots * num_pairs
    out["pairs_voxel"] = _padded(shifted, total, 0).astype(np.int32)
    out["pairs_camera"] = _padded([e["pairs_camera"] for e in examples], total, 0)
    out["pairs_grid"] = _padded([e["pairs_grid"] for e in examples], total, 0.0)
    out["pairs_mask"] = _padded([e["pairs_mask"] for e in examples], total, False)
  if "teacher" in first:
    out["teacher"] = _padded([e["teacher"][None] for e in examples], slots, 0)
  return out
