"""llama.cpp importance-matrix files: read, write, and when llama-quantize uses them.

Two formats exist (llama.cpp tools/imatrix/imatrix.cpp and common/imatrix-loader.cpp, read at commit
0c1e57098bba43ac29e6e3b677cdceebdd22334f):

* legacy `.dat` (little-endian): int32 n_entries (>= 1); per entry int32 name length, name bytes, int32 ncall,
  int32 nval (>= 1), nval float32 values; then optionally int32 chunk count, int32 dataset-name length and
  the name. Values are stored pre-normalised as (sum of squared activations / count) * ncall; for a 3-D expert
  tensor the nval = ne0 * n_expert values are the experts' columns one after another.
* GGUF (`general.type = imatrix`): keys `imatrix.datasets` (string array), `imatrix.chunk_count`,
  `imatrix.chunk_size` (u32); per weight two F32 tensors `<name>.in_sum2` (ne [ne0, n_mat], raw sums of
  squared activations) and `<name>.counts` (ne [1, n_mat], tokens seen per matrix / expert).

llama-quantize turns both into one float vector per weight of ne0 * n_mat column weights (tools/quantize):
legacy values / ncall (values unchanged if ncall <= 0); GGUF in_sum2 / count per expert, or 1 for an expert
with no tokens. `Imatrix.weights` returns exactly that, shaped (n_mat, ne0).
"""

from __future__ import annotations

import dataclasses
import pathlib
import struct
from collections.abc import Mapping

import numpy as np

GGUF_MAGIC = b"GGUF"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"


