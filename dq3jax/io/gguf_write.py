"""Atomic, streaming GGUF writing through gguf-py's GGUFWriter.

All tensor infos (name, ne, type, size) are declared up front, then each tensor's bytes are produced and written
one at a time, so peak memory is one tensor, not the model; a job that yields its bytes in pieces (`pieces`) is
written piece by piece, so its peak is one piece. The file is written under a temporary name in the
destination directory and moved into place with os.replace only after the last byte is flushed and synced: an
interrupted (Ctrl-C, SIGTERM) or failing run leaves the destination as it was (absent, or the previous file)
and no temp file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence

import gguf
import numpy as np
from tqdm import tqdm

from dq3jax.io.atomic import atomic_path
from dq3jax.qtypes import QType


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorJob:
  """One tensor to write, exactly `nbytes` of uint8 when its turn comes: from `produce()` (the whole tensor at
  once) or from `pieces()` (consecutive parts of whole rows, in order). Exactly one of the two is given."""

  name: str
  ne: tuple[int, ...]  # ggml order
  qtype: QType
  produce: Callable[[], np.ndarray] | None = None
  pieces: Callable[[], Iterator[np.ndarray]] | None = None

  def __post_init__(self):
    if (self.produce is None) == (self.pieces is None):
      raise TypeError(f"TensorJob {self.name}: give exactly one of produce and pieces")

  @property
  def n_elements(self) -> int:
    return int(np.prod(self.ne, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    rows = int(np.prod(self.ne[1:], dtype=np.int64)) if len(self.ne) > 1 else 1
    return rows * self.qtype.row_bytes(self.ne[0])

  def data(self) -> np.ndarray:
    """The whole tensor's bytes in one array (pieces are copied into one buffer as they come)."""
    out = np.empty(self.nbytes, np.uint8)
    pos = 0
    for piece in self.checked_pieces():
      out[pos : pos + piece.size] = piece
      pos += piece.size
    return out

  def checked_pieces(self, where: str = "") -> Iterator[np.ndarray]:
    """The bytes in order (a `produce` job's whole array as one piece; `pieces` each a whole number of rows);
    raises, naming the tensor, when they do not add up to `nbytes`."""
    row_bytes = self.qtype.row_bytes(self.ne[0])
    pos = 0
    for piece in self.pieces() if self.pieces is not None else iter([self.produce()]):
      piece = np.ascontiguousarray(piece, dtype=np.uint8).reshape(-1)
      pos += piece.size
      if pos > self.nbytes:
        break
      if self.pieces is not None and piece.size % row_bytes:
        raise ValueError(
          f"{where}tensor {self.name}: a piece of {piece.size} bytes is not whole rows of {row_bytes}"
        )
      yield piece
    if pos != self.nbytes:
      raise ValueError(
        f"{where}tensor {self.name}: produced {'at least ' if pos > self.nbytes else ''}{pos} bytes, "
        f"{self.qtype.name} ne {list(self.ne)} needs {self.nbytes}"
      )


class _StreamedTensor:
  """What GGUFWriter.write_tensor_data needs of an array (nbytes, tofile), written piece by piece: the one
  path for every job, so byte counts are checked in one place (TensorJob.checked_pieces)."""

  def __init__(self, job: TensorJob, where: str):
    self.job, self.where, self.nbytes = job, where, job.nbytes

  def tofile(self, fp) -> None:
    for piece in self.job.checked_pieces(self.where):
      fp.write(memoryview(piece))


def write_gguf(
  path: str | os.PathLike,
  add_metadata: Callable[[gguf.GGUFWriter], None],
  jobs: Sequence[TensorJob],
  *,
  arch: str = "deepseek2",
  progress: bool = False,
  on_written: Callable[[TensorJob], None] | None = None,
) -> None:
  """Write a GGUF file: `add_metadata(writer)` adds the key/values, `jobs` the tensors in file order."""
  names = [j.name for j in jobs]
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: duplicate tensor names in the job list")
  with atomic_path(path) as tmp:
    w = gguf.GGUFWriter(tmp, arch=arch)
    try:
      add_metadata(w)
      for j in jobs:
        # Element shape in torch order; with a non-uint8 dtype GGUFWriter takes it as is and reverses it to ne.
        w.add_tensor_info(
          j.name,
          tuple(reversed(j.ne)),
          np.dtype(np.float32),
          j.nbytes,
          raw_dtype=gguf.GGMLQuantizationType(j.qtype.id),
        )
      w.write_header_to_file()
      w.write_kv_data_to_file()
      w.write_ti_data_to_file()
      bar = tqdm(
        total=sum(j.n_elements for j in jobs),
        unit="w",
        unit_scale=True,
        disable=not progress,
        desc="quantize",
      )
      with bar:
        for j in jobs:
          bar.set_postfix_str(f"{j.name} {j.qtype.name}", refresh=False)
          w.write_tensor_data(_StreamedTensor(j, f"{path}: "))  # a produce job's array is freed after it
          bar.update(j.n_elements)
          if on_written is not None:
            on_written(j)
      w.flush()
    finally:
      w.close()
