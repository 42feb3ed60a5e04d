"""Pure-numpy metrics for comparing an engine's output with a golden: bytes, float32 ULPs, errors, NMSE, routing.

Conventions: `a` is always the golden (the reference), `b` the candidate. Every function takes numpy arrays
of equal shape and never raises on NaN or Inf; how non-finite values count is stated per function, and a
NaN metric never satisfies a bound (callers compare with `not (value <= bound)`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

_CHUNK = 1 << 20  # elements per step of the sequential sums (bounds the float64 temporaries)


# ---------------------------------------------------------------------------------------------- bytes


@dataclasses.dataclass(frozen=True)
class ByteDelta:
  """One differing byte of a block."""

  offset_in_block: int
  golden: int
  candidate: int

  @property
  def xor(self) -> int:
    return self.golden ^ self.candidate

  @property
  def bits(self) -> tuple[int, ...]:
    """Positions (0 = least significant) of the bits that differ."""
    return tuple(i for i in range(8) if self.xor >> i & 1)


@dataclasses.dataclass(frozen=True)
class BlockDiff:
  """Where two byte tensors first differ, in ggml's block structure."""

  row: int  # row of the tensor (ggml's ne[1..] flattened)
  block: int  # block index within the row
  byte_offset: int  # offset of the block's first byte in the tensor data
  deltas: tuple[ByteDelta, ...]  # the first differing bytes of that block (up to MAX_DELTAS)
  n_bytes_differ: int  # differing bytes in that block
  n_bits_differ: int  # differing bits in that block


@dataclasses.dataclass(frozen=True)
class ByteDiff:
  n_blocks: int
  n_blocks_differ: int
  n_bytes_differ: int
  first: BlockDiff | None  # None when identical


MAX_DELTAS = 8


def byte_diff(a: np.ndarray, b: np.ndarray, block_bytes: int) -> ByteDiff:
  """Bit-exact comparison of ggml block data a (golden) and b (candidate), both uint8 [..., row_bytes].

  The last axis is one row of ggml blocks of `block_bytes` bytes each (ggml's type_size); every leading axis
  is flattened into rows. The first differing block is the first in row-major order.
  """
  a = np.ascontiguousarray(a, np.uint8)
  b = np.ascontiguousarray(b, np.uint8)
  if a.shape != b.shape:
    raise ValueError(f"byte_diff: shapes differ: {a.shape} vs {b.shape}")
  row_bytes = a.shape[-1] if a.ndim else 1
  if row_bytes % block_bytes:
    raise ValueError(
      f"byte_diff: row of {row_bytes} bytes is not a whole number of {block_bytes}-byte blocks"
    )
  blocks_per_row = row_bytes // block_bytes
  ne = a != b
  n_bytes = int(np.count_nonzero(ne))
  per_block = ne.reshape(-1, block_bytes).any(axis=1)
  n_blocks = per_block.size
  if n_bytes == 0:
    return ByteDiff(n_blocks=n_blocks, n_blocks_differ=0, n_bytes_differ=0, first=None)
  k = int(np.argmax(per_block))
  ga = a.reshape(-1, block_bytes)[k]
  gb = b.reshape(-1, block_bytes)[k]
  where = np.flatnonzero(ga != gb)
  deltas = tuple(ByteDelta(int(i), int(ga[i]), int(gb[i])) for i in where[:MAX_DELTAS])
  bits = int(np.unpackbits(ga ^ gb).sum())
  first = BlockDiff(
    row=k // blocks_per_row,
    block=k % blocks_per_row,
    byte_offset=k * block_bytes,
    deltas=deltas,
    n_bytes_differ=int(where.size),
    n_bits_differ=bits,
  )
  return ByteDiff(
    n_blocks=n_blocks, n_blocks_differ=int(np.count_nonzero(per_block)), n_bytes_differ=n_bytes, first=first
  )


# --------------------------------------------------------------------------------------- float32 ULPs


