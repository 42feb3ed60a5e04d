"""Dequantization of ggml's lattice i-quants: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.

Same conventions as dequant.py: `f(b, z)` maps block bytes `[nb, block_bytes]` uint8 to float32
`[nb, 256]`, bit-identical to ggml's `dequantize_row_*` (ggml-quants.c); `z` is the runtime zero
(_arith.materialize), used to compute the per-block scales into memory once.

Every block is a super-block of 256 values in 32 groups of 8. A group is a row of a fixed codebook
(iq_grids.py), picked by a stored index; its eight signs come from a stored byte or from seven stored
bits plus even parity (KSIGNS_IQ2XS); its scale is the block's fp16 `d` times a small odd integer code.

Why the result is C's bit for bit, whatever XLA does with the arithmetic (each kernel states its
numbers): the fp16 `d` has at most 11 significant bits and is 0 or in [2**-24, 65504] in magnitude;
every other factor (the scale code, `0.5 + s`, the powers of two, a grid value, `grid + delta`, +-1) is
a short odd integer times a power of two. Each product C forms therefore has at most 22 significant
bits and is exact in float32, and its magnitude stays in [2**-27, 2**25) or is 0: far from float32's
subnormal range (flush-to-zero cannot act) and from overflow. The only addition (`0.5f + s`,
`grid + delta`) comes before the products that use it, so there is no `a*b + c` for XLA to contract
into an FMA. With exact steps the order of operations cannot change a finite result; it is still
C's. Non-finite scales: an Inf `d` meets no zero factor (no code, grid value or `grid + delta` is 0), so every value is
+-Inf as in C. A NaN `d` (quieted by the fp16 conversion, as the hardware conversion ggml uses does)
passes through C's products with its payload (x86 returns the NaN operand); the kernels select `d`
for such blocks instead of trusting the backend's NaN propagation (GPUs return a canonical NaN).
The sign: C writes `v * (neg ? -1.f : 1.f)`, which GCC (12.2, the pinned libggml-base's disassembly)
compiles to `mulss` and a conditional `xorps` of the sign bit: it flips a NaN's sign too, where a true
multiply by -1 would not (tests/quant/test_iq_dequant.py shows both). We flip the bit by an integer
XOR, so the result does not hang on XLA recognising the same pattern (today it does).

The fp16 conversion is _arith's integer one, so no backend's float conversion (or FTZ) is involved.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from dq3jax.quant._arith import f16_value, materialize
from dq3jax.quant.iq_grids import (
  IQ1S_DELTA,
  IQ1S_GRID,
  IQ2S_GRID,
  IQ2XS_GRID,
  IQ2XXS_GRID,
  IQ3S_GRID,
  IQ3XXS_GRID,
  KMASK_IQ2XS,
  KSIGNS_IQ2XS,
)

_HALF = np.float32(0.5)
_QUARTER = np.float32(0.25)


def _u16(b) -> jnp.ndarray:
  """[..., 2k] bytes -> [..., k] little-endian uint32 holding 16-bit words."""
  w = b.reshape(*b.shape[:-1], -1, 2).astype(jnp.uint32)
  return w[..., 0] | (w[..., 1] << 8)


def _u32(b) -> jnp.ndarray:
  """[..., 4k] bytes -> [..., k] little-endian uint32 words."""
  w = b.reshape(*b.shape[:-1], -1, 4).astype(jnp.uint32)
  return w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)


def _f(i) -> jnp.ndarray:
  return i.astype(jnp.float32)


def _rows(table: np.ndarray, idx) -> jnp.ndarray:
  """Codebook rows `table[idx]` as float32 [..., cols] (C converts each uint8/int8 value exactly)."""
  return _f(jnp.take(jnp.asarray(table), idx.astype(jnp.int32), axis=0, mode="clip"))


_SIGN_BIT = np.uint32(0x80000000)


def _sign_bits(sign_bytes) -> jnp.ndarray:
  """sign bytes [...] -> [..., 8] uint32: the float32 sign bit where bit j (kmask_iq2xs[j]) is set."""
  neg = (sign_bytes.astype(jnp.uint8)[..., None] & jnp.asarray(KMASK_IQ2XS)) != 0
  return jnp.where(neg, _SIGN_BIT, np.uint32(0))


def _parity_sign_bits(seven_bits) -> jnp.ndarray:
  """Seven stored sign bits [...] -> [..., 8] sign bits via KSIGNS_IQ2XS (eighth sign by even parity)."""
  return _sign_bits(jnp.take(jnp.asarray(KSIGNS_IQ2XS), seven_bits.astype(jnp.int32), axis=0, mode="clip"))


def _scale_nan(d, v) -> jnp.ndarray:
  """v [nb, ...] with every value of a block whose scale d [nb] is NaN replaced by d itself.

  In C a NaN d passes through each product unchanged (x86 returns the NaN operand); backends differ
  (GPUs return a canonical NaN), so the payload is selected, not left to the multiplier.
  """
  nan = jnp.isnan(d).reshape(d.shape + (1,) * (v.ndim - 1))
  return jnp.where(nan, d.reshape(nan.shape), v)


def _signed(d, v, sign_bits) -> jnp.ndarray:
  """C's `v * (neg ? -1.f : 1.f)` as ggml's compiled code does it: a flip of the sign bit (NaN included)."""
  v = _scale_nan(d, v)
  return lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.uint32) ^ sign_bits, jnp.float32)


def _iq2_scales(d, nibbles) -> jnp.ndarray:
  """C's `d * (0.5f + s) * 0.25f`, left to right: d [nb] times codes [nb, k] -> [nb, k]."""
  return d[:, None] * (_HALF + _f(nibbles)) * _QUARTER


