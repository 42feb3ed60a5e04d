"""Public quantize/dequantize: numpy in, numpy out, byte-identical to ggml.

Underneath are jit-compiled block kernels on `jax.Array`s (see kquants.py, legacy.py, iq4.py,
floats.py, dequant.py), and numpy bit conversions on the host (host.py); which kernel computes
a type, and how it is called (its family), is the type's entry in dq3jax.qtypes.REGISTRY. This
module validates input, lays rows out as blocks, runs the fast float32 kernel, re-runs the few
blocks it flags (underflow; see _arith.py) in the exact float64 arithmetic, and puts the bytes
back in row order.

Inputs are processed in fixed-size chunks, so a kernel compiles once per (type, mode), not once
per input shape; the chunks of one call run on a thread per core, and peak memory is the input, the
output and a chunk's scratch per thread (a caller that streams, like the converter, passes row chunks).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dq3jax.qtypes import REGISTRY, Family, Kernels, QType, qtype_of
from dq3jax.quant import legacy
from dq3jax.quant._arith import SAFE_MAGNITUDE, ExactArith, FastArith, materialize


def _check_kernels_resolve() -> None:
  # The registry names kernels as strings; resolving them all now makes a misspelt or missing one an
  # import error instead of a failure at that type's first use.
  for q in REGISTRY.values():
    if q.kernels is not None:
      if q.kernels.quantize is not None:
        q.kernels.quantizer()
      q.kernels.dequantizer()


_check_kernels_resolve()


def _kernels(type_id: int) -> Kernels:
  k = REGISTRY[type_id].kernels
  if k is None:  # quantize/dequantize refuse such types before they get here
    raise AssertionError(f"{REGISTRY[type_id].name} has no kernels")
  return k


# Elements per kernel call. The fast kernels always run on chunks of _FAST_CHUNK elements (small
# inputs are padded, large ones chunked) so each compiles exactly once; the exact kernels, which
# only see the few blocks the fast run flags, on chunks of _EXACT_CHUNK.
_FAST_CHUNK = 1 << 18
_EXACT_CHUNK = 1 << 14
_DEQUANT_CHUNK = 1 << 20  # dequantization is memory-bound and cheap to compile: larger chunks


def _chunk_blocks(chunk_elems: int, block_elems: int) -> int:
  return max(1, chunk_elems // block_elems)


# ------------------------------------------------------------------------------ jit factories


_SAFE_BITS = int(np.float32(SAFE_MAGNITUDE).view(np.uint32))


def _tiny_in_blocks(v: jax.Array) -> jax.Array:
  """[be, nb] -> [nb]: blocks holding a nonzero value below SAFE_MAGNITUDE, the inputs the fast
  path's proof does not cover. Compared as bits: with denormals-are-zero a subnormal compares equal
  to 0 on the CPU."""
  mag = lax.bitcast_convert_type(v, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
  return ((mag != 0) & (mag < jnp.uint32(_SAFE_BITS))).any(axis=0)


@functools.cache
def _fast_quantizer(type_id: int, with_qw: bool, with_sigma2: bool):
  k = _kernels(type_id)
  quantize = k.quantizer()

  def run(x_rows, qw_rows, sigma2, z):  # x_rows [nb, be]: one block per row, as the input lies
    x = x_rows.T  # [be, nb]: the kernels keep the block axis last
    if k.family is Family.FLOAT:
      return quantize(x).T, jnp.zeros((x.shape[-1],), jnp.bool_)
    # Transposed once into memory: fused into the kernel, the transpose was re-read with strides by
    # every consumer of x (Q5_1 ran at half speed).
    x = materialize(z, x)
    A = FastArith(z, x.shape[-1])
    qw = materialize(z, qw_rows.T) if with_qw else None
    extra = {"sigma2": sigma2} if with_sigma2 else {}
    out = materialize(z, quantize(A, x, qw, **extra))  # [bb, nb], packed before it is transposed
    redo = A.flag | _tiny_in_blocks(x)
    if with_qw:
      redo = redo | _tiny_in_blocks(qw)
    if with_sigma2:
      redo = redo | _tiny_in_blocks(sigma2[None])
    return out.T, redo

  return jax.jit(run)


@functools.cache
def _exact_quantizer(type_id: int, with_qw: bool, with_sigma2: bool):
  quantize = _kernels(type_id).quantizer()

  def run(x_bits, qw_bits, s2_bits, z):  # float32 inputs arrive as bits: x64 casts would flush subnormals
    A = ExactArith(z, x_bits.shape[-1])
    x = A.from_f32_bits(x_bits)
    qw = A.from_f32_bits(qw_bits) if with_qw else None
    extra = {"sigma2": A.from_f32_bits(s2_bits)} if with_sigma2 else {}
    return quantize(A, x, qw, **extra)

  return jax.jit(run)


@functools.cache
def _sigma2_fns():
  def fast(x_rows, z):  # x_rows [n, R]
    A = FastArith(z, x_rows.shape[-1])
    return A.to_f32_bits(legacy.row_sigma2(A, x_rows)), A.flag | _tiny_in_blocks(x_rows)

  def exact(x_bits, z):
    A = ExactArith(z, x_bits.shape[-1])
    return A.to_f32_bits(legacy.row_sigma2(A, A.from_f32_bits(x_bits)))

  return jax.jit(fast), jax.jit(exact)


@functools.cache
def _dequantizer(type_id: int):
  return jax.jit(_kernels(type_id).dequantizer())


_ZERO = np.int32(0)


def _pad_cols(a: np.ndarray, n: int) -> np.ndarray:
  return a if a.shape[-1] == n else np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - a.shape[-1])])


def _run_exact(type_id, with_qw, with_sigma2, x, qw, s2) -> np.ndarray:
  """Exact float64 arithmetic on a few blocks (x [be, m]); returns bytes [bb, m]."""
  m = x.shape[-1]
  nbk = _chunk_blocks(_EXACT_CHUNK, x.shape[0])
  fn = _exact_quantizer(type_id, with_qw, with_sigma2)
  outs = []
  with jax.enable_x64(True):
    for s in range(0, m, nbk):
      sl = slice(s, min(m, s + nbk))
      xb = _pad_cols(x[:, sl], nbk).view(np.uint32)
      qb = _pad_cols(qw[:, sl], nbk).view(np.uint32) if with_qw else np.zeros((1,), np.uint32)
      sb = _pad_cols(s2[sl], nbk).view(np.uint32) if with_sigma2 else np.zeros((1,), np.uint32)
      outs.append(np.asarray(fn(xb, qb, sb, _ZERO))[:, : sl.stop - sl.start])
  return np.concatenate(outs, axis=1)


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
  return a if a.shape[0] == n else np.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """Chunks run concurrently, one per core: XLA:CPU runs these kernels' loops on one thread each."""
  global _POOL
  if _POOL is None:
    _POOL = concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="dq3jax")
  return _POOL


