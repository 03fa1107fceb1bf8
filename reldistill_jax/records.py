"""The keyed, sharded ArrayRecord store of every offline output.

A store is a folder:

  OUT/<name>-SSSSS-of-NNNNN.array_record   the shards, one record per key
  OUT/manifest.json                        config, shards, counts, index

`manifest.json` holds the caller's `config` (whatever defines the content:
builder, split, voxel size, ...), `num_shards`, the completed `shards` (each
with its file, record count, size in bytes, sha256, the writer's `stats` and
per-record `sizes`, e.g. a bucket's voxels per stage, read without opening
the shard),
`num_records`, `stats` (the shards' stats summed), `complete`, and `index`,
mapping each record's `token` to `[shard, position]`. Records are dicts of
numpy arrays and scalars in the binary format of `encode_record`.

Writes are atomic: a shard is written to a hidden temporary file and renamed
when closed, and the manifest is rewritten through a temporary file after
every shard, so a crash never leaves a shard or manifest that looks complete.
A re-run with the same config verifies every shard the manifest lists against
its size and sha256 (`verify_shard`: reading, not decoding), rewrites a damaged
or missing one (logged, naming it) and skips the others; a re-run with another
config is refused. `verify_store` only checks. Readers refuse incomplete
stores, stores of another config, missing shards and corrupt records, naming
the file.

Record format (little-endian): magic `RDREC\\x00\\x01\\n` (8 bytes), the header
length (uint32), a JSON header, zero padding to 8 bytes, the array payload
(each array 8-byte aligned, C order), and a CRC-32 (uint32) of everything
before it. The header lists every field: arrays by dtype, shape, offset and
size; str, int, float and bool values inline.
"""

import hashlib
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from array_record.python import array_record_module

from reldistill_jax import errors, files

MANIFEST = "manifest.json"
FORMAT = "reldistill_jax.records/1"

# One record per chunk makes every record randomly readable; zstd shrinks a
# padded bucket about 10x and decompresses in a few milliseconds.
WRITER_OPTIONS = "group_size:1,zstd:3"
READER_OPTIONS = "readahead_buffer_size:0"

REWRITE = "rerun the command that writes the store to rewrite the shard"
_MAGIC = b"RDREC\x00\x01\n"
_PREFIX = struct.Struct("<8sI")
_CRC = struct.Struct("<I")
_ALIGN = 8

Value = np.ndarray | np.generic | str | int | float | bool


class RecordError(errors.DataError):
  """A record or store that cannot be read as written."""


class ConfigMismatchError(errors.DataError):
  """A store written with another config than the one asked for."""


# ----------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------