class ImatrixError(ValueError):
  """A malformed imatrix file; the message names the file and the byte offset."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImatrixEntry:
  """One weight's statistics as stored. GGUF: sums (n_mat, ne0) raw, counts (n_mat,). Legacy: sums (1, nval)
  pre-normalised, counts (1,) = ncall (the legacy file does not know ne0, so experts are not separated)."""

  sums: np.ndarray
  counts: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True)
class Imatrix:
  path: str
  format: str  # "legacy" or "gguf"
  entries: Mapping[str, ImatrixEntry]
  datasets: tuple[str, ...] = ()
  chunk_count: int = 0
  chunk_size: int = 0  # 0 in legacy files

  def names(self) -> list[str]:
    return sorted(self.entries)

  def weights(self, name: str, ne0: int | None = None) -> np.ndarray:
    """Per-column weights llama-quantize passes to ggml for `name`, shape (n_mat, ne0) float32.

    For legacy entries pass the tensor's ne0 to split a 3-D expert tensor into its experts; without it the
    result is one row of all values."""
    if name not in self.entries:
      raise KeyError(f"{self.path}: no imatrix entry for {name!r}")
    e = self.entries[name]
    if self.format == "legacy":
      ncall = int(e.counts[0])
      flat = (e.sums.reshape(-1) / np.float32(ncall)) if ncall > 0 else e.sums.reshape(-1).copy()
      flat = flat.astype(np.float32)
      if ne0 is None:
        return flat.reshape(1, -1)
      if flat.size % ne0:
        raise ValueError(f"{self.path}: {name}: {flat.size} values are not a multiple of ne0={ne0}")
      return flat.reshape(-1, ne0)
    if ne0 is not None and e.sums.shape[1] != ne0:
      raise ValueError(f"{self.path}: {name}: entry has {e.sums.shape[1]} columns, tensor ne0={ne0}")
    out = np.ones_like(e.sums, dtype=np.float32)
    for j, c in enumerate(e.counts):
      if c > 0:
        out[j] = e.sums[j] / np.float32(c)
    return out

  def expert_weights(self, name: str, expert: int, ne0: int | None = None) -> np.ndarray:
    """Column weights of one expert (row `expert` of `weights`)."""
    w = self.weights(name, ne0)
    if not 0 <= expert < w.shape[0]:
      raise IndexError(f"{self.path}: {name}: expert {expert} out of range [0, {w.shape[0]})")
    return w[expert]


# ---------------------------------------------------------------------------------------------------------
# reading


class _Cursor:
  """Bounds-checked little-endian reads that report the file and offset on failure."""

  def __init__(self, data: bytes, path: str) -> None:
    self.data, self.path, self.pos = data, path, 0

  def fail(self, what: str, at: int | None = None) -> ImatrixError:
    return ImatrixError(f"{self.path}: offset {self.pos if at is None else at}: {what}")

  def take(self, n: int, what: str) -> bytes:
    if n < 0 or self.pos + n > len(self.data):
      raise self.fail(f"truncated file: need {n} bytes for {what}, {len(self.data) - self.pos} left")
    b = self.data[self.pos : self.pos + n]
    self.pos += n
    return b

  def unpack(self, fmt: str, what: str) -> int | float:
    return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

  def left(self) -> int:
    return len(self.data) - self.pos


def read_imatrix(path: str | pathlib.Path) -> Imatrix:
  """Reads either format (GGUF when the file starts with the GGUF magic, else legacy)."""
  p = str(path)
  data = pathlib.Path(path).read_bytes()
  if data[:4] == GGUF_MAGIC:
    return _read_gguf(_Cursor(data, p))
  return _read_legacy(_Cursor(data, p))


def _read_legacy(c: _Cursor) -> Imatrix:
  n_entries = c.unpack("i", "the entry count")
  if n_entries < 1:
    raise c.fail(f"no data: entry count {n_entries} (a legacy imatrix has at least one entry)", 0)
  entries: dict[str, ImatrixEntry] = {}
  for k in range(n_entries):
    start = c.pos
    n = c.unpack("i", f"the name length of entry {k}")
    if n <= 0 or n > 4096:
      raise c.fail(f"entry {k}: implausible name length {n}", start)
    try:
      name = c.take(n, f"the name of entry {k}").decode()
    except UnicodeDecodeError:
      raise c.fail(f"entry {k}: name is not UTF-8", start + 4) from None
    ncall = c.unpack("i", f"ncall of {name}")
    at = c.pos
    nval = c.unpack("i", f"the value count of {name}")
    if nval < 1:
      raise c.fail(f"{name}: value count {nval} < 1", at)
    vals = np.frombuffer(c.take(4 * nval, f"{nval} values of {name}"), dtype="<f4").astype(np.float32)
    entries[name] = ImatrixEntry(sums=vals.reshape(1, -1), counts=np.array([ncall], dtype=np.int64))
  chunk_count, datasets = 0, ()
  # The trailer is optional and llama.cpp ignores a damaged one; so do we.
  if c.left() >= 4:
    chunk_count = int(c.unpack("i", "the chunk count"))
    if c.left() >= 4:
      n = int(c.unpack("i", "the dataset name length"))
      if 0 < n <= c.left():
        datasets = (c.take(n, "the dataset name").decode(errors="replace"),)
  return Imatrix(path=c.path, format="legacy", entries=entries, datasets=datasets, chunk_count=chunk_count)


# GGUF value types (ggml/include/gguf.h): id -> struct format (None for string/array).
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGML_F32 = 0


def _gguf_string(c: _Cursor, what: str) -> str:
  n = c.unpack("Q", f"the length of {what}")
  if n > c.left():
    raise c.fail(f"{what}: string length {n} runs past the end of the file", c.pos - 8)
  return c.take(n, what).decode(errors="replace")


def _gguf_value(c: _Cursor, vtype: int, key: str) -> object:
  if vtype in _GGUF_SCALAR:
    return c.unpack(_GGUF_SCALAR[vtype], f"the value of {key}")
  if vtype == _GGUF_STRING:
    return _gguf_string(c, f"the value of {key}")
  if vtype == _GGUF_ARRAY:
    at = c.pos
    etype = c.unpack("I", f"the element type of {key}")
    n = c.unpack("Q", f"the length of {key}")
    if etype == _GGUF_ARRAY or (etype not in _GGUF_SCALAR and etype != _GGUF_STRING):
      raise c.fail(f"{key}: bad array element type {etype}", at)
    if n > c.left():
      raise c.fail(f"{key}: array length {n} runs past the end of the file", at + 4)
    return [_gguf_value(c, etype, f"{key}[{k}]") for k in range(n)]
  raise c.fail(f"{key}: unknown GGUF value type {vtype}", c.pos - 4)


def _read_gguf(c: _Cursor) -> Imatrix:
  c.take(4, "the magic")
  version = c.unpack("I", "the GGUF version")
  if version not in (2, 3):
    raise c.fail(f"unsupported GGUF version {version}", 4)
  n_tensors = c.unpack("Q", "the tensor count")
  n_kv = c.unpack("Q", "the key count")
  if n_tensors > c.left() or n_kv > c.left():
    raise c.fail(f"implausible counts: {n_tensors} tensors, {n_kv} keys", 8)
  kv: dict[str, object] = {}
  for k in range(n_kv):
    key = _gguf_string(c, f"key {k}")
    vtype = c.unpack("I", f"the type of {key}")
    kv[key] = _gguf_value(c, vtype, key)
  infos = []
  for k in range(n_tensors):
    at = c.pos
    name = _gguf_string(c, f"the name of tensor {k}")
    n_dims = c.unpack("I", f"the rank of {name}")
    if not 1 <= n_dims <= 4:
      raise c.fail(f"{name}: bad rank {n_dims}", at)
    ne = tuple(int(c.unpack("Q", f"dim {d} of {name}")) for d in range(n_dims))
    ttype = c.unpack("I", f"the type of {name}")
    offset = c.unpack("Q", f"the data offset of {name}")
    infos.append((name, ne, ttype, offset, at))
  align = int(kv.get("general.alignment", 32))
  data_start = (c.pos + align - 1) // align * align
  raw: dict[str, np.ndarray] = {}
  expect = 0  # like ggml's gguf reader: tensors are contiguous, each padded to the alignment
  for name, ne, ttype, offset, at in infos:
    if ttype != _GGML_F32:
      raise c.fail(f"{name}: imatrix tensors must be F32 (ggml type 0), found type {ttype}", at)
    if offset != expect:
      raise c.fail(f"{name}: data offset {offset}, expected {expect}", at)
    n = int(np.prod(ne))
    lo = data_start + offset
    expect += (4 * n + align - 1) // align * align
    if data_start + expect > len(c.data):
      raise c.fail(
        f"truncated file: {name} needs bytes [{lo}, {data_start + expect}) with padding, file has "
        f"{len(c.data)}",
        lo,
      )
    arr = np.frombuffer(c.data, dtype="<f4", count=n, offset=lo).astype(np.float32)
    raw[name] = arr.reshape(tuple(reversed(ne)))  # ggml ne -> numpy (slowest first)
  entries: dict[str, ImatrixEntry] = {}
  bases = {n[: -len(SUFFIX_SUMS)] for n in raw if n.endswith(SUFFIX_SUMS)}
  bases |= {n[: -len(SUFFIX_COUNTS)] for n in raw if n.endswith(SUFFIX_COUNTS)}
  if not bases:
    raise ImatrixError(f"{c.path}: no imatrix entries (no *{SUFFIX_SUMS} / *{SUFFIX_COUNTS} tensors)")
  for b in sorted(bases):
    sums, counts = raw.get(b + SUFFIX_SUMS), raw.get(b + SUFFIX_COUNTS)
    if sums is None or counts is None:
      raise ImatrixError(
        f"{c.path}: {b}: has {'counts' if sums is None else 'sums'} but no "
        f"{'sums' if sums is None else 'counts'}"
      )
    counts = np.rint(counts.reshape(-1)).astype(np.int64)  # llama.cpp lrounds the float counts
    n_mat = counts.size
    if sums.size % n_mat:
      raise ImatrixError(f"{c.path}: {b}: {sums.size} sums do not split into {n_mat} matrices")
    entries[b] = ImatrixEntry(sums=sums.reshape(n_mat, -1), counts=counts)
  ds = kv.get(KEY_DATASETS, [])
  return Imatrix(
    path=c.path,
    format="gguf",
    entries=entries,
    datasets=tuple(str(x) for x in ds) if isinstance(ds, list) else (),
    chunk_count=int(kv.get(KEY_CHUNK_COUNT, 0)),
    chunk_size=int(kv.get(KEY_CHUNK_SIZE, 0)),
  )


# ---------------------------------------------------------------------------------------------------------
# writing (llama.cpp's layouts; used by tests and to hand synthetic imatrices to llama-quantize)


def write_legacy(
  path: str | pathlib.Path,
  entries: Mapping[str, tuple[np.ndarray, int]],
  *,
  chunk_count: int = 0,
  dataset: str = "",
) -> None:
  """entries: name -> (values as stored, i.e. (sum/count)*ncall, flattened over experts; ncall)."""
  if not entries:
    raise ValueError("a legacy imatrix needs at least one entry")
  out = [struct.pack("<i", len(entries))]
  for name in sorted(entries):
    vals, ncall = entries[name]
    v = np.ascontiguousarray(np.asarray(vals, dtype="<f4").reshape(-1))
    nb = name.encode()
    out += [struct.pack("<i", len(nb)), nb, struct.pack("<ii", int(ncall), v.size), v.tobytes()]
  ds = dataset.encode()
  out += [struct.pack("<i", chunk_count), struct.pack("<i", len(ds)), ds]
  pathlib.Path(path).write_bytes(b"".join(out))


def _gguf_str(s: str) -> bytes:
  b = s.encode()
  return struct.pack("<Q", len(b)) + b


def write_gguf(
  path: str | pathlib.Path,
  entries: Mapping[str, tuple[np.ndarray, np.ndarray]],
  *,
  datasets: tuple[str, ...] = (),
  chunk_count: int = 0,
  chunk_size: int = 512,
) -> None:
  """entries: name -> (raw sums shaped (n_mat, ne0), counts shaped (n_mat,)). Layout as gguf_write_to_file:
  header, keys, tensor infos, data aligned to 32 bytes, each tensor padded to 32."""
  align = 32
  kvs = [
    _gguf_str("general.type") + struct.pack("<I", _GGUF_STRING) + _gguf_str("imatrix"),
    _gguf_str(KEY_DATASETS)
    + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(datasets))
    + b"".join(_gguf_str(d) for d in datasets),
    _gguf_str(KEY_CHUNK_COUNT) + struct.pack("<II", 4, chunk_count),
    _gguf_str(KEY_CHUNK_SIZE) + struct.pack("<II", 4, chunk_size),
  ]
  tensors: list[tuple[str, np.ndarray]] = []
  for name in sorted(entries):
    sums, counts = entries[name]
    s = np.asarray(sums, dtype=np.float32)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    cnt = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
    if cnt.shape[0] != s.shape[0]:
      raise ValueError(f"{name}: {cnt.shape[0]} counts for {s.shape[0]} matrices")
    tensors += [(name + SUFFIX_SUMS, s), (name + SUFFIX_COUNTS, cnt)]
  infos, blobs, off = [], [], 0
  for name, arr in tensors:
    ne = tuple(reversed(arr.shape))
    infos.append(
      _gguf_str(name)
      + struct.pack("<I", len(ne))
      + struct.pack(f"<{len(ne)}Q", *ne)
      + struct.pack("<IQ", _GGML_F32, off)
    )
    b = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    b += b"\0" * (-len(b) % align)
    blobs.append(b)
    off += len(b)
  head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
  head += b"\0" * (-len(head) % align)
  pathlib.Path(path).write_bytes(head + b"".join(blobs))


def write_imatrix(imat: Imatrix, path: str | pathlib.Path, fmt: str | None = None) -> None:
  """Writes an Imatrix back in its own format (or `fmt`). Converting GGUF -> legacy stores
  (sum/count)*chunk_count per llama.cpp's save_imatrix_legacy; legacy -> GGUF is refused (counts are lost)."""
  fmt = fmt or imat.format
  if fmt == "gguf":
    if imat.format != "gguf":
      raise ValueError("a legacy imatrix has no per-expert counts and cannot be written as GGUF")
    write_gguf(
      path,
      {n: (e.sums, e.counts) for n, e in imat.entries.items()},
      datasets=imat.datasets,
      chunk_count=imat.chunk_count,
      chunk_size=imat.chunk_size,
    )
  elif fmt == "legacy":
    if imat.format == "legacy":
      ents = {n: (e.sums, int(e.counts[0])) for n, e in imat.entries.items()}
    else:
      chunk = max(imat.chunk_size, 1)
      ents = {}
      for n, e in imat.entries.items():
        ncall = (int(e.counts.max()) + chunk - 1) // chunk
        c = np.where(e.counts > 0, e.counts, 1).astype(np.float32)[:, None]
        v = np.where(e.counts[:, None] > 0, e.sums, 1.0) / c * np.float32(ncall)
        ents[n] = (v.astype(np.float32), ncall)
    write_legacy(path, ents, chunk_count=imat.chunk_count, dataset=imat.datasets[-1] if imat.datasets else "")
  else:
    raise ValueError(f"unknown imatrix format {fmt!r}")
