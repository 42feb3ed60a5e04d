"""Finding NaN and infinities in loaded weights: a corrupt file is refused instead of giving NaN logits.

The loaders (gguf_read.load, safetensors_ckpt.load) scan every tensor they return, after dequantization:
a quantized block's quants are small integers, so a non-finite dequantized value means one of its fp16 scales
(d, dmin) is Inf or NaN, and the block holding the first bad element is the one to report. The messages (with
the file, tensor and byte offset) are built by the loaders, which know the storage; this module only scans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

# Elements per np.isfinite call: bounds the boolean temporary (16 MiB) for tensors of many GiB.
_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class Finding:
  """The non-finite values of one array: how many, and the first in C order (flat index, value)."""

  shape: tuple[int, ...]
  count: int
  flat: int
  value: float

  @property
  def index(self) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(self.flat, self.shape))

  def element(self) -> str:
    """'element [i, j] (flat k) = nan'."""
    return f"element {list(self.index)} (flat {self.flat}) = {self.value}"


class NonFiniteError(ValueError):
  """A weight holds NaN or Inf; the message names the file, the tensor and the first bad element or block."""

  def __init__(self, message: str, *, path: str, tensor: str, finding: Finding):
    super().__init__(message)
    self.path, self.tensor, self.finding = path, tensor, finding


# What loaders call for each non-finite tensor when the caller lets them through (None: raise the error).
OnNonFinite = Callable[[NonFiniteError], None] | None


def scan(a: np.ndarray) -> Finding | None:
  """None if every element of the float array `a` is finite, else where the first NaN/Inf is and how many."""
  flat = np.ravel(a)
  first, count = -1, 0
  for s in range(0, flat.size, _CHUNK):
    bad = ~np.isfinite(flat[s : s + _CHUNK])
    n = int(np.count_nonzero(bad))
    if n and first < 0:
      first = s + int(np.argmax(bad))
    count += n
  if not count:
    return None
  return Finding(shape=tuple(a.shape), count=count, flat=first, value=float(flat[first]))


def report(error: NonFiniteError, on_nonfinite: OnNonFinite) -> None:
  """Raise `error`, or hand it to `on_nonfinite` (the caller allowed non-finite weights)."""
  if on_nonfinite is None:
    raise error
  on_nonfinite(error)
