"""F32 and BF16 kernels in numpy, on the host: pure bit conversions (ggml_quantize_chunk's converters and
`to_float`).

They are integer bit operations on the float32 pattern (no arithmetic a backend could round or flush
differently), so the host computes exactly what ggml does, in one pass over memory instead of a padded device
round trip per chunk. The registry (dq3jax.qtypes) names them with `on_host=True`: quantizers map float32 rows
`[rows, n]` to their bytes, dequantizers raw bytes to float32 of any shape.
"""

from __future__ import annotations

import numpy as np


def quantize_f32(x: np.ndarray) -> np.ndarray:
  # A copy: the result must not alias the caller's array.
  return np.array(x, "<f4", copy=True).view(np.uint8)


def bf16_bits(u, where=np.where):
  """ggml's float32 -> bfloat16 on uint32 bit patterns `u`: round to nearest even on the bit pattern, NaN forced
  quiet; the 16-bit result in the low half. Integer operators only, so the same code serves numpy arrays and
  (with `where=jnp.where`) jax arrays, as the activation emulation uses it."""
  rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16  # no wrap: the largest non-NaN pattern is 0xFF800000
  return where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 64, rounded)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
  """ggml's reference float32 -> bfloat16 (bf16_bits)."""
  u = np.ascontiguousarray(x, np.float32).view(np.uint32)
  return bf16_bits(u).astype("<u2").view(np.uint8)


def dequantize_f32(raw: np.ndarray) -> np.ndarray:
  return raw.view("<f4").astype(np.float32)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
  # bfloat16 is the high half of a float32 (ggml_bf16_to_fp32: bits << 16).
  return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
