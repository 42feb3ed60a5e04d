"""Dequantization kernels: block bytes `[nb, block_bytes]` uint8 -> float32 `[nb, block_elems]`.

Bit-identical to ggml's `to_float`. Every product here is exact in float32 (an fp16 scale has 11
significant bits, the codes at most 8) and every result is a multiple of 2**-24 or 0, so neither
FMA contraction nor flush-to-zero can change a bit; we only keep C's order of operations. The
exceptions are Q8_K (a float32 scale: its products can round and underflow) and F16, which is
converted with integer bit operations (F32 and BF16 are bit reinterpretations, done on the host: host.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from dq3jax.quant._arith import ExactArith, f16_bits_to_f32_bits


def _f16(lo, hi):
  bits = f16_bits_to_f32_bits(lo.astype(jnp.uint32) | (hi.astype(jnp.uint32) << 8))
  return lax.bitcast_convert_type(bits, jnp.float32)


def _i8(b):
  return lax.bitcast_convert_type(b, jnp.int8).astype(jnp.int32)


def _f(i):
  return i.astype(jnp.float32)


def f16(b):
  h = b.reshape(b.shape[0], -1, 2)
  return _f16(h[..., 0], h[..., 1])


def _nibbles(qs):
  return jnp.concatenate([qs & 0xF, qs >> 4], axis=1).astype(jnp.int32)  # [nb, 32]


def _q5_codes(qh_bytes, qs):
  qh = sum(qh_bytes[:, k].astype(jnp.uint32) << (8 * k) for k in range(4))  # [nb]
  hbit = ((qh[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.int32)
  return _nibbles(qs) | (hbit << 4)


def q4_0(b):
  d = _f16(b[:, 0], b[:, 1])
  return _f(_nibbles(b[:, 2:]) - 8) * d[:, None]


def q4_1(b):
  d, m = _f16(b[:, 0], b[:, 1]), _f16(b[:, 2], b[:, 3])
  return _f(_nibbles(b[:, 4:])) * d[:, None] + m[:, None]


def q5_0(b):
  d = _f16(b[:, 0], b[:, 1])
  return _f(_q5_codes(b[:, 2:6], b[:, 6:]) - 16) * d[:, None]


def q5_1(b):
  d, m = _f16(b[:, 0], b[:, 1]), _f16(b[:, 2], b[:, 3])
  return _f(_q5_codes(b[:, 4:8], b[:, 8:])) * d[:, None] + m[:, None]


def q8_0(b):
  d = _f16(b[:, 0], b[:, 1])
  return _f(_i8(b[:, 2:])) * d[:, None]


def _unpack_2bit(qs):
  """qs[64] -> [nb, 256] codes 0..3 (inverse of the Q2_K/Q3_K packing)."""
  nb = qs.shape[0]
  q = qs.reshape(nb, 2, 1, 32).astype(jnp.int32)
  shifts = (2 * jnp.arange(4, dtype=jnp.int32)).reshape(1, 1, 4, 1)
  return ((q >> shifts) & 3).reshape(nb, 256)


def q2_k(b):
  sc = b[:, :16].astype(jnp.int32)
  d, dmin = _f16(b[:, 80], b[:, 81]), _f16(b[:, 82], b[:, 83])
  dl = d[:, None] * _f(sc & 0xF)  # [nb, 16]
  ml = dmin[:, None] * _f(sc >> 4)
  q = _f(_unpack_2bit(b[:, 16:80])).reshape(-1, 16, 16)
  return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1, 256)


def q3_k(b):
  nb = b.shape[0]
  hm = b[:, :32].astype(jnp.int32)
  s = b[:, 96:108].astype(jnp.int32)
  d = _f16(b[:, 108], b[:, 109])
  scales = []
  for j in range(16):
    low = s[:, j] & 0xF if j < 8 else s[:, j - 8] >> 4
    scales.append((low | (((s[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32)
  dl = d[:, None] * _f(jnp.stack(scales, axis=1))  # [nb, 16]
  low2 = _unpack_2bit(b[:, 32:96])
  hbit = ((hm.reshape(nb, 1, 32) >> jnp.arange(8).reshape(1, 8, 1)) & 1).reshape(nb, 256)
  q = low2 - jnp.where(hbit != 0, 0, 4)
  return (dl[:, :, None] * _f(q).reshape(nb, 16, 16)).reshape(nb, 256)


def _k4_scales(s):
  sc, m = [], []
  for j in range(8):
    if j < 4:
      sc.append(s[:, j] & 63)
      m.append(s[:, j + 4] & 63)
    else:
      sc.append((s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4))
      m.append((s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4))
  return jnp.stack(sc, axis=1), jnp.stack(m, axis=1)


def _q45(b, codes):
  d, dmin = _f16(b[:, 0], b[:, 1]), _f16(b[:, 2], b[:, 3])
  sc, m = _k4_scales(b[:, 4:16].astype(jnp.int32))
  d1 = d[:, None] * _f(sc)
  m1 = dmin[:, None] * _f(m)
  return (d1[:, :, None] * _f(codes).reshape(-1, 8, 32) - m1[:, :, None]).reshape(-1, 256)


def _q4_k_codes(qs):
  nb = qs.shape[0]
  q = qs.reshape(nb, 4, 1, 32).astype(jnp.int32)
  return jnp.concatenate([q & 0xF, q >> 4], axis=2).reshape(nb, 256)


def q4_k(b):
  return _q45(b, _q4_k_codes(b[:, 16:144]))


def q5_k(b):
  nb = b.shape[0]
  qh = b[:, 16:48].astype(jnp.int32).reshape(nb, 1, 1, 32)
  shifts = jnp.arange(8).reshape(4, 2)[None, :, :, None]  # chunk c: bits 2c, 2c+1
  hbit = ((qh >> shifts) & 1).reshape(nb, 256)
  return _q45(b, _q4_k_codes(b[:, 48:176]) | (hbit << 4))


def q6_k(b):
  nb = b.shape[0]
  ql = b[:, :128].astype(jnp.int32).reshape(nb, 2, 2, 32)  # [half, lo/hi 32, l]
  qh = b[:, 128:192].astype(jnp.int32).reshape(nb, 2, 32)
  sc = _i8(b[:, 192:208])
  d = _f16(b[:, 208], b[:, 209])
  low = [ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4]  # k = 0..3
  q = jnp.stack([low[k] | (((qh >> (2 * k)) & 3) << 4) for k in range(4)], axis=2) - 32  # [nb,2,4,32]
  q = _f(q.reshape(nb, 16, 16))
  return ((d[:, None] * _f(sc))[:, :, None] * q).reshape(nb, 256)


def q8_k(b):
  # The float32 scale can be anything, so do the product exactly and round to float32 by hand.
  nb = b.shape[0]
  dbits = sum(b[:, k].astype(jnp.uint32) << (8 * k) for k in range(4))
  q = _i8(b[:, 4:260])
  A = ExactArith(jnp.int32(0), nb)  # the caller enables x64 for this kernel
  v = A.round32(A.from_f32_bits(dbits)[:, None] * q.astype(jnp.float64))
  return lax.bitcast_convert_type(A.to_f32_bits(v), jnp.float32)
