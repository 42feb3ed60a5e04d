"""Rotary position embedding with optional YaRN frequency scaling, as transformers 5.23 computes it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dq3jax.model.config import RopeConfig, RopeKind
from dq3jax.model.layers import upcast_dtype


def inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
  """Per-pair inverse frequencies [dim/2] in float64 (transformers computes the same formula in float32)."""
  base = rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  extrapolation = 1.0 / base
  if rope.kind is RopeKind.DEFAULT:
    return extrapolation
  interpolation = 1.0 / (rope.factor * base)

  def correction_dim(n_rotations: float) -> float:
    return (
      dim
      * math.log(rope.original_max_position_embeddings / (n_rotations * 2 * math.pi))
      / (2 * math.log(rope.theta))
    )

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # avoids a zero-width ramp, as transformers does
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  # Pairs below `low` keep their frequency (extrapolate), above `high` are divided by `factor`.
  keep = 1.0 - ramp
  return interpolation * (1.0 - keep) + extrapolation * keep


def cos_sin(rope: RopeConfig, dim: int, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin [..., dim/2] for integer positions [...], computed in float32 (float64 in x64 mode), cast to dtype."""
  table_dtype = upcast_dtype(dtype)
  angles = positions.astype(table_dtype)[..., None] * jnp.asarray(inv_freq(rope, dim), table_dtype)
  scale = rope.cos_sin_factor
  return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleave: bool) -> jax.Array:
  """Rotate x [..., T, dim] (cos/sin [..., T, dim/2], broadcast over any axes between).

  interleave=True pairs consecutive elements (x0, x1), (x2, x3), ... of the stored weights (DeepSeek);
  False pairs x[i] with x[i + dim/2]. Like transformers, the result is written as [first members | second
  members]; q and k get the same layout, so attention scores do not depend on it.
  """
  if interleave:
    a, b = x[..., 0::2], x[..., 1::2]
  else:
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
