"""The GGUF container format: one header parser for every GGUF dq3jax reads (models, imatrices, engine dumps).

The header is parsed here rather than with gguf-py's GGUFReader so that every defect is reported with the file,
the tensor or key, and the byte offset where it was found (GGUFReader fails with bare struct/numpy errors).
Tensor data is memory-mapped and read only when asked for. What a deepseek2 *model* file must hold is checked by
`gguf_read`, what an imatrix must hold by `imatrix`.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np

import dq3jax
from dq3jax.io import finite
from dq3jax.qtypes import REGISTRY

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {
  0: "<B",
  1: "<b",
  2: "<H",
  3: "<h",
  4: "<I",
  5: "<i",
  6: "<f",
  7: "<?",
  10: "<Q",
  11: "<q",
  12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFError(ValueError):
  """A malformed or unsupported GGUF file; the message names the file, the tensor or key, and the offset."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
  name: str
  ne: tuple[int, ...]  # ggml order
  type_id: int
  type_name: str
  offset: int  # absolute byte offset of the data in the file
  nbytes: int
  info_offset: int  # where the tensor's header entry starts

  @property
  def torch_shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.ne))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GGUFFile:
  """A parsed GGUF header: key/values, and each tensor's type, shape and extent in the file (data read on
  demand, memory-mapped)."""

  path: str
  version: int
  kv: Mapping[str, Any]
  tensors: Mapping[str, TensorEntry]  # in file order
  alignment: int
  data_offset: int
  size: int

  def raw(self, name: str, *, first_slices: int | None = None) -> np.ndarray:
    """The stored bytes of a tensor (memory-mapped, read-only); first_slices=k keeps only ne[-1] slices 0..k-1."""
    t = self.tensor(name)
    n = t.nbytes
    if first_slices is not None:
      n = n // t.ne[-1] * first_slices
    with open(self.path, "rb") as f:
      mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, np.uint8, count=n, offset=t.offset)

  def tensor(self, name: str) -> TensorEntry:
    if name not in self.tensors:
      raise GGUFError(f"{self.path}: required tensor {name!r} is missing")
    return self.tensors[name]

  def array(self, name: str, *, first_slices: int | None = None) -> np.ndarray:
    """float32 data of a tensor in torch layout (optionally only its first ne[-1] slices)."""
    t = self.tensor(name)
    q = REGISTRY[t.type_id]
    if not (q.storable and q.dequantizable):
      raise GGUFError(
        f"{self.path}: tensor {name!r} (header entry at offset {t.info_offset}) has type {t.type_name} "
        f"(id {t.type_id}), which dq3jax cannot dequantize; supported: "
        f"{', '.join(x.name for x in REGISTRY.values() if x.storable and x.dequantizable)}"
      )
    shape = list(t.torch_shape)
    if first_slices is not None:
      shape[0] = first_slices
    return dq3jax.dequantize(self.raw(name, first_slices=first_slices), q, tuple(shape))

  def check_finite(self, name: str, a: np.ndarray) -> finite.NonFiniteError | None:
    """The error describing the first NaN/Inf in `a` (all of tensor `name` as `array` returns it, or its first
    slices), or None if `a` is finite. Quantized types: the block holding it and where that block is."""
    found = finite.scan(a)
    if found is None:
      return None
    t = self.tensor(name)
    q = REGISTRY[t.type_id]
    what = f"{self.path}: tensor {name!r} ({t.type_name}, ne {list(t.ne)})"
    if q.block_elems == 1:
      msg = (
        f"{what}: {found.count} non-finite value(s); the first is {found.element()}, "
        f"at byte offset {t.offset + found.flat * q.block_bytes}"
      )
    else:
      block = found.flat // q.block_elems
      start = t.offset + block * q.block_bytes
      msg = (
        f"{what}: {found.count} non-finite value(s) after dequantization; the first, {found.element()}, "
        f"is in block {block} (bytes [{start}, {start + q.block_bytes}) of the file): "
        "its quants are integers, so an fp16 scale of that block (d, dmin) is Inf or NaN"
      )
    return finite.NonFiniteError(msg, path=self.path, tensor=name, finding=found)