def _quantize_blocks(q: QType, x_rows: np.ndarray, qw_tile: np.ndarray | None, s2b: np.ndarray | None):
  """x_rows [NB, be] float32 (block b = row b) -> bytes [NB, bb].

  qw_tile [bpr, be] holds the importance weights of one row's blocks (block b uses qw_tile[b %
  bpr]); s2b [NB] the legacy types' per-block row sigma2.
  """
  n_blocks, be = x_rows.shape
  with_qw, with_s2 = qw_tile is not None, s2b is not None
  nbk = _chunk_blocks(_FAST_CHUNK, be)
  fast = _fast_quantizer(q.id, with_qw, with_s2)
  dummy = np.zeros((1,), np.float32)

  def chunk_inputs(s: int, e: int):
    cq = np.take(qw_tile, np.arange(s, e) % qw_tile.shape[0], axis=0) if with_qw else None
    cs = s2b[s:e] if with_s2 else None
    return cq, cs

  def run_fast(s: int):
    e = min(n_blocks, s + nbk)
    cq, cs = chunk_inputs(s, e)
    res, redo = fast(
      _pad_rows(x_rows[s:e], nbk),
      _pad_rows(cq, nbk) if with_qw else dummy,
      _pad_rows(cs, nbk) if with_s2 else dummy,
      _ZERO,
    )
    return np.asarray(res)[: e - s], np.asarray(redo)[: e - s]

  out = np.empty((n_blocks, q.block_bytes), np.uint8)
  starts = range(0, n_blocks, nbk)
  results = _pool().map(run_fast, starts) if len(starts) > 1 else map(run_fast, starts)
  for s, (res, redo) in zip(starts, results, strict=True):
    e = min(n_blocks, s + nbk)
    out[s:e] = res
    idx = np.flatnonzero(redo)
    if idx.size:
      # Blocks that may have underflowed in float32 (or read a tiny input) are redone exactly.
      cq, cs = chunk_inputs(s, e)
      out[s + idx] = _run_exact(
        q.id,
        with_qw,
        with_s2,
        np.ascontiguousarray(x_rows[s + idx].T),
        np.ascontiguousarray(cq[idx].T) if with_qw else None,
        cs[idx] if with_s2 else None,
      ).T
  return out


