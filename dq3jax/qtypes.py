"""The one registry of ggml tensor types dq3jax knows, keyed by ggml's type id.

Block size (elements per block) and block bytes come from this table only; every other
module asks here. Ids are ggml's `enum ggml_type` values, which are also what GGUF files
store and what `gguf.GGMLQuantizationType` enumerates.
"""

from __future__ import annotations

import dataclasses
import enum

import gguf


class GGMLType(enum.IntEnum):
  F32 = 0
  F16 = 1
  Q4_0 = 2
  Q4_1 = 3
  Q5_0 = 6
  Q5_1 = 7
  Q8_0 = 8
  Q2_K = 10
  Q3_K = 11
  Q4_K = 12
  Q5_K = 13
  Q6_K = 14
  Q8_K = 15
  BF16 = 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class QType:
  """Static facts about one ggml type."""

  ggml_type: GGMLType
  block_elems: int
  block_bytes: int
  # True where ggml_quantize_chunk takes a different path when given an importance matrix.
  uses_imatrix: bool
  # True for types that appear in model files (Q8_K is an activation-side intermediate).
  storable: bool = True

  @property
  def name(self) -> str:
    return self.ggml_type.name

  @property
  def id(self) -> int:
    return int(self.ggml_type)

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.block_bytes / self.block_elems

  def row_bytes(self, n: int) -> int:
    """Bytes of one row of `n` elements (ggml_row_size); `n` must be a multiple of the block."""
    if n % self.block_elems:
      raise ValueError(
          f"{self.name}: row width {n} is not a multiple of the block size {self.block_elems}"
      )
    return n // self.block_elems * self.block_bytes


def _t(t: GGMLType, elems: int, nbytes: int, imatrix: bool, storable: bool = True) -> QType:
  return QType(ggml_type=t, block_elems=elems, block_bytes=nbytes, uses_imatrix=imatrix, storable=storable)


_T = GGMLType
REGISTRY: dict[int, QType] = {
    q.id: q
    for q in (
        _t(_T.F32, 1, 4, False),
        _t(_T.F16, 1, 2, False),
        _t(_T.BF16, 1, 2, False),
        _t(_T.Q4_0, 32, 18, True),
        _t(_T.Q4_1, 32, 20, True),
        _t(_T.Q5_0, 32, 22, True),
        _t(_T.Q5_1, 32, 24, True),
        _t(_T.Q8_0, 32, 34, False),
        _t(_T.Q2_K, 256, 84, True),
        _t(_T.Q3_K, 256, 110, True),
        _t(_T.Q4_K, 256, 144, True),
        _t(_T.Q5_K, 256, 176, True),
        _t(_T.Q6_K, 256, 210, True),
        _t(_T.Q8_K, 256, 292, False, storable=False),
    )
}

QTypeLike = "str | int | GGMLType | gguf.GGMLQuantizationType | QType"


def qtype_of(t: object) -> QType:
  """Resolves a type name ("Q4_K", case-insensitive), ggml id, or gguf enum to its QType."""
  if isinstance(t, QType):
    return t
  if isinstance(t, str):
    key = t.strip().upper()
    for q in REGISTRY.values():
      if q.name == key:
        return q
    raise ValueError(f"unknown ggml type {t!r}; known: {', '.join(q.name for q in REGISTRY.values())}")
  if isinstance(t, (int, enum.IntEnum)) and not isinstance(t, bool):
    q = REGISTRY.get(int(t))
    if q is None:
      name = t.name if isinstance(t, enum.Enum) else str(int(t))
      raise ValueError(
          f"ggml type {name} (id {int(t)}) is not supported by dq3jax; "
          f"supported: {', '.join(q.name for q in REGISTRY.values())}"
      )
    return q
  raise TypeError(f"expected a ggml type name, id or gguf.GGMLQuantizationType, got {type(t).__name__}")


def _check_against_gguf() -> None:
  # gguf-py's table is an independent statement of the same layout; a mismatch is a bug here.
  # (gguf lists Q8_1 as 40 bytes while ggml's struct is 36; Q8_1 is not in this registry.)
  for q in REGISTRY.values():
    ref = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(q.id)]
    if ref != (q.block_elems, q.block_bytes):
      raise AssertionError(f"{q.name}: registry says {(q.block_elems, q.block_bytes)}, gguf says {ref}")


_check_against_gguf()
