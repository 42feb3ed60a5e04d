"""K-quant block quantizers (Q2_K..Q6_K, Q8_K), bit-exact with ggml-quants.c.

Each kernel maps float blocks `x [256, nb]` (element-major, block axis last; see _arith.py) and
optionally importance weights `qw [256, nb]` to the block bytes `[block_bytes, nb]` uint8.
Scale bytes are always unpacked again from the packed form before requantizing, as C does, so
any packing quirk carries through exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

from dq3jax.quant import _search as S
from dq3jax.quant._arith import (
  GROUP_MAX_EPS,
  Arith,
  clamp,
  first_absmax,
  fp16_round,
  materialize,
  positive_max,
  seqsum,
  to_u8,
  u16_le,
  wrap_i8,
  wrap_u8,
)

QK_K = 256


def _pack_2bit(L):
  """[256, nb] codes 0..3 -> qs[64]: byte 32h+l holds elements 128h+l+32k in bits 2k..2k+1."""
  nb = L.shape[-1]
  L = L.reshape(2, 4, 32, nb)
  b = L[:, 0] | (L[:, 1] << 2) | (L[:, 2] << 4) | (L[:, 3] << 6)
  return to_u8(b.reshape(64, nb))


def _pack_k4_scales(ls, lm):
  """Q4_K/Q5_K 12-byte scale packing of 8 six-bit scales and mins ([8, nb] ints, uint8 semantics)."""
  ls, lm = wrap_u8(ls), wrap_u8(lm)
  b = [None] * 12
  for j in range(4):
    b[j], b[j + 4] = ls[j], lm[j]
  for j in range(4, 8):
    b[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
    b[j - 4] = b[j - 4] | (((ls[j] >> 4) << 6) & 0xFF)
    b[j] = b[j] | (((lm[j] >> 4) << 6) & 0xFF)
  return jnp.stack([wrap_u8(v) for v in b])


def _unpack_k4_scales(b):
  sc, m = [], []
  for j in range(8):
    if j < 4:
      sc.append(b[j] & 63)
      m.append(b[j + 4] & 63)
    else:
      sc.append((b[j + 4] & 0xF) | ((b[j - 4] >> 6) << 4))
      m.append((b[j + 4] >> 4) | ((b[j] >> 6) << 4))
  return jnp.stack(sc), jnp.stack(m)


def _pack_q3_scales(s):
  """Q3_K: 16 six-bit scales [16, nb] (0..63) -> 12 bytes."""
  nb = s.shape[-1]
  b = [jnp.zeros((nb,), jnp.int32) for _ in range(12)]
  for j in range(16):
    if j < 8:
      b[j] = s[j] & 0xF
    else:
      b[j - 8] = b[j - 8] | ((s[j] & 0xF) << 4)
    b[8 + j % 4] = b[8 + j % 4] | ((s[j] >> 4) << (2 * (j // 4)))
  return jnp.stack([wrap_u8(v) for v in b])


def _unpack_q3_scales(b):
  out = []
  for j in range(16):
    low = b[j] & 0xF if j < 8 else b[j - 8] >> 4
    out.append(wrap_i8(low | (((b[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32)
  return jnp.stack(out)


def _sigma2(A: Arith, x, twice: bool):
  """C: sumx2 over the 256-block, then sumx2/256 (Q2_K) or 2*sumx2/256 (Q3_K..Q5_K)."""
  sumx2 = seqsum(A, A.mul(x, x), axis=0)
  if twice:
    sumx2 = A.mul(A.c(2), sumx2)
  return A.div(sumx2, A.c(QK_K))


def _imatrix_weights(A: Arith, xg, qwg, sigma2):
  """weight = qw * sqrtf(sigma2 + x*x), [P, n, nb]."""
  return A.mul(qwg, A.sqrt(A.add(sigma2[None, None, :], A.mul(xg, xg))))


def _requant_asym(A: Arith, xg, d_f, dmin_f, sc, m, codes, nmax):
  """l = nearest_int((x + dmin*m)/(d*sc)) for groups whose d*sc != 0; others keep the search codes."""
  dj = A.mul(d_f[None, :], A.from_int(sc))
  dm = A.mul(dmin_f[None, :], A.from_int(m))
  dj, dm = materialize(A.z, (dj, dm))  # per group, not per element (scale unpacking is a select chain)
  l = clamp(A.nearest_int(A.div(A.add(xg, dm[:, None, :]), dj[:, None, :])), 0, nmax)
  return jnp.where((dj == 0)[:, None, :], codes, l)


def _requant_sym(A: Arith, xg, d_f, sc, codes, lo, hi):
  dj = materialize(A.z, A.mul(d_f[None, :], A.from_int(sc)))  # per group, not per element
  l = clamp(A.nearest_int(A.div(xg, dj[:, None, :])), lo, hi) - lo
  return jnp.where((dj == 0)[:, None, :], codes, l)


# --------------------------------------------------------------------------------------- Q2_K


def q2_k(A: Arith, x, qw=None):
  nb = x.shape[-1]
  xg = x.reshape(16, 16, nb)
  if qw is None:
    scale, the_min, codes = S.make_qkx_quants(
      A, xg, jnp.abs(xg), 3, -0.5, 0.1, 15, use_mad=True, degenerate_le=False
    )
    max_scale = positive_max(scale, axis=0)
    max_min = positive_max(the_min, axis=0)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = A.nearest_int(A.mul(A.div(A.c(15), max_scale)[None, :], scale))
    lm = A.nearest_int(A.mul(A.div(A.c(15), max_min)[None, :], the_min))
    sbytes = jnp.where(has_s[None, :], wrap_u8(ls), 0)
    sbytes = wrap_u8(jnp.where(has_m[None, :], sbytes | (lm << 4), sbytes))
    d_h, d_f = fp16_round(A, jnp.where(has_s, A.div(max_scale, A.c(15)), A.c(0)))
    m_h, m_f = fp16_round(A, jnp.where(has_m, A.div(max_min, A.c(15)), A.c(0)))
  else:
    qwg = qw.reshape(16, 16, nb)
    weight = _imatrix_weights(A, xg, qwg, _sigma2(A, x, twice=False))
    sw = seqsum(A, weight, axis=1)
    scale, the_min, codes = S.make_qkx_quants(
      A, xg, weight, 3, -0.9, 0.05, 36, use_mad=False, degenerate_le=True
    )
    dm, Ls = S.make_qp_quants(A, scale[None], 15, sw[None])
    mm, Lm = S.make_qp_quants(A, the_min[None], 15, sw[None])
    sbytes = wrap_u8(Ls[0] | (Lm[0] << 4))
    d_h, d_f = fp16_round(A, dm[0])
    m_h, m_f = fp16_round(A, mm[0])
  codes = _requant_asym(A, xg, d_f, m_f, sbytes & 0xF, sbytes >> 4, codes, 3)
  codes, sbytes, d_h, m_h = materialize(A.z, (codes, sbytes, d_h, m_h))  # before packing: see materialize
  out = [to_u8(sbytes), _pack_2bit(codes.reshape(QK_K, nb)), jnp.stack(u16_le(d_h)), jnp.stack(u16_le(m_h))]
  return jnp.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------- Q3_K


def q3_k(A: Arith, x, qw=None):
  nb = x.shape[-1]
  xg = x.reshape(16, 16, nb)
  if qw is None:
    scale, codes = S.make_q3_quants(A, xg, 4)
    _, max_scale = first_absmax(scale, axis=0)
    has = max_scale != 0
    iscale = A.div(A.c(-32), max_scale)
    s = clamp(wrap_i8(A.nearest_int(A.mul(iscale[None, :], scale))), -32, 31) + 32
    packed = jnp.where(has[None, :], _pack_q3_scales(s), 0)
    d_h, d_f = fp16_round(A, jnp.where(has, A.div(A.c(1), iscale), A.c(0)))
  else:
    qwg = qw.reshape(16, 16, nb)
    weight = _imatrix_weights(A, xg, qwg, _sigma2(A, x, twice=True))
    sw = seqsum(A, weight, axis=1)
    scale, codes = S.make_qx_quants(A, xg, 4, qw=weight)
    d_block, Ls = S.make_qx_quants(A, scale[None], 32, qw=sw[None])
    packed = _pack_q3_scales(Ls[0])
    d_h, d_f = fp16_round(A, d_block[0])
  codes = _requant_sym(A, xg, d_f, _unpack_q3_scales(packed), codes, -4, 3).reshape(QK_K, nb)
  codes, packed, d_h = materialize(A.z, (codes, packed, d_h))
  high = codes > 3
  low = jnp.where(high, codes - 4, codes)
  hbits = high.astype(jnp.int32).reshape(8, 32, nb)  # element 32k+m -> hmask[m] bit k
  hmask = sum(hbits[k] << k for k in range(8))
  out = [to_u8(hmask), _pack_2bit(low), to_u8(packed), jnp.stack(u16_le(d_h))]
  return jnp.concatenate(out, axis=0)


# ---------------------------------------------------------------------------------- Q4_K, Q5_K


def _q45_k(A: Arith, x, qw, nmax):
  nb = x.shape[-1]
  xg = x.reshape(8, 32, nb)
  if qw is None:
    av_x = A.sqrt(A.div(seqsum(A, A.mul(xg, xg), axis=1), A.c(32)))
    w = A.add(av_x[:, None, :], jnp.abs(xg))
    rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
    scale, the_min, codes = S.make_qkx_quants(
      A, xg, w, nmax, rmin, rdelta, nstep, use_mad=False, degenerate_le=False
    )
    max_scale = positive_max(scale, axis=0)
    max_min = positive_max(the_min, axis=0)
    inv_s = jnp.where(max_scale > 0, A.div(A.c(63), max_scale), A.c(0))
    inv_m = jnp.where(max_min > 0, A.div(A.c(63), max_min), A.c(0))
    ls = jnp.minimum(63, wrap_u8(A.nearest_int(A.mul(inv_s[None, :], scale))))
    lm = jnp.minimum(63, wrap_u8(A.nearest_int(A.mul(inv_m[None, :], the_min))))
    d_h, d_f = fp16_round(A, A.div(max_scale, A.c(63)))
    m_h, m_f = fp16_round(A, A.div(max_min, A.c(63)))
  else:
    qwg = qw.reshape(8, 32, nb)
    weight = _imatrix_weights(A, xg, qwg, _sigma2(A, x, twice=True))
    sw = seqsum(A, weight, axis=1)
    scale, the_min, codes = S.make_qkx_quants(
      A, xg, weight, nmax, -0.9, 0.05, 36, use_mad=False, degenerate_le=True
    )
    d_block, ls = S.make_qp_quants(A, scale[None], 63, sw[None])
    m_block, lm = S.make_qp_quants(A, the_min[None], 63, sw[None])
    ls, lm = ls[0], lm[0]
    if nmax == 31:  # Q5_K's impl clamps, Q4_K's does not (a no-op for codes from make_qp_quants)
      ls, lm = jnp.minimum(63, ls), jnp.minimum(63, lm)
    d_h, d_f = fp16_round(A, d_block[0])
    m_h, m_f = fp16_round(A, m_block[0])
  packed = _pack_k4_scales(ls, lm)
  sc, m = _unpack_k4_scales(packed)
  codes = _requant_asym(A, xg, d_f, m_f, sc, m, codes, nmax).reshape(4, 2, 32, nb)  # [chunk, half, l]
  codes, packed, d_h, m_h = materialize(A.z, (codes, packed, d_h, m_h))
  head = [jnp.stack(u16_le(d_h)), jnp.stack(u16_le(m_h)), to_u8(packed)]
  if nmax == 15:
    qs = codes[:, 0] | (codes[:, 1] << 4)
    return jnp.concatenate(head + [to_u8(qs.reshape(128, nb))], axis=0)
  qs = (codes[:, 0] & 0xF) | ((codes[:, 1] & 0xF) << 4)
  hi = codes >> 4  # [4, 2, 32, nb]: bit 2c (first half) and 2c+1 (second half) of qh[l]
  qh = sum((hi[c, 0] << (2 * c)) | (hi[c, 1] << (2 * c + 1)) for c in range(4))
  return jnp.concatenate(head + [to_u8(qh), to_u8(qs.reshape(128, nb))], axis=0)


def q4_k(A: Arith, x, qw=None):
  return _q45_k(A, x, qw, 15)


def q5_k(A: Arith, x, qw=None):
  return _q45_k(A, x, qw, 31)


# --------------------------------------------------------------------------------------- Q6_K


def q6_k(A: Arith, x, qw=None):
  nb = x.shape[-1]
  xg = x.reshape(16, 16, nb)
  # The imatrix path uses the raw importance values as weights (no sigma2 term).
  scale, codes = S.make_qx_quants(A, xg, 32, qw=None if qw is None else qw.reshape(16, 16, nb))
  max_abs, max_scale = first_absmax(scale, axis=0)
  zero_block = max_abs < GROUP_MAX_EPS
  iscale = A.div(A.c(-128), max_scale)
  d_h, d_f = fp16_round(A, A.div(A.c(1), iscale))
  sc = wrap_i8(jnp.minimum(127, A.nearest_int(A.mul(iscale[None, :], scale))))
  codes = _requant_sym(A, xg, d_f, sc, codes, -32, 31).reshape(2, 4, 32, nb)  # [half, k, l]
  codes, sc, d_h, zero_block = materialize(A.z, (codes, sc, d_h, zero_block))
  ql = jnp.concatenate(
    [(codes[:, 0] & 0xF) | ((codes[:, 2] & 0xF) << 4), (codes[:, 1] & 0xF) | ((codes[:, 3] & 0xF) << 4)],
    axis=1,
  )  # [2, 64, nb]
  qh = sum((codes[:, k] >> 4) << (2 * k) for k in range(4))  # [2, 32, nb]
  out = jnp.concatenate(
    [to_u8(ql.reshape(128, nb)), to_u8(qh.reshape(64, nb)), to_u8(sc), jnp.stack(u16_le(d_h))], axis=0
  )
  return jnp.where(zero_block[None, :], jnp.uint8(0), out)


# --------------------------------------------------------------------------------------- Q8_K


def q8_k(A: Arith, x, qw=None):
  del qw  # Q8_K has no importance-matrix variant
  nb = x.shape[-1]
  amax, mx = first_absmax(x, axis=0)
  zero = amax == 0
  iscale = A.div(A.c(-127), mx)
  q = wrap_i8(jnp.minimum(127, A.nearest_int(A.mul(iscale[None, :], x))))
  q = jnp.where(zero[None, :], 0, q)
  q, iscale = materialize(A.z, (q, iscale))
  bsums = q.reshape(16, 16, nb).sum(axis=1)  # integer sums: order does not matter
  dbits = jnp.where(zero, jnp.uint32(0), A.to_f32_bits(A.div(A.c(1), iscale)))
  d_bytes = [((dbits >> (8 * k)) & 0xFF).astype(jnp.uint8) for k in range(4)]
  bs = bsums & 0xFFFF
  out = [jnp.stack(d_bytes), to_u8(q), jnp.stack([to_u8(bs), to_u8(bs >> 8)], axis=1).reshape(32, nb)]
  return jnp.concatenate(out, axis=0)
