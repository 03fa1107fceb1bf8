"""The sharded record store: round trips, atomic writes, resume, refusals."""

import json
import multiprocessing
import os
import pickle

import grain
import numpy as np
import pytest
from array_record.python import array_record_module

from reldistill_jax import records

CONFIG = {"builder": "semantic_kitti", "split": "val", "voxel_size": 0.1, "capacities": (8, 16)}


def make_record(i: int) -> dict:
  rng = np.random.default_rng(i)
  return {
    "token": f"tok-{i}",
    "num_points": 10 + i,
    "scale": 0.5 * i,
    "has_labels": i % 2 == 0,
    "points": rng.normal(size=(10 + i, 5)).astype(np.float32),
    "labels": rng.integers(0, 17, 10 + i).astype(np.uint8),
    "mask": rng.random(7) > 0.5,
    "order": rng.integers(-5, 5, (2, 3, 4)).astype(np.int64),
    "empty": np.zeros((0, 2), np.float16),
    "scalar": np.float64(3.25),
    "codes": np.array([2**64 - 1, 0], np.uint64),
  }


def assert_same(got: dict, want: dict) -> None:
  assert list(got) == list(want)
  for key, value in want.items():
    if isinstance(value, (np.ndarray, np.generic)):
      assert got[key].dtype == value.dtype and got[key].shape == np.shape(value), key
      np.testing.assert_array_equal(got[key], value)
    else:
      assert type(got[key]) is type(value) and got[key] == value, key


