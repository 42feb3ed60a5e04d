"""Read deepseek2 GGUF files (any llama.cpp reads: attn_kv_b or attn_k_b/attn_v_b, quantized or not) into a
DeepseekV3Config and the model's params pytree (float32 numpy, dequantized bit-exactly with dq3jax.dequantize).

The header is parsed here rather than with gguf-py's GGUFReader so that every defect is reported with the file,
the tensor or key, and the byte offset where it was found (GGUFReader fails with bare struct/numpy errors).
Tensor data is memory-mapped; `load` touches only the tensors a (truncated) model needs.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

import dq3jax
from dq3jax.io import finite, gguf_layout, gguf_meta
from dq3jax.io.gguf_layout import Kind
from dq3jax.model.config import DeepseekV3Config
from dq3jax.qtypes import REGISTRY

log = logging.getLogger(__name__)

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
    if not (q.storable and q.computable):
      raise GGUFError(
        f"{self.path}: tensor {name!r} (header entry at offset {t.info_offset}) has type {t.type_name} "
        f"(id {t.type_id}), which dq3jax cannot dequantize; supported: "
        f"{', '.join(x.name for x in REGISTRY.values() if x.storable and x.computable)}"
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
  magic = c.take(4, "magic") if size >= 4 else b""
  if magic != MAGIC:
    raise GGUFError(f"{path}: not a GGUF file: magic {magic!r} at offset 0, expected {MAGIC!r}")
  version = c.unpack("<I", "version")
  if version not in (2, 3):
    raise c.fail(f"unsupported GGUF version {version} (dq3jax reads 2 and 3)", 4)
  n_tensors = c.unpack("<Q", "tensor count")
  n_kv = c.unpack("<Q", "key/value count")
  # Garbage counts (e.g. a byte-swapped file) would otherwise loop for a very long time before failing.
  if n_tensors >= 1 << 32 or n_kv >= 1 << 32:
    raise c.fail(f"implausible counts ({n_tensors} tensors, {n_kv} keys) for a {size}-byte file", 8)
  kv: dict[str, Any] = {}
  for i in range(n_kv):
    at = c.pos
    key = c.string(f"key {i}")
    vtype = c.unpack("<I", f"value type of {key!r}")
    if key in kv:
      raise c.fail(f"duplicate key {key!r}", at)
    kv[key] = c.value(vtype, key)
  alignment = int(kv.get("general.alignment", DEFAULT_ALIGNMENT))
  if alignment <= 0 or alignment & (alignment - 1):
    raise GGUFError(f"{path}: general.alignment = {alignment} is not a power of two")
  infos = []
  for i in range(n_tensors):
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
    nbytes = int(np.prod(ne, dtype=np.int64)) // q.block_elems * q.block_bytes
    infos.append((name, ne, type_id, q.name, offset, nbytes, at))
  data_offset = -(-c.pos // alignment) * alignment
  tensors: dict[str, TensorEntry] = {}
  for name, ne, type_id, type_name, offset, nbytes, at in infos:
    if name in tensors:
      raise GGUFError(f"{path}: duplicate tensor {name!r} (header entry at offset {at})")
    if offset % alignment:
      raise GGUFError(
        f"{path}: tensor {name!r}: data offset {offset} is not aligned to {alignment} (header at {at})"
      )
    start = data_offset + offset
    if start + nbytes > size:
      raise GGUFError(
        f"{path}: truncated data: tensor {name!r} ({type_name}, ne {list(ne)}) occupies bytes "
        f"[{start}, {start + nbytes}) but the file ends at offset {size}"
      )
    tensors[name] = TensorEntry(
      name=name, ne=ne, type_id=type_id, type_name=type_name, offset=start, nbytes=nbytes, info_offset=at
    )
  return GGUFFile(
    path=path,
    version=version,
    kv=kv,
    tensors=tensors,
    alignment=alignment,
    data_offset=data_offset,
    size=size,
  )


def is_gguf(path: str | os.PathLike) -> bool:
  """True for a regular file that starts with the GGUF magic (for CLIs taking a checkpoint dir or a .gguf)."""
  try:
    with open(path, "rb") as f:
      return f.read(4) == MAGIC
  except (IsADirectoryError, FileNotFoundError, PermissionError):
    return False


def load_config(
  path: str | os.PathLike, *, v3_defaults: bool = False
) -> tuple[DeepseekV3Config, str, GGUFFile]:
  """(config, layout, parsed file) of a deepseek2 GGUF."""
  f = read_gguf(path)
  embd = f.tensors.get("token_embd.weight")
  return (
    *gguf_meta.config_from_metadata(
      f.kv,
      set(f.tensors),
      path=f.path,
      vocab_rows=None if embd is None else embd.ne[-1],
      v3_defaults=v3_defaults,
    ),
    f,
  )


def load(
  path: str | os.PathLike,
  *,
  layers: int | None = None,
  experts: int | None = None,
  v3_defaults: bool = False,
  progress: bool = False,
  on_nonfinite: finite.OnNonFinite = None,
) -> tuple[DeepseekV3Config, dict]:
  """(config, float32 numpy params) of a deepseek2 GGUF, optionally truncated (see DeepseekV3Config.truncate).

  Same return shape as dq3jax.io.safetensors_ckpt.load, so `runner.logits(params, tokens, cfg)` runs the file.
  A tensor with NaN/Inf (stored, or from an Inf/NaN block scale) raises finite.NonFiniteError, or with
  `on_nonfinite` is passed to it and loaded as it is.
  """

  def checked(name: str, a: np.ndarray) -> np.ndarray:
    error = f.check_finite(name, a)
    if error is not None:
      finite.report(error, on_nonfinite)
    return a

  full, layout, f = load_config(path, v3_defaults=v3_defaults)
  cfg = full.truncate(layers=layers, experts=experts)
  want = gguf_layout.tensors(cfg, layout)
  e = cfg.n_routed_experts
  built = gguf_layout.ParamsBuilder(cfg.num_hidden_layers)
  for t in tqdm(want, desc="reading", unit="tensor", disable=not progress):
    m = gguf_layout.mapping(t.name)
    fused = _fused_gate_up(f, t.name)
    if fused is not None:
      # Newer converters may store ffn_gate_up_exps = concat(gate, up) along the expert's output rows.
      _check_ne(f, fused, (t.ne[0], 2 * t.ne[1], full.n_routed_experts))
      a = checked(fused, f.array(fused, first_slices=e))
      half = t.ne[1]
      built.set(m.path, np.ascontiguousarray(a[:, :half] if "gate" in t.name.split(".")[2] else a[:, half:]))
      continue
    name = t.name
    if name == "output.weight" and name not in f.tensors and "token_embd.weight" in f.tensors:
      log.warning("%s: no output.weight; using token_embd.weight (tied), as llama.cpp does", f.path)
      name = "token_embd.weight"
    _check_ne(f, name, _full_ne(t, full))
    if m.kind is Kind.EXPERTS:
      a = f.array(name, first_slices=e)
    elif m.path[-1] == "router":
      a = f.array(name, first_slices=e)  # router ne [d, E]: the first E rows
    elif m.path[-1] == "router_bias":
      a = f.array(name)[:e]
    else:
      a = f.array(name)
    checked(name, a)  # every array above is a leading part of the tensor: flat indices are the file's
    built.add(t.name, np.ascontiguousarray(a))
  return cfg, built.tree


def _fused_gate_up(f: GGUFFile, name: str) -> str | None:
  parts = name.split(".")
  if len(parts) == 4 and parts[2] in ("ffn_gate_exps", "ffn_up_exps") and name not in f.tensors:
    fused = f"blk.{parts[1]}.ffn_gate_up_exps.weight"
    if fused in f.tensors:
      return fused
  return None


def _check_ne(f: GGUFFile, name: str, want: tuple[int, ...]) -> None:
  entry = f.tensor(name)
  if entry.ne != want:
    raise GGUFError(
      f"{f.path}: tensor {name!r} (header entry at offset {entry.info_offset}) has ne {list(entry.ne)}, "
      f"the metadata implies {list(want)}"
    )


def _full_ne(t, full: DeepseekV3Config) -> tuple[int, ...]:
  """The ne a tensor of the truncated inventory has in the (untruncated) file: expert axes use the file's E."""
  m = gguf_layout.mapping(t.name)
  if m.kind is Kind.EXPERTS:
    return (*t.ne[:2], full.n_routed_experts)
  if m.path[-1] == "router":
    return (t.ne[0], full.n_routed_experts)
  if m.path[-1] == "router_bias":
    return (full.n_routed_experts,)
  return t.ne