def _row_sigma2(x: np.ndarray) -> np.ndarray:
  """Per-row mean square (float32), as the legacy importance-matrix quantizers compute it."""
  fast, exact = _sigma2_fns()
  rows = x.shape[0]
  bits = np.empty(rows, np.uint32)
  step = 256
  for s in range(0, rows, step):
    e = min(rows, s + step)
    xt = _pad_cols(np.ascontiguousarray(x[s:e].T), step)
    b, flag = fast(xt, _ZERO)
    b = np.asarray(b)[: e - s].copy()
    redo = np.flatnonzero(np.asarray(flag)[: e - s])
    if redo.size:
      with jax.enable_x64(True):
        b[redo] = np.asarray(exact(_pad_cols(xt[:, redo], step).view(np.uint32), _ZERO))[: redo.size]
    bits[s:e] = b
  return bits.view(np.float32)


# ------------------------------------------------------------------------------------ checks


def _check_finite(x: np.ndarray, block_elems: int, what: str) -> None:
  if x.size == 0 or (np.isfinite(x.max()) and np.isfinite(x.min())):  # NaN propagates; no temporaries
    return
  bad = ~np.isfinite(x)
  if bad.any():
    r, c = np.argwhere(bad)[0]
    raise ValueError(
      f"{what} has a non-finite value {float(x[r, c])!r} at row {r}, column {c} (block {c // block_elems} of "
      f"that row); ggml would write garbage bytes for it, so dq3jax refuses "
      f"({int(bad.sum())} non-finite values in all)"
    )


