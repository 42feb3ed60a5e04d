"""Small building blocks shared by attention and the MLPs: matmul, RMSNorm, SwiGLU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dq3jax.model import act_quant
from dq3jax.model.act_quant import ActQuant

# Full-precision products everywhere: on CPU this is the default, on GPU/TPU it stops float32 matmuls from
# silently running in tf32/bf16 passes, which would break the oracle's tolerances.
einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def upcast_dtype(dtype) -> jnp.dtype:
  """The dtype transformers uses for norms, softmax, router and RoPE tables: float32, or float64 in x64 mode."""
  return jnp.promote_types(dtype, jnp.float32)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] with a stored torch-layout weight w [out, in] -> [..., out]."""
  return einsum("...i,oi->...o", x, w)


def _f32(v: jax.Array) -> jax.Array:
  """v rounded to the nearest float32, kept in v's dtype (float64 here)."""
  return v.astype(jnp.float32).astype(v.dtype)


def rms_norm_ggml(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm as ggml-cpu computes it (ggml_rms_norm, then ggml_mul by the weight), every float32 rounding
  reproduced, for x in float64: sum of float32 squares in double, mean and 1/sqrt(mean + eps) in float32, x times
  that scale rounded, then times the weight rounded. Rounding each exact float64 result once is float32
  arithmetic exactly (53 >= 2 * 24 + 2 for + - * / sqrt). The norm feeds the quantized matmuls, where one ulp
  moves an activation across a Q8 rounding boundary (or off an exact tie, as on a quantized token embedding),
  so llama.cpp's own rounding is emulated here rather than the exact value rounded once."""
  x = _f32(x)
  sq = _f32(x * x)  # [..., n] float32 products, summed in double
  mean = _f32(jnp.sum(sq, axis=-1, keepdims=True) / x.shape[-1])
  scale = _f32(1.0 / _f32(jnp.sqrt(_f32(mean + _f32(jnp.asarray(eps, x.dtype))))))
  return _f32(_f32(x * scale) * _f32(weight.astype(x.dtype)))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, ggml: bool = False) -> jax.Array:
  """RMSNorm; ggml=True (float64 only: the llama.cpp emulation) reproduces ggml-cpu's float32 steps."""
  if ggml and x.dtype == jnp.float64:
    return rms_norm_ggml(x, weight, eps)
  # As transformers: normalise in (at least) float32, cast back to the input dtype, then scale.
  xf = x.astype(upcast_dtype(x.dtype))
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * xf.astype(x.dtype)


def swiglu(p: dict, x: jax.Array, aq: ActQuant | None = None) -> jax.Array:
  """Dense SwiGLU MLP: down(silu(gate x) * up x); p has w_gate/w_up [I, d], w_down [d, I]. aq (scoped to p)
  rounds each weight's input as llama.cpp's CPU backend does (see act_quant.py)."""
  gate = linear(act_quant.apply(aq, x, "w_gate"), p["w_gate"])
  up = linear(act_quant.apply(aq, x, "w_up"), p["w_up"])
  return linear(act_quant.apply(aq, jax.nn.silu(gate) * up, "w_down"), p["w_down"])