def _nibble_pairs(s) -> jnp.ndarray:
  """scale bytes [nb, k] -> [nb, 2k]: low nibble first (the first half of a 32-group), then high."""
  s = s.astype(jnp.uint32)
  return jnp.stack([s & 0xF, s >> 4], axis=-1).reshape(s.shape[0], -1)


def iq2_xxs(b, z):
  """IQ2_XXS, 66 bytes: fp16 d, then per 32 values two words: four 8-bit indices into the 256-row grid,
  and 4 x 7 sign bits with a 4-bit scale s on top.

  y = (d * (0.5 + s) * 0.25) * grid * sign: d (11 bits) times 2s+1 (5 bits), halved and quartered
  (powers of two), times 8, 25 or 43 (6 bits): at most 22 bits, exact; nonzero magnitudes from
  2**-27 (the scale) to below 2**24.
  """
  nb = b.shape[0]
  d = f16_value(_u16(b[:, 0:2])[:, 0])  # [nb]
  g = b[:, 2:].reshape(nb, 8, 8)  # [nb, 32-group, 8 bytes]
  w = _u32(g[:, :, 4:8])[..., 0]  # [nb, 8]: signs and scale
  d, db = materialize(z, (d, _iq2_scales(d, w >> 28)))  # [nb], [nb, 8]
  grid = _rows(IQ2XXS_GRID, g[:, :, 0:4])  # [nb, 8, 4, 8]
  signs = _parity_sign_bits((w[:, :, None] >> (7 * jnp.arange(4, dtype=jnp.uint32))) & 127)  # [nb, 8, 4, 8]
  return _signed(d, db[:, :, None, None] * grid, signs).reshape(nb, 256)


def iq2_xs(b, z):
  """IQ2_XS, 74 bytes: fp16 d; 32 words of a 9-bit index into the 512-row grid and 7 sign bits;
  8 scale bytes, one nibble per 16 values (low nibble first).

  Same numbers as IQ2_XXS (scale d * (0.5 + s) * 0.25, grid values 8, 25, 43): exact.
  """
  nb = b.shape[0]
  d = f16_value(_u16(b[:, 0:2])[:, 0])
  q = _u16(b[:, 2:66])  # [nb, 32]
  d, db = materialize(z, (d, _iq2_scales(d, _nibble_pairs(b[:, 66:74]))))  # [nb], [nb, 16]
  grid = _rows(IQ2XS_GRID, q & 511).reshape(nb, 16, 2, 8)
  signs = _parity_sign_bits(q >> 9).reshape(nb, 16, 2, 8)
  return _signed(d, db[:, :, None, None] * grid, signs).reshape(nb, 256)


def iq2_s(b, z):
  """IQ2_S, 82 bytes: fp16 d; 32 low index bytes; 32 sign bytes (one per group of 8); 8 bytes of
  high index bits (two per group, bits 8-9 of a 1024-row grid index); 8 scale bytes as in IQ2_XS.

  Same numbers as IQ2_XXS: exact.
  """
  nb = b.shape[0]
  d = f16_value(_u16(b[:, 0:2])[:, 0])
  lo = b[:, 2:34].astype(jnp.uint32).reshape(nb, 8, 4)
  qh = b[:, 66:74].astype(jnp.uint32)  # [nb, 8]
  hi = (qh[:, :, None] >> (2 * jnp.arange(4, dtype=jnp.uint32))) & 3  # [nb, 8, 4]
  d, db = materialize(z, (d, _iq2_scales(d, _nibble_pairs(b[:, 74:82]))))  # [nb], [nb, 16]
  grid = _rows(IQ2S_GRID, lo | (hi << 8)).reshape(nb, 16, 2, 8)
  signs = _sign_bits(b[:, 34:66]).reshape(nb, 16, 2, 8)
  return _signed(d, db[:, :, None, None] * grid, signs).reshape(nb, 256)


def iq3_xxs(b, z):
  """IQ3_XXS, 98 bytes: fp16 d; 64 indices into the 256-row grid of 4 values (two per group of 8);
  per 32 values one word of 4 x 7 sign bits and a 4-bit scale s on top.

  y = (d * (0.5 + s) * 0.5) * grid * sign: 11 + 5 bits, times a power of two, times one of
  4, 12, 20, 28, 36, 44, 52, 62 (odd parts of at most 5 bits): at most 21 bits, exact; nonzero
  magnitudes from 2**-26 (the scale) to below 2**25.
  """
  nb = b.shape[0]
  d = f16_value(_u16(b[:, 0:2])[:, 0])
  w = _u32(b[:, 66:98])  # [nb, 8]
  d, db = materialize(z, (d, d[:, None] * (_HALF + _f(w >> 28)) * _HALF))  # [nb], [nb, 8]
  grid = _rows(IQ3XXS_GRID, b[:, 2:66]).reshape(nb, 8, 4, 8)  # group l: rows 2l and 2l+1
  signs = _parity_sign_bits((w[:, :, None] >> (7 * jnp.arange(4, dtype=jnp.uint32))) & 127)  # [nb, 8, 4, 8]
  return _signed(d, db[:, :, None, None] * grid, signs).reshape(nb, 256)