def _as_rows(x, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.dtype != np.float32:
    if not np.issubdtype(a.dtype, np.floating):
      raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    a = a.astype(np.float32)
  if a.ndim == 1:
    a = a[None, :]
  if a.ndim != 2:
    raise ValueError(f"{name} must be [rows, n] or [n], got shape {a.shape}")
  return np.ascontiguousarray(a)


def _check_imatrix(imatrix, n: int) -> np.ndarray:
  qw = np.asarray(imatrix, dtype=np.float32)
  if qw.shape != (n,):
    raise ValueError(f"imatrix must have shape ({n},) (one weight per column), got {qw.shape}")
  bad = ~np.isfinite(qw) | (qw < 0)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(
      f"imatrix must be finite and >= 0; column {i} is {float(qw[i])!r} ({int(bad.sum())} bad values in all)"
    )
  return qw


# ------------------------------------------------------------------------------------ public


def quantize(x, qtype, *, imatrix=None) -> np.ndarray:
  """Quantize float32 rows exactly as ggml's `ggml_quantize_chunk` does.

  Args:
    x: float32 `[rows, n]` (a 1-D array is one row); `n` must be a multiple of the block size.
    qtype: a ggml type name ("Q4_K"), id, `gguf.GGMLQuantizationType` or `dq3jax.qtypes.QType`.
    imatrix: optional float32 `[n]` importance weights (one per column), as llama-quantize passes
      them. Ignored, as in ggml, by the storable types that have no importance-matrix variant
      (`uses_imatrix` False: F32, F16, BF16, Q8_0); refused for Q8_K, which ggml_quantize_chunk does
      not quantize at all.

  Returns:
    uint8 `[rows, row_bytes]`, byte-identical to ggml.
  """
  q = qtype_of(qtype)
  k = q.kernels
  if not q.computable:
    can = ", ".join(t.name for t in REGISTRY.values() if t.computable)
    raise ValueError(f"dq3jax has no quantizer for {q.name}; it quantizes {can}")
  rows_x = _as_rows(x, "x")
  rows, n = rows_x.shape
  if n % q.block_elems:
    raise ValueError(
      f"{q.name}: row width {n} is not a multiple of the block size {q.block_elems} "
      f"({n % q.block_elems} elements left over)"
    )
  if imatrix is not None and not q.storable:
    # An activation type (Q8_K): ggml quantizes it with quantize_row_q8_K, which takes no weights.
    raise ValueError(f"{q.name} has no importance-matrix variant")
  qw = _check_imatrix(imatrix, n) if imatrix is not None else None
  if not q.uses_imatrix:
    qw = None
  if k.family is not Family.FLOAT:
    _check_finite(rows_x, q.block_elems, "x")
  if rows * n == 0:
    return np.zeros((rows, q.row_bytes(n)), np.uint8)
  if k.on_host:
    return k.quantizer()(rows_x).reshape(rows, q.row_bytes(n))
  be = q.block_elems
  qw_tile = s2b = None
  if qw is not None:
    qw_tile = qw.reshape(-1, be)
    if k.family is Family.LEGACY:
      s2b = np.repeat(_row_sigma2(rows_x), n // be)
  out = _quantize_blocks(q, rows_x.reshape(-1, be), qw_tile, s2b)
  return out.reshape(rows, q.row_bytes(n))


def dequantize(data, qtype, shape) -> np.ndarray:
  """Dequantize ggml bytes to float32 of `shape`, bit-identical to ggml's `to_float`."""
  q = qtype_of(qtype)
  k = q.kernels
  if k is None:
    raise ValueError(f"dq3jax has no dequantizer for {q.name}")
  shape = tuple(int(s) for s in (shape if np.ndim(shape) else (shape,)))
  if not shape or any(s < 0 for s in shape):
    raise ValueError(f"invalid shape {shape}")
  if shape[-1] % q.block_elems:
    raise ValueError(
      f"{q.name}: last dimension {shape[-1]} is not a multiple of the block size {q.block_elems}"
    )
  raw = (
    np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
  )
  if raw.dtype != np.uint8:
    raise TypeError(f"data must be uint8 bytes, got dtype {raw.dtype}")
  n_el = int(np.prod(shape))
  expected = n_el // q.block_elems * q.block_bytes
  if raw.size != expected:
    raise ValueError(
      f"{q.name} data for shape {shape} must be {expected} bytes "
      f"({n_el // q.block_elems} blocks of {q.block_bytes}), got {raw.size}"
    )
  if k.on_host:
    return k.dequantizer()(raw).reshape(shape)
  blocks = raw.reshape(-1, q.block_bytes)
  n_blocks = blocks.shape[0]
  out = np.empty((n_blocks, q.block_elems), np.float32)
  if n_blocks == 0:
    return out.reshape(shape)
  nbk = _chunk_blocks(_DEQUANT_CHUNK, q.block_elems)
  fn = _dequantizer(q.id)
  ctx = jax.enable_x64(True) if k.dequantize_x64 else contextlib.nullcontext()
  with ctx:
    for s in range(0, n_blocks, nbk):
      e = min(n_blocks, s + nbk)
      chunk = blocks[s:e]
      if chunk.shape[0] != nbk:
        chunk = np.pad(chunk, [(0, nbk - chunk.shape[0]), (0, 0)])
      out[s:e] = np.asarray(fn(chunk, _ZERO))[: e - s]
  return out.reshape(shape)