def write_store(path, num_records=10, per_shard=4, config=CONFIG) -> records.ShardedWriter:
  num_shards = -(-num_records // per_shard)
  writer = records.ShardedWriter(path, config, num_shards, name="buckets")
  for shard in writer.pending:
    ids = range(shard * per_shard, min(num_records, (shard + 1) * per_shard))
    writer.write_shard(shard, (make_record(i) for i in ids))
  writer.finalize()
  return writer


def test_encode_decode_round_trip():
  record = make_record(3)
  decoded = records.decode_record(records.encode_record(record))
  assert_same(decoded, record)
  decoded["points"][0, 0] = 1.0  # arrays come back writable


def test_truncated_or_corrupt_bytes_are_refused():
  data = records.encode_record(make_record(1))
  for bad in (data[:-1], data[:5], data[: len(data) // 2]):
    with pytest.raises(records.RecordError, match="truncated"):
      records.decode_record(bad)
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0xFF
  with pytest.raises(records.RecordError, match="checksum"):
    records.decode_record(bytes(flipped))
  with pytest.raises(records.RecordError, match="not a record"):
    records.decode_record(b"x" * 100)
  with pytest.raises(TypeError, match="'bad'"):
    records.encode_record({"bad": np.array([None])})


def test_store_round_trip_and_index(tmp_path):
  write_store(tmp_path / "store")
  names = sorted(os.listdir(tmp_path / "store"))
  assert names == [
    "buckets-00000-of-00003.array_record",
    "buckets-00001-of-00003.array_record",
    "buckets-00002-of-00003.array_record",
    "manifest.json",
  ]
  manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
  assert manifest["complete"] and manifest["num_records"] == 10
  assert manifest["config"] == {**CONFIG, "capacities": [8, 16]}
  assert [e["num_records"] for e in manifest["shards"].values()] == [4, 4, 2]
  assert manifest["index"]["tok-5"] == [1, 1]

  reader = records.ShardedReader(tmp_path / "store", expected_config={"split": "val"})
  assert len(reader) == 10 and reader.tokens == [f"tok-{i}" for i in range(10)]
  for i in (0, 3, 4, 9, -1):
    assert_same(reader[i], make_record(i % 10))
  assert_same(reader.get("tok-6"), make_record(6))
  with pytest.raises(KeyError, match="tok-99"):
    reader.get("tok-99")
  with pytest.raises(IndexError):
    reader[10]


def test_grain_reads_the_store_in_worker_processes(tmp_path):
  write_store(tmp_path / "store")
  reader = records.ShardedReader(tmp_path / "store")
  reader[0]  # opened readers must not travel to the workers
  clone = pickle.loads(pickle.dumps(reader))
  assert_same(clone[5], make_record(5))
  dataset = grain.MapDataset.source(reader).map(lambda r: r["token"])
  assert list(dataset) == reader.tokens
  tokens = list(dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
  assert sorted(tokens) == sorted(reader.tokens)


def _crash_mid_shard(path: str) -> None:
  def records_then_crash():
    yield make_record(0)
    yield make_record(1)
    os._exit(1)  # a hard crash: no cleanup, no exception handling

  writer = records.ShardedWriter(path, CONFIG, 2, name="buckets")
  writer.write_shard(0, records_then_crash())


def test_crash_mid_shard_leaves_nothing_that_looks_complete(tmp_path):
  path = str(tmp_path / "store")
  process = multiprocessing.get_context("spawn").Process(target=_crash_mid_shard, args=(path,))
  process.start()
  process.join()
  assert process.exitcode == 1
  assert not [n for n in os.listdir(path) if n.endswith(".array_record")]
  assert [n for n in os.listdir(path) if ".tmp-" in n]  # the crash left its partial file
  with pytest.raises(records.RecordError, match="incomplete store \\(0 of 2 shards"):
    records.ShardedReader(path)
  # A new writer removes it; an exception mid-shard cleans up after itself.
  writer = records.ShardedWriter(path, CONFIG, 2, name="buckets")
  assert os.listdir(path) == ["manifest.json"]

  def failing():
    yield make_record(0)
    raise RuntimeError("scan failed")

  with pytest.raises(RuntimeError, match="scan failed"):
    writer.write_shard(1, failing())
  assert writer.pending == [0, 1]
  assert not [n for n in os.listdir(path) if n.endswith(".array_record")]
  # A re-run completes the store.
  writer.write_shard(0, map(make_record, range(2)))
  writer.write_shard(1, map(make_record, range(2, 4)))
  writer.finalize()
  assert records.ShardedReader(path).tokens == ["tok-0", "tok-1", "tok-2", "tok-3"]


def test_rerun_skips_complete_shards(tmp_path):
  path = tmp_path / "store"
  writer = records.ShardedWriter(path, CONFIG, 3, name="buckets")
  writer.write_shard(0, map(make_record, range(4)))
  writer.write_shard(2, map(make_record, range(8, 10)))
  first_mtime = os.path.getmtime(writer.shard_path(0))
  # A shard file renamed just before a crash, but not yet in the manifest, is redone.
  records.write_shard_file(writer.shard_path(1), map(make_record, range(4, 8)))

  again = records.ShardedWriter(path, {**CONFIG, "capacities": [8, 16]}, 3, name="buckets")
  assert again.pending == [1]
  with pytest.raises(RuntimeError, match="shards \\[1\\] are not written"):
    again.finalize()
  again.write_shard(1, map(make_record, range(4, 8)))
  again.finalize()
  assert os.path.getmtime(writer.shard_path(0)) == first_mtime
  assert records.ShardedReader(path).tokens == [f"tok-{i}" for i in range(10)]
  assert records.ShardedWriter(path, CONFIG, 3, name="buckets").pending == []


def test_config_mismatch_is_refused(tmp_path):
  path = tmp_path / "store"
  write_store(path)
  before = sorted(os.listdir(path))
  other = {**CONFIG, "voxel_size": 0.05, "grid": "cylindrical"}
  with pytest.raises(records.ConfigMismatchError, match=f"{path}.*\\['grid', 'voxel_size'\\]"):
    records.ShardedWriter(path, other, 3, name="buckets")
  with pytest.raises(records.ConfigMismatchError, match="num_shards"):
    records.ShardedWriter(path, CONFIG, 4, name="buckets")
  assert sorted(os.listdir(path)) == before
  with pytest.raises(records.ConfigMismatchError, match="\\['voxel_size'\\].*0.1.*0.05"):
    records.ShardedReader(path, expected_config={"voxel_size": 0.05, "split": "val"})
  with pytest.raises(records.ConfigMismatchError, match="\\['grid'\\]"):
    records.ShardedReader(path, expected_config={"grid": "cartesian"})


def test_duplicate_tokens_are_refused(tmp_path):
  writer = records.ShardedWriter(tmp_path / "store", CONFIG, 2, name="buckets")
  writer.write_shard(0, map(make_record, range(2)))
  with pytest.raises(records.RecordError, match="'tok-1' is both at \\[0, 1\\] and at \\[1, 0\\]"):
    writer.write_shard(1, map(make_record, [1, 2]))


def test_missing_store_or_shard_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
    records.ShardedReader(tmp_path / "nothing")
  writer = write_store(tmp_path / "store")
  os.remove(writer.shard_path(1))
  with pytest.raises(FileNotFoundError, match="buckets-00001-of-00003.array_record"):
    records.ShardedReader(tmp_path / "store")


def test_corrupt_record_names_shard_and_position(tmp_path):
  path = tmp_path / "store"
  writer = records.ShardedWriter(path, CONFIG, 1, name="buckets")
  good = records.encode_record(make_record(0))
  # A record whose bytes were cut short before they reached the store.
  raw = array_record_module.ArrayRecordWriter(writer.shard_path(0), records.WRITER_OPTIONS)
  raw.write(good)
  raw.write(good[:-100])
  raw.close()
  shard = writer.shard_path(0)
  written = {"tokens": ["tok-0", "tok-1"], "num_bytes": os.path.getsize(shard)}
  writer.mark_complete(0, written | {"sha256": records.file_sha256(shard)})
  writer.finalize()
  reader = records.ShardedReader(path)
  assert_same(reader[0], make_record(0))
  with pytest.raises(records.RecordError, match="buckets-00000-of-00001.array_record, position 1"):
    reader[1]


def test_corrupt_shard_file_names_the_file(tmp_path):
  writer = write_store(tmp_path / "store", num_records=4, per_shard=4)
  shard = writer.shard_path(0)
  data = bytearray(open(shard, "rb").read())
  data[100:200] = bytes(100)  # zero a stretch of the first record's chunk
  open(shard, "wb").write(bytes(data))
  reader = records.ShardedReader(tmp_path / "store")
  with pytest.raises(records.RecordError, match="buckets-00000-of-00001.array_record"):
    reader[0]
  with open(shard, "wb") as f:  # truncated file
    f.write(bytes(data[: len(data) // 2]))
  with pytest.raises(records.RecordError, match="buckets-00000-of-00001.array_record holds 0"):
    records.ShardedReader(tmp_path / "store")[0]


def _damage(path, how: str) -> None:
  data = bytearray(open(path, "rb").read())
  if how == "flip":
    data[len(data) // 2] ^= 0xFF
  elif how == "truncate":
    data = data[: len(data) // 3]
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_a_rerun_rewrites_a_damaged_shard(tmp_path, how, caplog):
  path = tmp_path / "store"
  writer = write_store(path)
  shard = writer.shard_path(1)
  before = open(shard, "rb").read()
  untouched = os.path.getmtime(writer.shard_path(0))
  manifest = json.loads((path / "manifest.json").read_text())
  entry = manifest["shards"]["1"]
  assert entry["num_bytes"] == len(before) and entry["sha256"] == records.file_sha256(shard)
  assert records.verify_store(path) == {}
  if how == "delete":
    os.remove(shard)
  else:
    _damage(shard, how)
  problem = records.verify_store(path)
  assert list(problem) == ["buckets-00001-of-00003.array_record"]
  assert {"flip": "sha256", "truncate": "bytes", "delete": "missing"}[how] in problem[
    "buckets-00001-of-00003.array_record"
  ]
  with pytest.raises(records.RecordError, match="1 of 3 listed shards are damaged"):
    records.check_store(path)

  # The rerun (the same writing loop) verifies, logs the damaged shard and rewrites it alone.
  caplog.set_level("WARNING")
  again = records.ShardedWriter(path, CONFIG, 3, name="buckets")
  assert again.pending == [1]
  assert "buckets-00001-of-00003.array_record" in caplog.text and "rewriting" in caplog.text
  with pytest.raises(records.RecordError, match="incomplete store"):  # until it is repaired
    records.ShardedReader(path)
  for pending in again.pending:
    again.write_shard(pending, (make_record(i) for i in range(4, 8)))
  again.finalize()
  assert open(shard, "rb").read() == before
  assert os.path.getmtime(writer.shard_path(0)) == untouched
  assert records.check_store(path).endswith("3 of 3 shards intact (complete)")
  assert_same(records.ShardedReader(path).get("tok-5"), make_record(5))


def test_stores_of_older_manifests_are_verified_by_decoding(tmp_path):
  path = tmp_path / "store"
  write_store(path)
  manifest = json.loads((path / "manifest.json").read_text())
  for entry in manifest["shards"].values():  # a manifest written before sizes and checksums
    del entry["num_bytes"], entry["sha256"]
  (path / "manifest.json").write_text(json.dumps(manifest))
  assert records.verify_store(path) == {}
  _damage(path / manifest["shards"]["2"]["file"], "flip")
  assert list(records.verify_store(path)) == [manifest["shards"]["2"]["file"]]


def test_writer_stats_are_summed_in_the_manifest(tmp_path):
  writer = records.ShardedWriter(tmp_path / "store", CONFIG, 2, name="buckets")
  writer.write_shard(0, map(make_record, range(3)), {"labelled_scans": 2, "dropped_voxels": 5})
  writer.write_shard(1, map(make_record, range(3, 4)), {"labelled_scans": 0, "dropped_voxels": 1})
  assert writer.finalize()["stats"] == {"labelled_scans": 2, "dropped_voxels": 6}
  assert records.ShardedReader(tmp_path / "store").stats == {
    "labelled_scans": 2,
    "dropped_voxels": 6,
  }