def ordered_f32(x: np.ndarray) -> np.ndarray:
  """int64 keys whose order is float32 order and whose differences count representable floats between.

  A float32 bit pattern read as a sign-magnitude integer is monotonic in the value; mapping negative patterns
  to minus their magnitude makes it two's-complement monotonic, with +0 and -0 both 0. Hence the smallest
  positive and negative subnormals are 2 apart (one step to 0, one beyond) and the largest finite float is
  1 from +Inf. NaN patterns get keys too, but ulp_distance overrides them.
  """
  bits = np.ascontiguousarray(x, np.float32).view(np.int32).astype(np.int64)
  return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Elementwise distance in float32 ULPs (float64 array, exact: at most 2^32).

  NaN handling: NaN vs NaN (any payload) is 0, NaN vs a number is +Inf. +0 vs -0 is 0 (count sign-of-zero
  differences with bits_differ).
  """
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  d = np.abs(ordered_f32(a) - ordered_f32(b)).astype(np.float64)
  na, nb = np.isnan(a), np.isnan(b)
  d[na & nb] = 0.0
  d[na ^ nb] = np.inf
  return d


def abs_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """|a - b| in float64; equal values (Inf included) and NaN vs NaN give 0, any other NaN or Inf case +Inf."""
  a64 = np.asarray(a, np.float64)
  b64 = np.asarray(b, np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    d = np.abs(a64 - b64)
  same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
  d[same] = 0.0
  d[np.isnan(d)] = np.inf
  return d


def rel_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """|a - b| / |a| (golden a), float64; 0 where they are equal, +Inf where a is 0 and b is not."""
  d = abs_error(a, b)
  mag = np.abs(np.asarray(a, np.float64))
  with np.errstate(divide="ignore", invalid="ignore"):
    r = d / mag
  r[d == 0] = 0.0
  r[np.isnan(r)] = np.inf  # Inf / Inf: a was infinite and b differs from it
  return r


def bits_differ(a: np.ndarray, b: np.ndarray) -> int:
  """Elements whose float32 bit patterns differ (sign of zero and NaN payloads included)."""
  a32 = np.ascontiguousarray(a, np.float32).view(np.uint32)
  b32 = np.ascontiguousarray(b, np.float32).view(np.uint32)
  return int(np.count_nonzero(a32 != b32))


# ------------------------------------------------------------------------------------------------ NMSE


def _sequential_sum(terms: np.ndarray) -> float:
  """Left-to-right float64 sum, as C's `double s = 0; for (...) s += t;` (np.sum is pairwise: different)."""
  total = 0.0
  for start in range(0, terms.size, _CHUNK):
    # cumsum (add.accumulate) is strictly sequential; the running total leads the next chunk.
    total = float(np.cumsum(np.concatenate(([total], terms[start : start + _CHUNK])))[-1])
  return total


