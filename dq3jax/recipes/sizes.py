"""Storage size of a tensor in a given ggml type, for planning without weights.

Every type dq3jax can compute with comes from `dq3jax.qtypes.REGISTRY`. llama.cpp's shape fallbacks can also
produce types dq3jax cannot (yet) quantize or dequantize, but a plan still has to know their size. Those live
in the small, clearly separated SIZE_ONLY table below: block geometry only, no kernels. Once a type is added to
the registry, the registry's entry wins and the row here can be deleted.
"""

from __future__ import annotations

import dataclasses
import math

import gguf

from dq3jax.qtypes import REGISTRY, qtype_of


@dataclasses.dataclass(frozen=True, kw_only=True)
class SizeOnlyType:
  """Block geometry of a ggml type that dq3jax can size but not compute with."""

  name: str
  id: int
  block_elems: int
  block_bytes: int
  # Whether ggml's quantize function for this type consumes importance weights (ggml-quants.c).
  uses_imatrix: bool


# Types produced by llama.cpp's fallbacks that are not in the registry. IQ4_NL is the paper-era fallback for
# Q2_K/Q3_K targets whose rows are not a multiple of 256.
SIZE_ONLY: dict[str, SizeOnlyType] = {
  t.name: t for t in (SizeOnlyType(name="IQ4_NL", id=20, block_elems=32, block_bytes=18, uses_imatrix=True),)
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TypeSize:
  """What planning needs to know about a type, whichever table it came from."""

  name: str
  block_elems: int
  block_bytes: int
  uses_imatrix: bool
  computable: bool  # True when dq3jax's registry (and so its kernels) knows the type

  def row_bytes(self, n: int) -> int:
    if n % self.block_elems:
      raise ValueError(f"{self.name}: row width {n} is not a multiple of the block size {self.block_elems}")
    return n // self.block_elems * self.block_bytes


_REGISTRY_NAMES = frozenset(q.name for q in REGISTRY.values())


def type_size(t: str) -> TypeSize:
  """Resolves a type name to its block geometry: registry first, then the size-only table."""
  key = t.strip().upper()
  if key in SIZE_ONLY and key not in _REGISTRY_NAMES:
    s = SIZE_ONLY[key]
    return TypeSize(
      name=s.name,
      block_elems=s.block_elems,
      block_bytes=s.block_bytes,
      uses_imatrix=s.uses_imatrix,
      computable=False,
    )
  try:
    q = qtype_of(key)
  except ValueError:
    known = sorted([q.name for q in REGISTRY.values() if q.storable] + list(SIZE_ONLY))
    raise ValueError(f"unknown or unsupported ggml type {t!r}; plannable types: {', '.join(known)}") from None
  if not q.storable:
    raise ValueError(f"{q.name} is not a storage type and cannot appear in a model file")
  return TypeSize(
    name=q.name,
    block_elems=q.block_elems,
    block_bytes=q.block_bytes,
    uses_imatrix=q.uses_imatrix,
    computable=True,
  )


def tensor_bytes(t: str, ne: tuple[int, ...]) -> int:
  """Bytes of a tensor with ggml shape `ne` stored as type `t` (rows of ne[0] elements, no padding)."""
  ts = type_size(t)
  n_rows = math.prod(ne[1:]) if len(ne) > 1 else 1
  return ts.row_bytes(ne[0]) * n_rows


def _check_size_only() -> None:
  # gguf-py is an independent statement of the same layout.
  for s in SIZE_ONLY.values():
    gt = gguf.GGMLQuantizationType[s.name]
    if int(gt) != s.id or gguf.GGML_QUANT_SIZES[gt] != (s.block_elems, s.block_bytes):
      raise AssertionError(
        f"{s.name}: SIZE_ONLY disagrees with gguf ({int(gt)}, {gguf.GGML_QUANT_SIZES[gt]})"
      )


_check_size_only()
