"""The keyed, sharded ArrayRecord store of every offline output.

A store is a folder:

  OUT/<name>-SSSSS-of-NNNNN.array_record   the shards, one record per key
  OUT/manifest.json                        config, shards, counts, index

`manifest.json` holds the caller's `config` (whatever defines the content:
builder, split, voxel size, ...), `num_shards`, the completed `shards` with
their record counts, `num_records`, `complete`, and `index`, mapping each
record's `token` to `[shard, position]`. Records are dicts of numpy arrays and
scalars in the binary format of `encode_record`.

Writes are atomic: a shard is written to a hidden temporary file and renamed
when closed, and the manifest is rewritten through a temporary file after
every shard, so a crash never leaves a shard or manifest that looks complete.
A re-run with the same config skips the completed shards; a re-run with
another config is refused. Readers refuse incomplete stores, stores of another
config, missing shards and corrupt records, naming the file.

Record format (little-endian): magic `RDREC\\x00\\x01\\n` (8 bytes), the header
length (uint32), a JSON header, zero padding to 8 bytes, the array payload
(each array 8-byte aligned, C order), and a CRC-32 (uint32) of everything
before it. The header lists every field: arrays by dtype, shape, offset and
size; str, int, float and bool values inline.
"""

import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from array_record.python import array_record_module

MANIFEST = "manifest.json"
FORMAT = "reldistill_jax.records/1"

# One record per chunk makes every record randomly readable; zstd shrinks a
# padded bucket about 10x and decompresses in a few milliseconds.
WRITER_OPTIONS = "group_size:1,zstd:3"
READER_OPTIONS = "readahead_buffer_size:0"

_MAGIC = b"RDREC\x00\x01\n"
_PREFIX = struct.Struct("<8sI")
_CRC = struct.Struct("<I")
_ALIGN = 8

Value = np.ndarray | np.generic | str | int | float | bool


class RecordError(ValueError):
  """A record or store that cannot be read as written."""


class ConfigMismatchError(ValueError):
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


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the store at `path` (a folder)."""
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(f"no record store at {path}: {manifest_path} is missing")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise RecordError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def shard_filename(name: str, shard: int, num_shards: int) -> str:
  return f"{name}-{shard:05d}-of-{num_shards:05d}.array_record"


def write_shard_file(path: str, records: Iterable[Mapping[str, Value]]) -> list[str]:
  """Writes one shard atomically: a hidden temporary file renamed when complete.

  Safe to call from worker processes (it touches no manifest).

  Args:
    path: the shard's final path.
    records: the shard's records, each with a str `token`.

  Returns:
    The tokens of the records, in the shard's order.
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
    os.replace(tmp, path)
  except BaseException:
    if writer.is_open():
      writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return tokens


class ShardedWriter:
  """Writes a store shard by shard, resuming an interrupted run.

  Usage: `for shard in writer.pending: writer.write_shard(shard, records)`,
  then `writer.finalize()`. Shards may also be written elsewhere (worker
  processes) with `write_shard_file(writer.shard_path(i), ...)` and recorded
  here with `writer.mark_complete(i, tokens)`.
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
      # A shard counts as written when the manifest lists it and its file is
      # there (a shard renamed just before a crash is simply written again).
      self._shards = {
        int(s): e
        for s, e in manifest["shards"].items()
        if os.path.exists(os.path.join(self.path, e["file"]))
      }
      self._index = {t: sp for t, sp in manifest["index"].items() if sp[0] in self._shards}
    else:
      self._shards, self._index = {}, {}
      self._write_manifest(complete=False)

  def shard_path(self, shard: int) -> str:
    return os.path.join(self.path, shard_filename(self.name, shard, self.num_shards))

  @property
  def pending(self) -> list[int]:
    """Shards not yet written, in order."""
    return [s for s in range(self.num_shards) if s not in self._shards]

  def write_shard(self, shard: int, records: Iterable[Mapping[str, Value]]) -> None:
    """Writes shard `shard` atomically and records it in the manifest."""
    self.mark_complete(shard, write_shard_file(self.shard_path(shard), records))

  def mark_complete(self, shard: int, tokens: list[str]) -> None:
    """Records a shard written by `write_shard_file` (rewrites the manifest).

    Raises:
      RecordError: a token is already in another shard (or twice in this one).
    """
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
    }
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
    manifest = {
      "format": FORMAT,
      "name": self.name,
      "config": self.config,
      "num_shards": self.num_shards,
      "complete": complete,
      "num_records": sum(e["num_records"] for e in shards.values()),
      "shards": shards,
      "index": index,
    }
    _atomic_write_json(os.path.join(self.path, MANIFEST), manifest)
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
    if not manifest["complete"]:
      written = len(manifest["shards"])
      raise RecordError(
        f"{self.path}: incomplete store ({written} of {manifest['num_shards']} shards written); "
        "re-run the command that writes it"
      )
    if expected_config is not None:
      wanted = _normalise(expected_config)
      diff = _config_diff(self.config, wanted, wanted)
      if diff:
        raise ConfigMismatchError(
          f"{self.path} was written with another config (keys {diff}: "
          f"{_describe(diff, self.config, wanted)})"
        )
    entries = [manifest["shards"][str(s)] for s in range(manifest["num_shards"])]
    self._files = [os.path.join(self.path, e["file"]) for e in entries]
    missing = [f for f in self._files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(f"{self.path}: missing shard files {missing}")
    self._starts = np.cumsum([0] + [e["num_records"] for e in entries])
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
            raise RecordError(f"cannot open shard {self._files[shard]}: {e}") from e
          expected = int(self._starts[shard + 1] - self._starts[shard])
          if not reader.ok() or reader.num_records() != expected:
            raise RecordError(
              f"shard {self._files[shard]} holds {reader.num_records()} readable records, "
              f"the manifest lists {expected} (truncated or overwritten)"
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
      raise RecordError(f"cannot read {where}: {e}") from e
    try:
      return decode_record(data)
    except RecordError as e:
      raise RecordError(f"{where}: {e}") from e