class _Cursor:
  def __init__(self, buf, path: str):
    self.buf, self.pos, self.path = buf, 0, path

  def fail(self, what: str, at: int | None = None) -> GGUFError:
    return GGUFError(f"{self.path}: {what} at offset {self.pos if at is None else at}")

  def take(self, n: int, what: str) -> bytes:
    if n < 0 or self.pos + n > len(self.buf):
      raise self.fail(f"truncated file: {what} needs {n} bytes, {len(self.buf) - self.pos} left")
    b = bytes(self.buf[self.pos : self.pos + n])
    self.pos += n
    return b

  def unpack(self, fmt: str, what: str):
    return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

  def string(self, what: str) -> str:
    at = self.pos
    n = self.unpack("<Q", f"{what} length")
    raw = self.take(n, what)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      raise self.fail(f"{what} is not valid UTF-8", at) from None

  def value(self, vtype: int, key: str, *, in_array: bool = False) -> Any:
    if vtype in _SCALARS:
      return self.unpack(_SCALARS[vtype], f"value of {key!r}")
    if vtype == _STRING:
      return self.string(f"string value of {key!r}")
    if vtype == _ARRAY and not in_array:
      at = self.pos
      sub = self.unpack("<I", f"array type of {key!r}")
      n = self.unpack("<Q", f"array length of {key!r}")
      if sub in _SCALARS:
        fmt = _SCALARS[sub]
        size = struct.calcsize(fmt)
        raw = self.take(n * size, f"array {key!r} ({n} items)")
        return list(np.frombuffer(raw, np.dtype(fmt)).tolist())
      if sub == _STRING:
        return [self.string(f"item {i} of {key!r}") for i in range(n)]
      raise self.fail(f"key {key!r}: unsupported array item type {sub}", at)
    raise self.fail(f"key {key!r}: unknown value type {vtype}", self.pos - 4)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
  """Parse and validate the header of a GGUF file (v2 or v3); tensor data is not read."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    if size == 0:
      raise GGUFError(f"{path}: empty file, not a GGUF file (no 'GGUF' magic at offset 0)")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  c = _Cursor(mm, path)
  version, n_tensors, n_kv = _read_preamble(c, size)
  kv = _read_kv(c, n_kv)
  alignment = int(kv.get(gguf.Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT))
  if alignment <= 0 or alignment & (alignment - 1):
    raise GGUFError(f"{path}: general.alignment = {alignment} is not a power of two")
  infos = [_read_tensor_info(c, i) for i in range(n_tensors)]
  data_offset = -(-c.pos // alignment) * alignment  # the data section starts aligned after the header
  return GGUFFile(
    path=path,
    version=version,
    kv=kv,
    tensors=_place_tensors(path, infos, data_offset, alignment, size),
    alignment=alignment,
    data_offset=data_offset,
    size=size,
  )


def _read_preamble(c: _Cursor, size: int) -> tuple[int, int, int]:
  """Magic, then (version, tensor count, key count)."""
  magic = c.take(4, "magic") if size >= 4 else b""
  if magic != MAGIC:
    raise GGUFError(f"{c.path}: not a GGUF file: magic {magic!r} at offset 0, expected {MAGIC!r}")
  version = c.unpack("<I", "version")
  if version not in (2, 3):
    raise c.fail(f"unsupported GGUF version {version} (dq3jax reads 2 and 3)", 4)
  n_tensors = c.unpack("<Q", "tensor count")
  n_kv = c.unpack("<Q", "key/value count")
  # Garbage counts (e.g. a byte-swapped file) would otherwise loop for a very long time before failing.
  if n_tensors >= 1 << 32 or n_kv >= 1 << 32:
    raise c.fail(f"implausible counts ({n_tensors} tensors, {n_kv} keys) for a {size}-byte file", 8)
  return version, n_tensors, n_kv


def _read_kv(c: _Cursor, n_kv: int) -> dict[str, Any]:
  kv: dict[str, Any] = {}
  for i in range(n_kv):
    at = c.pos
    key = c.string(f"key {i}")
    vtype = c.unpack("<I", f"value type of {key!r}")
    if key in kv:
      raise c.fail(f"duplicate key {key!r}", at)
    kv[key] = c.value(vtype, key)
  return kv


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  name: str
  ne: tuple[int, ...]
  type_id: int
  type_name: str
  rel_offset: int  # as stored: relative to the data section
  nbytes: int
  at: int  # where the header entry starts


def _read_tensor_info(c: _Cursor, i: int) -> _TensorInfo:
  at = c.pos
  name = c.string(f"name of tensor {i}")
  n_dims = c.unpack("<I", f"dimension count of tensor {name!r}")
  if not 1 <= n_dims <= _MAX_DIMS:
    raise c.fail(f"tensor {name!r}: {n_dims} dimensions (ggml allows 1..{_MAX_DIMS})", at)
  ne = tuple(c.unpack("<Q", f"shape of tensor {name!r}") for _ in range(n_dims))
  type_at = c.pos
  type_id = c.unpack("<I", f"type of tensor {name!r}")
  offset = c.unpack("<Q", f"data offset of tensor {name!r}")
  q = REGISTRY.get(type_id)
  if q is None:
    # The data's extent needs the type's block geometry, which only the registry states.
    try:
      known = gguf.GGMLQuantizationType(type_id).name
    except ValueError:
      raise c.fail(f"tensor {name!r} has unknown ggml type id {type_id}", type_at) from None
    raise c.fail(
      f"tensor {name!r} has ggml type {known} (id {type_id}), which dq3jax's type registry does not know",
      type_at,
    )
  if ne[0] % q.block_elems:
    raise c.fail(
      f"tensor {name!r}: ne[0] = {ne[0]} is not a multiple of the {q.name} block size {q.block_elems}", at
    )
  nbytes = int(np.prod(ne[1:], dtype=np.int64)) * q.row_bytes(ne[0])
  return _TensorInfo(name, ne, type_id, q.name, offset, nbytes, at)


def _place_tensors(
  path: str, infos: list[_TensorInfo], data_offset: int, alignment: int, size: int
) -> dict[str, TensorEntry]:
  """Each tensor's absolute extent, checked against the alignment and the file's end."""
  tensors: dict[str, TensorEntry] = {}
  for t in infos:
    if t.name in tensors:
      raise GGUFError(f"{path}: duplicate tensor {t.name!r} (header entry at offset {t.at})")
    if t.rel_offset % alignment:
      raise GGUFError(
        f"{path}: tensor {t.name!r}: data offset {t.rel_offset} is not aligned to {alignment} (header at {t.at})"
      )
    start = data_offset + t.rel_offset
    if start + t.nbytes > size:
      raise GGUFError(
        f"{path}: truncated data: tensor {t.name!r} ({t.type_name}, ne {list(t.ne)}) occupies bytes "
        f"[{start}, {start + t.nbytes}) but the file ends at offset {size}"
      )
    tensors[t.name] = TensorEntry(
      name=t.name,
      ne=t.ne,
      type_id=t.type_id,
      type_name=t.type_name,
      offset=start,
      nbytes=t.nbytes,
      info_offset=t.at,
    )
  return tensors


def is_gguf(path: str | os.PathLike) -> bool:
  """True for a regular file that starts with the GGUF magic (for CLIs taking a checkpoint dir or a .gguf)."""
  try:
    with open(path, "rb") as f:
      return f.read(4) == MAGIC
  except (IsADirectoryError, FileNotFoundError, PermissionError):
    return False
