"""Minimal safetensors file access: header parsing with precise errors, memory-mapped tensor reads, writing.

Our own reader (rather than the `safetensors` package) so that every read is observable (`ReadLog`), a
truncated or corrupt file is reported with its path and the tensor concerned, and FP8/BF16 come back as
numpy arrays via ml_dtypes without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "U8": np.dtype(np.uint8),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
  """A checkpoint file or tensor is missing, malformed or inconsistent; the message names both."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offset in the file
  end: int


@dataclasses.dataclass
class ReadLog:
  """Records (file name, tensor name) for every tensor whose data is read; tests use it to prove laziness."""

  reads: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def read_header(path: str) -> dict[str, TensorInfo]:
  """Parse and validate a safetensors header (reads only the header bytes)."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
      (n,) = struct.unpack("<Q", raw)
      if n > min(size - 8, _MAX_HEADER):
        raise CheckpointError(f"{path}: corrupt safetensors header length {n} (file has {size} bytes)")
      header_bytes = f.read(n)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: file not found") from None
  try:
    header = json.loads(header_bytes)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  data_start = 8 + n
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = DTYPES[entry["dtype"]]
      shape = tuple(int(s) for s in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(
        f"{path}: tensor {name!r}: malformed or unsupported header entry {entry!r} ({e})"
      ) from None
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise CheckpointError(
        f"{path}: tensor {name!r}: {end - begin} bytes do not hold {entry['dtype']}{list(shape)}"
      )
    if data_start + end > size:
      raise CheckpointError(
        f"{path}: tensor {name!r}: data ends at byte {data_start + end} but the file has {size} bytes (truncated?)"
      )
    out[name] = TensorInfo(dtype=dtype, shape=shape, begin=data_start + begin, end=data_start + end)
  return out


def read_tensor(path: str, name: str, info: TensorInfo, log: ReadLog | None = None) -> np.ndarray:
  """Memory-mapped, read-only view of one tensor; pages are read only when the data is touched."""
  if log is not None:
    log.reads.append((os.path.basename(path), name))
  count = int(np.prod(info.shape, dtype=np.int64))
  if count == 0:
    return np.zeros(info.shape, info.dtype)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=info.begin, shape=(info.end - info.begin,))
  return data.view(info.dtype).reshape(info.shape)


def to_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
  """A safetensors file's bytes: tensors in the given order, metadata keys sorted. Deterministic, unlike the
  `safetensors` package, whose metadata order follows a per-process hash seed."""
  header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
  offset = 0
  arrays = []
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    if array.dtype not in NAMES:
      raise ValueError(f"safetensors: tensor {name!r} has unsupported dtype {array.dtype}")
    header[name] = {
      "dtype": NAMES[array.dtype],
      "shape": list(array.shape),
      "data_offsets": [offset, offset + array.nbytes],
    }
    offset += array.nbytes
    arrays.append(array)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
  return b"".join([struct.pack("<Q", len(blob)), blob, *(a.tobytes() for a in arrays)])


def write_file(
  path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
  """Write tensors (numpy, dtypes in DTYPES) as a safetensors file, in the given order."""
  with open(path, "wb") as f:
    f.write(to_bytes(tensors, metadata))
