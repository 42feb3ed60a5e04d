"""F32, F16 and BF16 'quantization' (ggml_quantize_chunk's converters), by integer bit operations.

Integer arithmetic is the same on every backend and immune to flush-to-zero, so these are exact
everywhere. Kernels map `x [n, nb]` to `[bytes, nb]` uint8 like the block kernels (block = 1).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from dq3jax.quant._arith import f32_bits_to_f16_bits


def _bits(x):
  return lax.bitcast_convert_type(x, jnp.uint32)


def _le_bytes(v, nbytes):
  return jnp.concatenate([((v >> (8 * k)) & 0xFF).astype(jnp.uint8) for k in range(nbytes)], axis=0)


def f32(x):
  return _le_bytes(_bits(x), 4)


def f16(x):
  return _le_bytes(f32_bits_to_f16_bits(_bits(x)).astype(jnp.uint32), 2)


def bf16(x):
  """ggml's reference converter: round to nearest even on the bit pattern; NaN forced quiet."""
  u = _bits(x)
  rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
  nan = (u >> 16) | 64
  return _le_bytes(jnp.where((u & 0x7FFFFFFF) > 0x7F800000, nan, rounded), 2)
