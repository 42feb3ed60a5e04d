"""The 32-element formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, bit-exact with ggml-quants.c.

Kernels map `x [32, nb]` (element-major, block axis last) to `[block_bytes, nb]` uint8. The
importance-matrix variants also take `qw [32, nb]` and `sigma2 [nb]`, the mean square of the
block's whole row (those variants look at the entire row, so the caller computes it per row with
`row_sigma2`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from dq3jax.quant import _search as S
from dq3jax.quant._arith import (
  Arith,
  c_float_to_int32,
  first_absmax,
  fp16_round,
  scan_min_max,
  to_u8,
  u16_le,
  wrap_i8,
  wrap_u8,
)

FLT_MAX = np.float32(np.finfo(np.float32).max)


def _pack_nibbles(codes):
  """byte j = code j (low nibble) | code j+16 (high nibble), uint8 semantics."""
  return to_u8(codes[:16] | (codes[16:] << 4))


def _pack_q5(codes):
  """qs as Q4_0 from the low 4 bits; qh (u32 LE) bit j = bit 4 of code j."""
  qs = to_u8((codes[:16] & 0xF) | ((codes[16:] & 0xF) << 4))
  hbit = ((codes & 0x10) >> 4).astype(jnp.uint32)  # [32, nb]
  qh = sum(hbit[j] << j for j in range(32))
  qh_bytes = jnp.stack([((qh >> (8 * k)) & 0xFF).astype(jnp.uint8) for k in range(4)])
  return qh_bytes, qs


def _imatrix_weight(A: Arith, x, qw, sigma2):
  return A.mul(qw, A.sqrt(A.add(sigma2[None, :], A.mul(x, x))))


def _symmetric_ref(A: Arith, x, divisor, offset, cap):
  """Q4_0/Q5_0 reference: d = max/-divisor; code = MIN(cap, (int8)(x*id + offset))."""
  _, mx = first_absmax(x, axis=0)
  d = A.div(mx, A.c(-divisor))
  inv = jnp.where(d != 0, A.div(A.c(1), d), A.c(0))
  d_h, _ = fp16_round(A, d)
  v = A.add(A.mul(x, inv[None, :]), A.c(offset))
  codes = jnp.minimum(cap, wrap_i8(c_float_to_int32(v)))
  return d_h, codes


def _asymmetric_ref(A: Arith, x, levels, cap):
  """Q4_1/Q5_1 reference: d = (max-min)/levels; code = (x-min)*id + 0.5 truncated."""
  nb = x.shape[-1]
  mn, mx = scan_min_max(
    x, axis=0, init_min=jnp.full((nb,), FLT_MAX, A.dtype), init_max=jnp.full((nb,), -FLT_MAX, A.dtype)
  )
  d = A.div(A.sub(mx, mn), A.c(levels))
  inv = jnp.where(d != 0, A.div(A.c(1), d), A.c(0))
  d_h, _ = fp16_round(A, d)
  m_h, _ = fp16_round(A, mn)
  v = A.add(A.mul(A.sub(x, mn[None, :]), inv[None, :]), A.c(0.5))
  t = c_float_to_int32(v)
  codes = jnp.minimum(cap, wrap_i8(t)) if cap is not None else wrap_u8(t)
  return d_h, m_h, codes


def q4_0(A: Arith, x, qw=None, sigma2=None):
  if qw is None:
    d_h, codes = _symmetric_ref(A, x, 8, 8.5, 15)
  else:
    d, L = S.make_qx_quants(A, x[None], 8, qw=_imatrix_weight(A, x, qw, sigma2)[None])
    d_h, _ = fp16_round(A, d[0])
    codes = L[0]
  return jnp.concatenate([jnp.stack(u16_le(d_h)), _pack_nibbles(wrap_u8(codes))], axis=0)


def q5_0(A: Arith, x, qw=None, sigma2=None):
  if qw is None:
    d_h, codes = _symmetric_ref(A, x, 16, 16.5, 31)
  else:
    d, L = S.make_qx_quants(A, x[None], 16, qw=_imatrix_weight(A, x, qw, sigma2)[None])
    d_h, _ = fp16_round(A, d[0])
    codes = L[0]
  qh, qs = _pack_q5(wrap_u8(codes))
  return jnp.concatenate([jnp.stack(u16_le(d_h)), qh, qs], axis=0)


def _asym_imatrix(A: Arith, x, qw, sigma2, nmax):
  w = _imatrix_weight(A, x, qw, sigma2)
  scale, the_min, L = S.make_qkx_quants(
    A, x[None], w[None], nmax, -0.9, 0.05, 36, use_mad=False, degenerate_le=True
  )
  d_h, _ = fp16_round(A, scale[0])
  m_h, _ = fp16_round(A, -the_min[0])
  return d_h, m_h, L[0]


def q4_1(A: Arith, x, qw=None, sigma2=None):
  if qw is None:
    d_h, m_h, codes = _asymmetric_ref(A, x, 15, 15)
  else:
    d_h, m_h, codes = _asym_imatrix(A, x, qw, sigma2, 15)
  return jnp.concatenate(
    [jnp.stack(u16_le(d_h)), jnp.stack(u16_le(m_h)), _pack_nibbles(wrap_u8(codes))], axis=0
  )


def q5_1(A: Arith, x, qw=None, sigma2=None):
  if qw is None:
    d_h, m_h, codes = _asymmetric_ref(A, x, 31, None)
  else:
    d_h, m_h, codes = _asym_imatrix(A, x, qw, sigma2, 31)
  qh, qs = _pack_q5(wrap_u8(codes))
  return jnp.concatenate([jnp.stack(u16_le(d_h)), jnp.stack(u16_le(m_h)), qh, qs], axis=0)


def q8_0(A: Arith, x, qw=None, sigma2=None):
  del qw, sigma2  # ggml ignores the importance matrix for Q8_0
  amax = jnp.max(jnp.abs(x), axis=0)
  d = A.div(amax, A.c(127))
  inv = jnp.where(d != 0, A.div(A.c(1), d), A.c(0))
  d_h, _ = fp16_round(A, d)
  # roundf: half away from zero, then the float -> int8 conversion.
  q = lax.round(A.mul(x, inv[None, :]), lax.RoundingMethod.AWAY_FROM_ZERO)
  return jnp.concatenate([jnp.stack(u16_le(d_h)), to_u8(wrap_i8(c_float_to_int32(q)))], axis=0)


def row_sigma2(A: Arith, x_rows):
  """Mean square of each row, `x_rows [n, R]` -> [R]: C's sequential `sum_x2 += x*x`, then `/n`."""
  n = x_rows.shape[0]

  def body(j, carry):
    s, flag = carry
    B = A.fork(flag)
    v = x_rows[j]
    return B.add(s, B.mul(v, v)), B.flag

  s, A.flag = lax.fori_loop(0, n, body, (jnp.broadcast_to(A.zero(), x_rows.shape[1:]), A.flag))
  return A.div(s, A.c(n))