def iq3_s(b, z):
  """IQ3_S, 110 bytes: fp16 d; 64 low index bytes into the 512-row grid of 4 values; 8 bytes of
  ninth index bits (bit p of byte k for index p of 32-group k); 32 sign bytes; 4 scale bytes, one
  nibble per 32 values (low nibble first).

  y = (d * (1 + 2s)) * grid * sign: 11 + 5 bits times an odd value up to 15 (4 bits): at most 20
  bits, exact; nonzero magnitudes from 2**-24 to below 2**25.
  """
  nb = b.shape[0]
  d = f16_value(_u16(b[:, 0:2])[:, 0])
  lo = b[:, 2:66].astype(jnp.uint32).reshape(nb, 8, 8)
  qh = b[:, 66:74].astype(jnp.uint32)  # [nb, 8]
  hi = (qh[:, :, None] >> jnp.arange(8, dtype=jnp.uint32)) & 1  # [nb, 8, 8]
  s = _nibble_pairs(b[:, 106:110])  # [nb, 8]
  d, db = materialize(z, (d, d[:, None] * _f(1 + 2 * s)))  # C: float times the int (1 + 2s)
  grid = _rows(IQ3S_GRID, lo | (hi << 8)).reshape(nb, 8, 4, 8)
  signs = _sign_bits(b[:, 74:106]).reshape(nb, 8, 4, 8)
  return _signed(d, db[:, :, None, None] * grid, signs).reshape(nb, 256)


def _iq1_values(dl, grid, delta):
  """C's `dl * (grid[j] + delta)`: grid + delta is exact (-1, 0 or 1 plus +-1/8)."""
  return dl * (grid + delta)


def iq1_s(b, z):
  """IQ1_S, 50 bytes: fp16 d; 32 low index bytes into the 2048-row grid of -1, 0, 1; per 32 values
  a 16-bit word: four 3-bit high index parts, a 3-bit scale s, and the sign of delta on top.

  y = (d * (2s + 1)) * (grid + delta): 11 + 4 bits times 1/8, 7/8 or 9/8 (4 bits): at most 19
  bits, exact; nonzero magnitudes from 2**-27 to below 2**21.
  """
  nb = b.shape[0]
  d = f16_value(_u16(b[:, 0:2])[:, 0])
  qh = _u16(b[:, 34:50])  # [nb, 8]
  dl = d[:, None] * _f(2 * ((qh >> 12) & 7) + 1)  # C: float times the int (2s + 1)
  delta = jnp.where((qh & 0x8000) != 0, -IQ1S_DELTA, IQ1S_DELTA)  # [nb, 8]
  d, dl, delta = materialize(z, (d, dl, delta))
  lo = b[:, 2:34].astype(jnp.uint32).reshape(nb, 8, 4)
  hi = (qh[:, :, None] >> (3 * jnp.arange(4, dtype=jnp.uint32))) & 7  # [nb, 8, 4]
  grid = _rows(IQ1S_GRID, lo | (hi << 8))  # [nb, 8, 4, 8]
  return _scale_nan(d, _iq1_values(dl[:, :, None, None], grid, delta[:, :, None, None])).reshape(nb, 256)


def iq1_m(b, z):
  """IQ1_M, 56 bytes: 32 low index bytes; 16 bytes, one nibble per group of 8 (3 high index bits,
  the sign of delta on top); 4 words of four 3-bit scales (one per 16 values) whose top nibbles
  together are the fp16 d (word k's nibble is bits 4k..4k+3 of d).

  Same numbers as IQ1_S: exact.
  """
  nb = b.shape[0]
  sc = _u16(b[:, 48:56])  # [nb, 4]
  d = f16_value(
    (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
  )
  s = (sc[:, :, None] >> (3 * jnp.arange(4, dtype=jnp.uint32))) & 7  # [nb, 4, 4] -> half 4k + i
  d, dl = materialize(z, (d, d[:, None] * _f(2 * s.reshape(nb, 16) + 1)))  # [nb], [nb, 16]
  nib = _nibble_pairs(b[:, 32:48])  # [nb, 32]: group g's nibble
  delta = jnp.where((nib & 8) != 0, -IQ1S_DELTA, IQ1S_DELTA).reshape(nb, 16, 2)
  grid = _rows(IQ1S_GRID, b[:, 0:32].astype(jnp.uint32) | ((nib & 7) << 8)).reshape(nb, 16, 2, 8)
  return _scale_nan(d, _iq1_values(dl[:, :, None, None], grid, delta[..., None])).reshape(nb, 256)
