"""Dequantization kernels: block bytes `[nb, block_bytes]` uint8 -> float32 `[nb, block_elems]`.

Bit-identical to ggml's `to_float`. Every product here is exact in float32 (an fp16 scale has 11
significant bits, the codes at most 8; IQ4_XS's fp16 d times a 6-bit scale times a 7-bit level is at most
11 + 5 + 7 bits) and every result is a multiple of 2**-24 or 0, so neither
FMA contraction nor flush-to-zero can change a bit; we only keep C's order of operations. The
exceptions are Q8_K (a float32 scale: its products can round and underflow) and F16, which is
converted with integer bit operations (F32 and BF16 are bit reinterpretations, done on the host: host.py).

Every kernel takes the blocks and the runtime zero `z` (see _arith.materialize): per-block values
(the fp16 scale conversions, unpacked sub-block scales) are computed once into memory. Fused into
the element loop, XLA recomputed them for every element, which made Q4_K 10x slower than ggml.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from dq3jax.quant._arith import ExactArith, f16_value, materialize
from dq3jax.quant.iq4 import KVALUES


def _f16(lo, hi):
  return f16_value(lo.astype(jnp.uint32) | (hi.astype(jnp.uint32) << 8))


def _i8(b):
  return lax.bitcast_convert_type(b, jnp.int8).astype(jnp.int32)


def _f(i):
  return i.astype(jnp.float32)


def f16(b, z):
  del z
  h = b.reshape(b.shape[0], -1, 2)
  return _f16(h[..., 0], h[..., 1])


def _nibbles(qs):
  return jnp.concatenate([qs & 0xF, qs >> 4], axis=1).astype(jnp.int32)  # [nb, 32]


def _q5_codes(qh_bytes, qs):
  qh = sum(qh_bytes[:, k].astype(jnp.uint32) << (8 * k) for k in range(4))  # [nb]
  hbit = ((qh[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.int32)
  return _nibbles(qs) | (hbit << 4)


def q4_0(b, z):
  d = materialize(z, _f16(b[:, 0], b[:, 1]))
  return _f(_nibbles(b[:, 2:]) - 8) * d[:, None]


def q4_1(b, z):
  d, m = materialize(z, (_f16(b[:, 0], b[:, 1]), _f16(b[:, 2], b[:, 3])))
  return _f(_nibbles(b[:, 4:])) * d[:, None] + m[:, None]


def q5_0(b, z):
  d = materialize(z, _f16(b[:, 0], b[:, 1]))
  return _f(_q5_codes(b[:, 2:6], b[:, 6:]) - 16) * d[:, None]


def q5_1(b, z):
  d, m = materialize(z, (_f16(b[:, 0], b[:, 1]), _f16(b[:, 2], b[:, 3])))
  return _f(_q5_codes(b[:, 4:8], b[:, 8:])) * d[:, None] + m[:, None]


def q8_0(b, z):
  d = materialize(z, _f16(b[:, 0], b[:, 1]))
  return _f(_i8(b[:, 2:])) * d[:, None]


def _unpack_2bit(qs):
  """qs[64] -> [nb, 256] codes 0..3 (inverse of the Q2_K/Q3_K packing)."""
  nb = qs.shape[0]
  q = qs.reshape(nb, 2, 1, 32).astype(jnp.int32)
  shifts = (2 * jnp.arange(4, dtype=jnp.int32)).reshape(1, 1, 4, 1)
  return ((q >> shifts) & 3).reshape(nb, 256)


def q2_k(b, z):
  sc = b[:, :16].astype(jnp.int32)
  d, dmin = _f16(b[:, 80], b[:, 81]), _f16(b[:, 82], b[:, 83])
  dl = d[:, None] * _f(sc & 0xF)  # [nb, 16]
  ml = dmin[:, None] * _f(sc >> 4)
  dl, ml = materialize(z, (dl, ml))
  q = _f(_unpack_2bit(b[:, 16:80])).reshape(-1, 16, 16)
  return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1, 256)


def q3_k(b, z):
  nb = b.shape[0]
  hm = b[:, :32].astype(jnp.int32)
  s = b[:, 96:108].astype(jnp.int32)
  d = _f16(b[:, 108], b[:, 109])
  scales = []
  for j in range(16):
    low = s[:, j] & 0xF if j < 8 else s[:, j - 8] >> 4
    scales.append((low | (((s[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32)
  dl = materialize(z, d[:, None] * _f(jnp.stack(scales, axis=1)))  # [nb, 16]
  low2 = _unpack_2bit(b[:, 32:96])
  hbit = ((hm.reshape(nb, 1, 32) >> jnp.arange(8).reshape(1, 8, 1)) & 1).reshape(nb, 256)
  q = low2 - jnp.where(hbit != 0, 0, 4)
  return (dl[:, :, None] * _f(q).reshape(nb, 16, 16)).reshape(nb, 256)


def _k4_scales(s):
  """The 12 packed scale bytes [nb, 12] -> six-bit scales and mins [nb, 8] each (sub-block j).

  Sub-blocks 0-3 sit in the low six bits of bytes 0-3 (mins 4-7); 4-7 take a nibble of bytes
  8-11 and the top two bits of bytes 0-3 (mins 4-7). Written as whole-column ops: a per-j stack
  made XLA rebuild the eight-way choice for every output element.
  """
  lo_sc, lo_m, nib = s[:, 0:4], s[:, 4:8], s[:, 8:12]
  sc = jnp.concatenate([lo_sc & 63, (nib & 0xF) | ((lo_sc >> 6) << 4)], axis=1)
  m = jnp.concatenate([lo_m & 63, (nib >> 4) | ((lo_m >> 6) << 4)], axis=1)
  return sc, m


_HALF_SHIFT = jnp.array([0, 4], dtype=jnp.int32).reshape(1, 1, 2, 1)  # [., chunk, half, l]


def _q45(b, z, codes):
  """codes [nb, 4, 2, 32] (chunk c, half h, element l; sub-block 2c + h) -> [nb, 256]."""
  nb = b.shape[0]
  d, dmin = _f16(b[:, 0], b[:, 1]), _f16(b[:, 2], b[:, 3])
  sc, m = _k4_scales(b[:, 4:16].astype(jnp.int32))
  d1 = (d[:, None] * _f(sc)).reshape(nb, 4, 2, 1)
  m1 = (dmin[:, None] * _f(m)).reshape(nb, 4, 2, 1)
  d1, m1 = materialize(z, (d1, m1))
  return (d1 * _f(codes) - m1).reshape(nb, 256)


def _q4_k_codes(qs):
  """qs [nb, 128]: chunk c's 32 bytes hold its first 32 codes in the low nibbles, the next 32 high."""
  return (qs.reshape(qs.shape[0], 4, 1, 32).astype(jnp.int32) >> _HALF_SHIFT) & 0xF


