"""Byte/bit comparison with a report that names the first bad block and its differing bits."""

from __future__ import annotations

import numpy as np


def first_mismatch_report(ours: np.ndarray, theirs: np.ndarray, block_bytes: int, what: str) -> str | None:
  """None if equal; else a message with the bad-block count, the first bad block and its bit diffs."""
  a = np.ascontiguousarray(ours).view(np.uint8).reshape(-1, block_bytes)
  b = np.ascontiguousarray(theirs).view(np.uint8).reshape(-1, block_bytes)
  if a.shape != b.shape:
    return f"{what}: shape {a.shape} != {b.shape}"
  bad = np.flatnonzero((a != b).any(axis=1))
  if bad.size == 0:
    return None
  i = int(bad[0])
  xor = a[i] ^ b[i]
  offs = np.flatnonzero(xor)
  bits = int(np.unpackbits(xor).sum())
  detail = ", ".join(f"byte {o}: {a[i][o]:#04x} vs {b[i][o]:#04x}" for o in offs[:8])
  return (
    f"{what}: {bad.size} of {a.shape[0]} blocks differ ({100.0 * bad.size / a.shape[0]:.3f} %); "
    f"first bad block {i}: {bits} differing bits in {offs.size} bytes ({detail})"
  )


def float_bits_report(ours: np.ndarray, theirs: np.ndarray, block_elems: int, what: str) -> str | None:
  """Bit equality of float32 arrays (NaN payloads included), reported per block."""
  return first_mismatch_report(
    np.ascontiguousarray(ours, np.float32).view(np.uint32),
    np.ascontiguousarray(theirs, np.float32).view(np.uint32),
    4 * block_elems,
    what,
  )
