"""F16 'quantization' (ggml_quantize_chunk's converter) on the device, by integer bit operations.

Integer arithmetic is the same on every backend and immune to flush-to-zero, so this is exact
everywhere. The kernel maps `x [n, nb]` to `[bytes, nb]` uint8 like the block kernels (block = 1).
F32 and BF16 need no rounding arithmetic at all and are converted on the host (host.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from dq3jax.quant._arith import f32_bits_to_f16_bits


def _bits(x):
  return lax.bitcast_convert_type(x, jnp.uint32)


def _le_bytes(v, nbytes):
  return jnp.concatenate([((v >> (8 * k)) & 0xFF).astype(jnp.uint8) for k in range(nbytes)], axis=0)


def f16(x):
  return _le_bytes(f32_bits_to_f16_bits(_bits(x)).astype(jnp.uint32), 2)