def q4_k(b, z):
  return _q45(b, z, _q4_k_codes(b[:, 16:144]))


def q5_k(b, z):
  nb = b.shape[0]
  qh = b[:, 16:48].astype(jnp.int32).reshape(nb, 1, 1, 32)
  shifts = jnp.arange(8, dtype=jnp.int32).reshape(1, 4, 2, 1)  # chunk c, half h: bit 2c + h of qh[l]
  return _q45(b, z, _q4_k_codes(b[:, 48:176]) | (((qh >> shifts) & 1) << 4))


def q6_k(b, z):
  nb = b.shape[0]
  ql = b[:, :128].astype(jnp.int32).reshape(nb, 2, 2, 32)  # [half, lo/hi 32, l]
  qh = b[:, 128:192].astype(jnp.int32).reshape(nb, 2, 32)
  sc = _i8(b[:, 192:208])
  d = _f16(b[:, 208], b[:, 209])
  low = [ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4]  # k = 0..3
  q = jnp.stack([low[k] | (((qh >> (2 * k)) & 3) << 4) for k in range(4)], axis=2) - 32  # [nb,2,4,32]
  q = _f(q.reshape(nb, 16, 16))
  dl = materialize(z, d[:, None] * _f(sc))  # [nb, 16]
  return (dl[:, :, None] * q).reshape(nb, 256)


def q8_k(b, z):
  # The float32 scale can be anything, so do the product exactly and round to float32 by hand.
  nb = b.shape[0]
  dbits = sum(b[:, k].astype(jnp.uint32) << (8 * k) for k in range(4))
  q = _i8(b[:, 4:260])
  A = ExactArith(z, nb)  # the caller enables x64 for this kernel
  v = A.round32(A.from_f32_bits(dbits)[:, None] * q.astype(jnp.float64))
  return lax.bitcast_convert_type(A.to_f32_bits(v), jnp.float32)


def _iq4_levels(codes):
  """Codes 0..15 -> KVALUES as float32."""
  out = jnp.full(codes.shape, np.float32(KVALUES[0]), jnp.float32)
  for k in range(1, 16):
    out = jnp.where(codes == k, np.float32(KVALUES[k]), out)
  return out


def iq4_nl(b, z):
  d = materialize(z, _f16(b[:, 0], b[:, 1]))
  return d[:, None] * _iq4_levels(_nibbles(b[:, 2:]))


def iq4_xs(b, z):
  nb = b.shape[0]
  d = _f16(b[:, 0], b[:, 1])
  scales_h = b[:, 2].astype(jnp.int32) | (b[:, 3].astype(jnp.int32) << 8)
  scales_l = b[:, 4:8].astype(jnp.int32)
  ib = jnp.arange(8, dtype=jnp.int32)
  low = (scales_l[:, ib // 2] >> (4 * (ib % 2))) & 0xF  # [nb, 8]
  ls = low | (((scales_h[:, None] >> (2 * ib)) & 3) << 4)
  dl = materialize(z, d[:, None] * _f(ls - 32))  # [nb, 8]: C's d * (ls - 32), then times the level
  qs = b[:, 8:].reshape(nb, 8, 16).astype(jnp.int32)
  codes = jnp.concatenate([qs & 0xF, qs >> 4], axis=2)  # [nb, 8, 32]
  return (dl[:, :, None] * _iq4_levels(codes)).reshape(nb, -1)
