"""Storage size of a tensor in a given ggml type, for planning without weights.

Every fact comes from `dq3jax.qtypes.REGISTRY`, which also sizes the types dq3jax cannot quantize (the i-quants
below IQ4, the ternary types; `QType.computable` is False), so a plan of a published mix still knows their size.
"""

from __future__ import annotations

import math

from dq3jax.qtypes import REGISTRY, QType, qtype_of


def type_size(t: str) -> QType:
  """Resolves a type name to the registry entry of a type a model file can store."""
  try:
    q = qtype_of(t)
  except ValueError:
    known = sorted(q.name for q in REGISTRY.values() if q.storable)
    raise ValueError(f"unknown or unsupported ggml type {t!r}; plannable types: {', '.join(known)}") from None
  if not q.storable:
    raise ValueError(f"{q.name} is not a storage type and cannot appear in a model file")
  return q


def tensor_bytes(t: str, ne: tuple[int, ...]) -> int:
  """Bytes of a tensor with ggml shape `ne` stored as type `t` (rows of ne[0] elements, no padding)."""
  n_rows = math.prod(ne[1:]) if len(ne) > 1 else 1
  return type_size(t).row_bytes(ne[0]) * n_rows
