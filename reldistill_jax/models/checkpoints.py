"""Reading teacher checkpoints from local files, without torch.

A checkpoint folder holds `config.json` and `model.safetensors` (Hugging Face
`transformers` layout) or an open_clip `*.safetensors`. safetensors is an
8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw little-endian buffers; it is
read here directly into numpy (bfloat16 through `ml_dtypes`, which JAX ships).
"""

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint file is missing, malformed, or of another architecture."""


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file as numpy arrays (names as stored).

  Raises:
    CheckpointError: if the file is missing, truncated or malformed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: safetensors file not found")
  data = path.read_bytes()
  if len(data) < 8:
    raise CheckpointError(f"{path}: too short for a safetensors file")
  (header_len,) = struct.unpack("<Q", data[:8])
  if 8 + header_len > len(data):
    raise CheckpointError(f"{path}: header length {header_len} exceeds the file size")
  try:
    header = json.loads(data[8 : 8 + header_len])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
  body = memoryview(data)[8 + header_len :]
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    if end > len(body) or end - start != dtype.itemsize * int(np.prod(info["shape"])):
      raise CheckpointError(f"{path}: tensor {name} lies outside the file or has the wrong size")
    tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"]).copy()
  return tensors


def read_config(folder: str | pathlib.Path) -> dict:
  """The `config.json` of a checkpoint folder.

  Raises:
    CheckpointError: if it is missing or not JSON.
  """
  path = pathlib.Path(folder) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path}: config.json not found in the checkpoint folder")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def take(
  tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...], source: str
) -> np.ndarray:
  """tensors[name] as float32, checked against the shape the model expects.

  Raises:
    CheckpointError: naming the parameter, if it is absent or of another shape.
  """
  if name not in tensors:
    raise CheckpointError(f"{source}: parameter {name} not found (wrong architecture?)")
  value = tensors[name]
  if tuple(value.shape) != tuple(shape):
    raise CheckpointError(
      f"{source}: parameter {name} has shape {tuple(value.shape)}, the model expects {tuple(shape)}"
    )
  return value.astype(np.float32)