def _aligned(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


def encode_record(record: Mapping[str, Value]) -> bytes:
  """Serialises a dict of numpy arrays and scalars, preserving dtypes and shapes.

  Args:
    record: field name -> numpy array (any non-object, non-structured dtype),
      numpy scalar (stored as a 0-d array), str, int, float or bool.

  Returns:
    The record's bytes (format in the module docstring).
  """
  fields, arrays, offset = [], [], 0
  for name, value in record.items():
    if not isinstance(name, str):
      raise TypeError(f"field names must be str, got {name!r}")
    # numpy scalars first: np.float64 is also a Python float.
    if isinstance(value, (np.ndarray, np.generic)):
      array = np.asarray(value)
      if not array.flags.c_contiguous:
        array = array.copy(order="C")
      if array.dtype.hasobject or array.dtype.fields is not None:
        raise TypeError(f"field {name!r}: dtype {array.dtype} cannot be stored")
      fields.append(
        {
          "name": name,
          "kind": "array",
          "dtype": array.dtype.str,
          "shape": list(array.shape),
          "offset": offset,
          "nbytes": array.nbytes,
        }
      )
      arrays.append((offset, array))
      offset = _aligned(offset + array.nbytes)
    elif isinstance(value, bool):
      fields.append({"name": name, "kind": "bool", "value": value})
    elif isinstance(value, (str, int, float)):
      fields.append({"name": name, "kind": type(value).__name__, "value": value})
    else:
      raise TypeError(f"field {name!r}: cannot store a {type(value).__name__}")
  header = json.dumps({"fields": fields, "payload": offset}, separators=(",", ":")).encode()
  start = _aligned(_PREFIX.size + len(header))
  buf = bytearray(start + offset + _CRC.size)
  _PREFIX.pack_into(buf, 0, _MAGIC, len(header))
  buf[_PREFIX.size : _PREFIX.size + len(header)] = header
  view = memoryview(buf)
  for field_offset, array in arrays:
    at = start + field_offset
    view[at : at + array.nbytes] = array.reshape(-1).view(np.uint8)
  _CRC.pack_into(buf, len(buf) - _CRC.size, zlib.crc32(view[: len(buf) - _CRC.size]))
  return bytes(buf)


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`; arrays come back writable.

  Args:
    data: bytes from `encode_record`.

  Returns:
    The record, with the dtypes, shapes and scalar types it was written with.

  Raises:
    RecordError: the bytes are truncated, corrupt or not a record.
  """
  data = memoryview(data)
  size = len(data)
  if size < _PREFIX.size + _CRC.size:
    raise RecordError(f"truncated record: {size} bytes")
  magic, header_len = _PREFIX.unpack_from(data, 0)
  if magic != _MAGIC:
    raise RecordError(f"not a record (magic {bytes(magic)!r})")
  (stored_crc,) = _CRC.unpack_from(data, size - _CRC.size)
  if zlib.crc32(data[: size - _CRC.size]) != stored_crc:
    raise RecordError(f"corrupt or truncated record ({size} bytes): checksum mismatch")
  try:
    header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_len]))
    start = _aligned(_PREFIX.size + header_len)
    if start + header["payload"] + _CRC.size != size:
      raise RecordError(f"record size {size} does not match its header")
    # One copy makes every array writable (views of the same buffer).
    payload = bytearray(data[start : start + header["payload"]])
    record = {}
    for field in header["fields"]:
      if field["kind"] != "array":
        record[field["name"]] = field["value"]
        continue
      dtype = np.dtype(field["dtype"])
      count = int(np.prod(field["shape"], dtype=np.int64))
      if count * dtype.itemsize != field["nbytes"]:
        raise RecordError(f"field {field['name']!r}: size does not match its shape")
      record[field["name"]] = np.frombuffer(payload, dtype, count, field["offset"]).reshape(
        field["shape"]
      )
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, RecordError):
      raise
    raise RecordError(f"malformed record header: {e!r}") from e
  return record


# ----------------------------------------------------------------------------
# Manifest.
# ----------------------------------------------------------------------------


def _normalise(config: Mapping[str, Any]) -> dict[str, Any]:
  """The config as JSON reads it back (tuples become lists), so it compares."""
  return json.loads(json.dumps(dict(config)))


def _config_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any], keys) -> list[str]:
  missing = object()
  return sorted(k for k in keys if stored.get(k, missing) != wanted.get(k, missing))


def _describe(diff: list[str], stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
  return "; ".join(
    f"{k}: stored {stored.get(k, '<absent>')!r}, wanted {wanted.get(k, '<absent>')!r}" for k in diff
  )


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the store at `path` (a folder)."""
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(
      f"no record store at {path}: {manifest_path} is missing (run the command that writes it)"
    )
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RecordError(f"{manifest_path}: not a valid manifest ({e}); remove the store") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    found = manifest.get("format") if isinstance(manifest, dict) else None
    raise RecordError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}")
  return manifest


def shard_filename(name: str, shard: int, num_shards: int) -> str:
  return f"{name}-{shard:05d}-of-{num_shards:05d}.array_record"


def file_sha256(path: str) -> str:
  """The sha256 of a file's bytes, as hex."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_shard_file(path: str, records: Iterable[Mapping[str, Value]]) -> dict[str, Any]:
  """Writes one shard atomically: a hidden temporary file renamed when complete.

  Safe to call from worker processes (it touches no manifest).

  Args:
    path: the shard's final path.
    records: the shard's records, each with a str `token`.

  Returns:
    {"tokens": the records' tokens in the shard's order, "num_bytes" and
    "sha256" of the file}: what `ShardedWriter.mark_complete` records.
  """
  folder, base = os.path.split(path)
  tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
  tokens = []
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  try:
    for record in records:
      token = record.get("token")
      if not isinstance(token, str):
        raise ValueError(f"every record needs a str 'token', got {token!r}")
      writer.write(encode_record(record))
      tokens.append(token)
    writer.close()
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    written = {"tokens": tokens, "num_bytes": os.path.getsize(tmp), "sha256": file_sha256(tmp)}
    os.replace(tmp, path)
  except BaseException:
    if writer.is_open():
      writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return written


def verify_shard(path: str, entry: Mapping[str, Any]) -> str | None:
  """What is wrong with a written shard, or None when it is as the manifest lists it.

  A shard with a recorded size and sha256 is checked against them (one read
  of the file, no decoding); a shard of an older manifest without them is
  checked by reading and decoding every record (count and CRC).
  """
  if not os.path.exists(path):
    return "is missing"
  size = os.path.getsize(path)
  if "sha256" in entry:
    if size != entry["num_bytes"]:
      return (
        f"holds {size} bytes, the manifest lists {entry['num_bytes']} (truncated or overwritten)"
      )
    if file_sha256(path) != entry["sha256"]:
      return "does not match the sha256 in the manifest (corrupt)"
    return None
  try:
    reader = array_record_module.ArrayRecordReader(path, READER_OPTIONS)
    count = reader.num_records()
    if count != entry["num_records"]:
      return f"holds {count} readable records, the manifest lists {entry['num_records']}"
    for position in range(count):
      decode_record(reader.read([position])[0])
    reader.close()
  except Exception as e:  # the C++ reader raises plain runtime errors
    return f"cannot be read ({errors.one_line(e)})"
  return None


def verify_store(path: str) -> dict[str, str]:
  """Checks every shard a store's manifest lists (`verify_shard`), changing nothing.

  Returns:
    {shard file: what is wrong} for the damaged shards; empty when every
    listed shard is intact.
  """
  manifest = read_manifest(path)
  damaged = {}
  for entry in manifest["shards"].values():
    problem = verify_shard(os.path.join(path, entry["file"]), entry)
    if problem:
      damaged[entry["file"]] = problem
  return damaged


def check_store(path: str) -> str:
  """`verify_store` as a command's answer (`--verify`): a summary line when intact.

  Raises:
    RecordError: naming every damaged shard and what is wrong with it.
  """
  manifest = read_manifest(path)
  damaged = verify_store(path)
  listed = len(manifest["shards"])
  if damaged:
    problems = "; ".join(f"{name} {problem}" for name, problem in damaged.items())
    raise RecordError(
      f"{path}: {len(damaged)} of {listed} listed shards are damaged ({problems}); rerun the "
      "command that wrote the store (without --verify) to rewrite them"
    )
  state = "complete" if manifest["complete"] else "incomplete, rerun the command that writes it"
  return f"{path}: {listed} of {manifest['num_shards']} shards intact ({state})"


class ShardedWriter:
  """Writes a store shard by shard, resuming an interrupted run.

  Usage: `for shard in writer.pending: writer.write_shard(shard, records)`,
  then `writer.finalize()`. Shards may also be written elsewhere (worker
  processes) with `write_shard_file(writer.shard_path(i), ...)` and recorded
  here with `writer.mark_complete(i, written)`. Opening a folder that holds a
  store verifies its listed shards (`verify_shard`); damaged ones are pending.
  """

  def __init__(self, path: str, config: Mapping[str, Any], num_shards: int, name: str = "records"):
    """Opens or creates the store.

    Args:
      path: the store's folder (created if absent).
      config: JSON-serialisable dict of everything that defines the content.
      num_shards: number of shards of the store.
      name: shard file name prefix.

    Raises:
      ConfigMismatchError: the folder holds a store with another config (or
        shard layout); it is never overwritten.
    """
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    self.path = os.fspath(path)
    self.name = name
    self.num_shards = num_shards
    self.config = _normalise(config)
    os.makedirs(self.path, exist_ok=True)
    # Temporary files of a crashed run are never renamed; remove them.
    prefix = f".{name}-"
    for stale in os.listdir(self.path):
      if stale.startswith(prefix) and ".array_record.tmp-" in stale:
        os.remove(os.path.join(self.path, stale))
    if os.path.exists(os.path.join(self.path, MANIFEST)):
      manifest = read_manifest(self.path)
      stored = manifest["config"]
      diff = _config_diff(stored, self.config, set(stored) | set(self.config))
      layout = {"name": name, "num_shards": num_shards}
      diff += [k for k, v in layout.items() if manifest.get(k) != v]
      if diff:
        stored_all = {**stored, "name": manifest.get("name"), "num_shards": manifest["num_shards"]}
        raise ConfigMismatchError(
          f"{self.path} holds a store with another config (keys {diff}: "
          f"{_describe(diff, stored_all, {**self.config, **layout})}); "
          "write to another folder or remove it"
        )
      # A shard counts as written when the manifest lists it and it verifies
      # (a shard renamed just before a crash is simply written again).
      self._shards = {}
      for shard, entry in manifest["shards"].items():
        problem = verify_shard(os.path.join(self.path, entry["file"]), entry)
        if problem:
          logging.warning("%s: shard %s %s; rewriting it", self.path, entry["file"], problem)
        else:
          self._shards[int(shard)] = entry
      self._index = {t: sp for t, sp in manifest["index"].items() if sp[0] in self._shards}
      if len(self._shards) < len(manifest["shards"]) and manifest["complete"]:
        self._write_manifest(complete=False)  # being repaired: not complete until it is
    else:
      self._shards, self._index = {}, {}
      self._write_manifest(complete=False)

  def shard_path(self, shard: int) -> str:
    return os.path.join(self.path, shard_filename(self.name, shard, self.num_shards))

  @property
  def pending(self) -> list[int]:
    """Shards not yet written, in order."""
    return [s for s in range(self.num_shards) if s not in self._shards]

  def write_shard(
    self,
    shard: int,
    records: Iterable[Mapping[str, Value]],
    stats: Mapping | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
  ) -> None:
    """Writes shard `shard` atomically and records it in the manifest."""
    self.mark_complete(shard, write_shard_file(self.shard_path(shard), records), stats, sizes)

  def mark_complete(
    self,
    shard: int,
    written: Mapping[str, Any],
    stats: Mapping[str, int] | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
  ) -> None:
    """Records a shard written by `write_shard_file` (rewrites the manifest).

    Args:
      shard: the shard's index.
      written: what `write_shard_file` returned.
      stats: counts the caller keeps per shard (e.g. labelled scans); the
        finalised manifest holds their sums as `stats`.
      sizes: one row of integers per record, in the shard's order (e.g. a
        bucket's voxels per stage); readers get them as `sizes`.

    Raises:
      RecordError: a token is already in another shard (or twice in this one).
    """
    tokens = written["tokens"]
    if sizes is not None and len(sizes) != len(tokens):
      raise ValueError(f"{len(sizes)} rows of sizes for the {len(tokens)} records of shard {shard}")
    if not 0 <= shard < self.num_shards:
      raise ValueError(f"shard {shard} outside [0, {self.num_shards})")
    # A shard written again replaces its old entries.
    self._index = {t: sp for t, sp in self._index.items() if sp[0] != shard}
    entries = {}
    for position, token in enumerate(tokens):
      other = entries.get(token) or self._index.get(token)
      if other is not None:
        raise RecordError(
          f"{self.path}: token {token!r} is both at {other} and at {[shard, position]}"
        )
      entries[token] = [shard, position]
    self._shards[shard] = {
      "file": shard_filename(self.name, shard, self.num_shards),
      "num_records": len(tokens),
      "num_bytes": written["num_bytes"],
      "sha256": written["sha256"],
      "stats": dict(stats or {}),
    }
    if sizes is not None:
      self._shards[shard]["sizes"] = [[int(v) for v in row] for row in sizes]
    self._index.update(entries)
    self._write_manifest(complete=False)

  def finalize(self) -> dict[str, Any]:
    """Marks the store complete; every shard must be written.

    Returns:
      The final manifest.

    Raises:
      RuntimeError: shards are missing.
    """
    if self.pending:
      raise RuntimeError(f"{self.path}: shards {self.pending} are not written yet")
    return self._write_manifest(complete=True)

  def _write_manifest(self, complete: bool) -> dict[str, Any]:
    shards = {str(s): self._shards[s] for s in sorted(self._shards)}
    # The index of an incomplete store covers its written shards, so that a
    # resumed run needs not read them back.
    index = dict(sorted(self._index.items(), key=lambda item: item[1]))
    totals: dict[str, int] = {}
    for entry in shards.values():
      for key, value in entry.get("stats", {}).items():
        totals[key] = totals.get(key, 0) + value
    manifest = {
      "format": FORMAT,
      "name": self.name,
      "config": self.config,
      "num_shards": self.num_shards,
      "complete": complete,
      "num_records": sum(e["num_records"] for e in shards.values()),
      "stats": totals,
      "shards": shards,
      "index": index,
    }
    files.atomic_write(os.path.join(self.path, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


class ShardedReader:
  """Random access to a complete store: a grain `RandomAccessDataSource`.

  `reader[i]` is the i-th record (shards in order) as a dict, `reader.get(token)`
  the record of a token. Shard files are opened lazily, per process, so a
  reader pickles into grain worker processes.
  """

  def __init__(self, path: str, expected_config: Mapping[str, Any] | None = None):
    """Opens the store at `path`.

    Args:
      path: the store's folder.
      expected_config: if given, every one of its keys must be in the store's
        config with the same value (a consumer pins what it depends on).

    Raises:
      FileNotFoundError: no manifest, or a shard file is missing.
      RecordError: the store is incomplete.
      ConfigMismatchError: the config differs from `expected_config`.
    """
    self.path = os.fspath(path)
    manifest = read_manifest(self.path)
    self.config = manifest["config"]
    # Sums of the writer's per-shard counts (absent in stores of older versions).
    self.stats = manifest.get("stats", {})
    if not manifest["complete"]:
      written = len(manifest["shards"])
      raise RecordError(
        f"{self.path}: incomplete store ({written} of {manifest['num_shards']} shards written); "
        "rerun the command that writes it"
      )
    if expected_config is not None:
      wanted = _normalise(expected_config)
      diff = _config_diff(self.config, wanted, wanted)
      if diff:
        raise ConfigMismatchError(
          f"{self.path} was written with another config (keys {diff}: "
          f"{_describe(diff, self.config, wanted)}); give a store written with those settings"
        )
    entries = [manifest["shards"][str(s)] for s in range(manifest["num_shards"])]
    self._files = [os.path.join(self.path, e["file"]) for e in entries]
    missing = [f for f in self._files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(
        f"{self.path}: missing shard files {missing}; rerun the command that writes the store "
        "to rewrite them"
      )
    self._starts = np.cumsum([0] + [e["num_records"] for e in entries])
    # (N, k) per-record sizes of the writer, in record order; None when not written.
    rows = [row for e in entries for row in e.get("sizes", [])]
    self.sizes = np.asarray(rows, np.int64) if len(rows) == len(self) and rows else None
    self._index = {t: (int(s), int(p)) for t, (s, p) in manifest["index"].items()}
    if len(self._index) != len(self):
      raise RecordError(f"{self.path}: the index holds {len(self._index)} of {len(self)} records")
    self._tokens = sorted(self._index, key=self._index.get)
    self._readers = [None] * len(self._files)
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = [None] * len(self._files)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f"ShardedReader({self.path!r}, {len(self)} records in {len(self._files)} shards)"

  @property
  def tokens(self) -> list[str]:
    """Tokens of all records, in index order."""
    return list(self._tokens)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} outside a store of {len(self)}")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._read(shard, index - int(self._starts[shard]))

  def get(self, token: str) -> dict[str, Any]:
    """The record of `token` (KeyError if absent)."""
    if token not in self._index:
      raise KeyError(f"token {token!r} is not in {self.path}")
    return self._read(*self._index[token])

  def _reader(self, shard: int):
    if self._readers[shard] is None:
      with self._lock:
        if self._readers[shard] is None:
          try:
            reader = array_record_module.ArrayRecordReader(self._files[shard], READER_OPTIONS)
          except Exception as e:  # the C++ reader raises plain runtime errors
            raise RecordError(f"cannot open shard {self._files[shard]}: {e}; {REWRITE}") from e
          expected = int(self._starts[shard + 1] - self._starts[shard])
          if not reader.ok() or reader.num_records() != expected:
            raise RecordError(
              f"shard {self._files[shard]} holds {reader.num_records()} readable records, "
              f"the manifest lists {expected} (truncated or overwritten); {REWRITE}"
            )
          self._readers[shard] = reader
    return self._readers[shard]

  def _read(self, shard: int, position: int) -> dict[str, Any]:
    where = f"shard {self._files[shard]}, position {position}"
    try:
      (data,) = self._reader(shard).read([position])
    except RecordError:
      raise
    except Exception as e:
      raise RecordError(f"cannot read {where}: {e}; {REWRITE}") from e
    try:
      return decode_record(data)
    except RecordError as e:
      raise RecordError(f"{where}: {e}; {REWRITE}") from e
