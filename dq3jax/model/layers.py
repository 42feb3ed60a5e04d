"""Small building blocks shared by attention and the MLPs: matmul, RMSNorm, SwiGLU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Full-precision products everywhere: on CPU this is the default, on GPU/TPU it stops float32 matmuls from
# silently running in tf32/bf16 passes, which would break the oracle's tolerances.
einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def upcast_dtype(dtype) -> jnp.dtype:
  """The dtype transformers uses for norms, softmax, router and RoPE tables: float32, or float64 in x64 mode."""
  return jnp.promote_types(dtype, jnp.float32)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] with a stored torch-layout weight w [out, in] -> [..., out]."""
  return einsum("...i,oi->...o", x, w)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  # As transformers: normalise in (at least) float32, cast back to the input dtype, then scale.
  xf = x.astype(upcast_dtype(x.dtype))
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * xf.astype(x.dtype)


def swiglu(p: dict, x: jax.Array) -> jax.Array:
  """Dense SwiGLU MLP: down(silu(gate x) * up x); p has w_gate/w_up [I, d], w_down [d, I]."""
  return linear(jax.nn.silu(linear(x, p["w_gate"])) * linear(x, p["w_up"]), p["w_down"])