def _nmse_terms(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(numerator terms, denominator terms, mismatch mask): float64 terms of C's loop, non-finite cases aside."""
  a32 = np.asarray(a, np.float32)
  b32 = np.asarray(b, np.float32)
  # test-backend-ops screens non-finite values before its NMSE: NaN anywhere and an infinity not matched
  # by the same infinity fail; matched infinities pass. Here matched infinities and NaN-vs-NaN (agreement,
  # as in ulp_distance) are left out of both sums, and any other non-finite pair makes the NMSE +Inf.
  skip = (np.isnan(a32) & np.isnan(b32)) | (np.isinf(a32) & (a32 == b32))
  mismatch = ~(np.isfinite(a32) & np.isfinite(b32)) & ~skip
  a32 = np.where(skip, np.float32(0), a32)
  b32 = np.where(skip, np.float32(0), b32)
  with np.errstate(over="ignore", invalid="ignore", under="ignore"):
    d = a32 - b32  # float32, as `float a_i - b_i`
    return (d * d).astype(np.float64), (a32 * a32).astype(np.float64), mismatch


def _ratio(num, den):
  # 0/0 (an all-zero golden matched exactly) is 0 here where C gives NaN; x/0 with x > 0 is +Inf as in C.
  with np.errstate(divide="ignore", invalid="ignore"):
    r = np.divide(num, den)
  return np.where((num == 0) & (den == 0), 0.0, r)


def nmse(a: np.ndarray, b: np.ndarray) -> float:
  """Normalized mean squared error of candidate b against golden a, as llama.cpp's test-backend-ops computes it.

  llama.cpp (tests/test-backend-ops.cpp, `nmse`), for float arrays a (the reference backend) and b:
      mse_a_b = sum_i (a_i - b_i)^2,  mse_a_0 = sum_i a_i^2,  NMSE = mse_a_b / mse_a_0
  where a_i - b_i, its square and a_i^2 are float32 operations and both sums are double accumulators
  added left to right. Reproduced here to the bit: float32 differences and squares, sequential float64 sums.
  Inputs of another float dtype are first converted to float32 (test-backend-ops converts to float).

  Non-finite values, explicitly (test-backend-ops checks them before computing the NMSE): a position where
  both are the same infinity, or both NaN, agrees and is left out of both sums; NaN or an infinity against
  anything else makes the result +Inf. 0/0 (everything zero) is 0, where C would give NaN. Squares that
  overflow float32 behave as in C.
  """
  num, den, mismatch = _nmse_terms(np.ravel(a), np.ravel(b))
  if mismatch.any():
    return math.inf
  return float(_ratio(_sequential_sum(num), _sequential_sum(den)))


def nmse_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """nmse over the last axis of a, b [..., W] for each leading index: float64 [...] (per token for [T, d])."""
  num, den, mismatch = _nmse_terms(a, b)
  if num.ndim == 0:
    num, den, mismatch = num[None], den[None], mismatch[None]
  # cumsum along the row is the same left-to-right accumulation as nmse's, per row.
  r = _ratio(np.cumsum(num, axis=-1)[..., -1], np.cumsum(den, axis=-1)[..., -1])
  return np.where(mismatch.any(axis=-1), np.inf, r)


@dataclasses.dataclass(frozen=True)
class FloatErrors:
  n: int
  max_ulp: float  # +Inf when a NaN meets a number
  max_ulp_index: tuple[int, ...] | None  # where max_ulp occurs (first), None when 0
  max_abs: float
  max_rel: float
  nmse: float
  bits_differ: int  # elements with different bit patterns (incl. -0 vs +0, NaN payloads)
  nan_mismatch: int  # elements that are NaN in exactly one of the two


def float_errors(a: np.ndarray, b: np.ndarray) -> FloatErrors:
  """All float metrics of candidate b against golden a (same shape)."""
  a = np.asarray(a)
  b = np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"float_errors: shapes differ: {a.shape} vs {b.shape}")
  if a.size == 0:
    return FloatErrors(0, 0.0, None, 0.0, 0.0, 0.0, 0, 0)
  ulp = ulp_distance(a, b)
  k = int(np.argmax(ulp))
  mu = float(ulp.flat[k])
  a32 = np.asarray(a, np.float32)
  b32 = np.asarray(b, np.float32)
  return FloatErrors(
    n=int(a.size),
    max_ulp=mu,
    max_ulp_index=tuple(int(i) for i in np.unravel_index(k, a.shape)) if mu > 0 else None,
    max_abs=float(abs_error(a32, b32).max()),
    max_rel=float(rel_error(a32, b32).max()),
    nmse=nmse(a32, b32),
    bits_differ=bits_differ(a32, b32),
    nan_mismatch=int(np.count_nonzero(np.isnan(a32) ^ np.isnan(b32))),
  )


# --------------------------------------------------------------------------------------------- routing


def topk_set_differs(a_ids: np.ndarray, b_ids: np.ndarray) -> np.ndarray:
  """bool [...] per position: the selected expert sets differ (order within the K choices is ignored)."""
  a = np.sort(np.asarray(a_ids, np.int64), axis=-1)
  b = np.sort(np.asarray(b_ids, np.int64), axis=-1)
  return (a != b).any(axis=-1)


def weights_by_expert(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """weights [..., K] reordered by ascending expert id, so that two routings of the same set line up."""
  order = np.argsort(np.asarray(ids), axis=-1, kind="stable")
  return np.take_along_axis(np.asarray(weights), order, axis=-1)
