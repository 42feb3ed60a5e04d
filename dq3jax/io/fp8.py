"""FP8 e4m3 weights with 128x128 block scales, as in DeepSeek-V3's Hugging Face checkpoint.

`weight_scale_inv[i, j]` multiplies (despite its name) the block rows 128i.., columns 128j..; edge blocks
are partial and use their block's scale.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 128
E4M3_MAX = 448.0


def _expand(scale: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
  return np.repeat(np.repeat(scale, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def dequantize(
  q: np.ndarray, scale_inv: np.ndarray, *, block: int = BLOCK, round_bf16: bool = False
) -> np.ndarray:
  """float32 weights from e4m3 q [M, N] and scale_inv [ceil(M/b), ceil(N/b)]; the product is exact in float32.

  round_bf16=True rounds the product to bfloat16 first, as DeepSeek's `weight_dequant` does.
  """
  m, n = q.shape
  want = (-(-m // block), -(-n // block))
  if tuple(scale_inv.shape) != want:
    raise ValueError(
      f"weight_scale_inv shape {list(scale_inv.shape)} does not match weight {[m, n]} (want {list(want)})"
    )
  w = q.astype(np.float32)
  scale_inv = scale_inv.astype(np.float32)
  # One row-block at a time, in place: the only temporary is one row of column scales, not an [M, N] copy.
  for i in range(want[0]):
    w[i * block : (i + 1) * block] *= np.repeat(scale_inv[i], block)[:n]
  if round_bf16:
    w = w.astype(ml_dtypes.bfloat16).astype(np.float32)
  return w


def quantize(w: np.ndarray, *, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """(q e4m3 [M, N], scale_inv float32 blocks): scale_inv = amax(|block|)/448, q = round-to-nearest(w/scale)."""
  m, n = w.shape
  w = w.astype(np.float32)
  pad = np.zeros((-(-m // block) * block, -(-n // block) * block), np.float32)
  pad[:m, :n] = np.abs(w)
  amax = pad.reshape(pad.shape[0] // block, block, pad.shape[1] // block, block).max(axis=(1, 3))
  scale_inv = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
  q = (w / _expand(scale_inv, (m, n), block)).astype(ml_dtypes.float8_e4m3fn)
  return q, scale_inv
