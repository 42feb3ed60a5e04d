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

import gguf
import numpy as np

from dq3jax.io.gguf_file import GGUFError, is_gguf, read_gguf
from dq3jax.io.gguf_write import TensorJob
from dq3jax.io.gguf_write import write_gguf as write_model_gguf
from dq3jax.qtypes import GGMLType, qtype_of

KEY_DATASETS = gguf.Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE
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
  """An importance-matrix file's statistics, per weight name, in either format (see the module doc)."""

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
  if is_gguf(p):
    return _read_gguf(p)
  return _read_legacy(_Cursor(pathlib.Path(path).read_bytes(), p))


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


def _read_gguf(path: str) -> Imatrix:
  # The one GGUF header parser (io/gguf_file) does the format; what is checked here is what makes a GGUF an
  # imatrix: F32 tensors laid out back to back as ggml's writer lays them.
  try:
    f = read_gguf(path)
  except GGUFError as e:
    raise ImatrixError(str(e)) from None
  raw: dict[str, np.ndarray] = {}
  expect = 0  # like ggml's gguf reader: tensors are contiguous, each padded to the alignment
  for name, t in f.tensors.items():
    if t.type_id != int(GGMLType.F32):
      raise ImatrixError(
        f"{path}: offset {t.info_offset}: {name}: imatrix tensors must be F32 (ggml type 0), found {t.type_name}"
      )
    if t.offset - f.data_offset != expect:
      raise ImatrixError(
        f"{path}: offset {t.info_offset}: {name}: data offset {t.offset - f.data_offset}, expected {expect}"
      )
    expect += -(-t.nbytes // f.alignment) * f.alignment
    arr = f.raw(name).view("<f4").astype(np.float32)
    raw[name] = arr.reshape(t.torch_shape)  # ggml ne -> numpy (slowest first)
  if f.data_offset + expect > f.size:  # ggml's writer pads the last tensor too; its reader insists on it
    raise ImatrixError(
      f"{path}: truncated file: the data section needs bytes [{f.data_offset}, {f.data_offset + expect}) with "
      f"padding, the file ends at offset {f.size}"
    )
  entries: dict[str, ImatrixEntry] = {}
  bases = {n[: -len(SUFFIX_SUMS)] for n in raw if n.endswith(SUFFIX_SUMS)}
  bases |= {n[: -len(SUFFIX_COUNTS)] for n in raw if n.endswith(SUFFIX_COUNTS)}
  if not bases:
    raise ImatrixError(f"{path}: no imatrix entries (no *{SUFFIX_SUMS} / *{SUFFIX_COUNTS} tensors)")
  for b in sorted(bases):
    sums, counts = raw.get(b + SUFFIX_SUMS), raw.get(b + SUFFIX_COUNTS)
    if sums is None or counts is None:
      raise ImatrixError(
        f"{path}: {b}: has {'counts' if sums is None else 'sums'} but no "
        f"{'sums' if sums is None else 'counts'}"
      )
    counts = np.rint(counts.reshape(-1)).astype(np.int64)  # llama.cpp lrounds the float counts
    n_mat = counts.size
    if sums.size % n_mat:
      raise ImatrixError(f"{path}: {b}: {sums.size} sums do not split into {n_mat} matrices")
    entries[b] = ImatrixEntry(sums=sums.reshape(n_mat, -1), counts=counts)
  ds = f.kv.get(KEY_DATASETS, [])
  return Imatrix(
    path=path,
    format="gguf",
    entries=entries,
    datasets=tuple(str(x) for x in ds) if isinstance(ds, list) else (),
    chunk_count=int(f.kv.get(KEY_CHUNK_COUNT, 0)),
    chunk_size=int(f.kv.get(KEY_CHUNK_SIZE, 0)),
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


def write_gguf(
  path: str | pathlib.Path,
  entries: Mapping[str, tuple[np.ndarray, np.ndarray]],
  *,
  datasets: tuple[str, ...] = (),
  chunk_count: int = 0,
  chunk_size: int = 512,
) -> None:
  """entries: name -> (raw sums shaped (n_mat, ne0), counts shaped (n_mat,)), written as llama-imatrix writes
  its GGUF (`general.type = imatrix`, F32 `<name>.in_sum2` [ne0, n_mat] and `<name>.counts` [1, n_mat]),
  through the same atomic GGUF writer as models."""
  f32 = qtype_of(GGMLType.F32)
  jobs: list[TensorJob] = []
  for name in sorted(entries):
    sums, counts = entries[name]
    s = np.asarray(sums, dtype=np.float32)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    cnt = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
    if cnt.shape[0] != s.shape[0]:
      raise ValueError(f"{name}: {cnt.shape[0]} counts for {s.shape[0]} matrices")
    for suffix, arr in ((SUFFIX_SUMS, s), (SUFFIX_COUNTS, cnt)):
      data = np.ascontiguousarray(arr, dtype="<f4").view(np.uint8).reshape(-1)
      jobs.append(
        TensorJob(name=name + suffix, ne=tuple(reversed(arr.shape)), qtype=f32, produce=lambda d=data: d)
      )

  def add_metadata(w) -> None:
    w.add_type("imatrix")
    w.add_array(KEY_DATASETS, list(datasets))
    w.add_uint32(KEY_CHUNK_COUNT, chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, chunk_size)

  # gguf-py always writes general.architecture; llama.cpp's imatrix loader reads general.type and ignores it.
  write_model_gguf(path, add_metadata, jobs, arch="imatrix")


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
