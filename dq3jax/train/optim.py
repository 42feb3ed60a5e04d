"""AdamW with global-norm clipping and a warm-up + cosine schedule, in plain JAX (a few lines; no optax).

`trainable(path)` decides which leaves the optimizer moves; the others (the router selection bias, which
DeepSeek-V3 updates by its load rule instead of by gradient) keep their value and get no moment state.
Decoupled weight decay applies to matrices only (ndim >= 2), not to norm weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dq3jax.train.spec import TrainSpec


def is_router_bias(path) -> bool:
  return getattr(path[-1], "key", None) == "router_bias"


def learning_rate(spec: TrainSpec, step: jax.Array) -> jax.Array:
  """Linear warm-up over spec.warmup steps to spec.lr, then cosine to spec.lr * spec.final_lr_frac."""
  step = jnp.asarray(step, jnp.float32)
  warm = jnp.minimum(1.0, (step + 1.0) / max(spec.warmup, 1))
  t = jnp.clip((step - spec.warmup) / max(spec.steps - spec.warmup, 1), 0.0, 1.0)
  cosine = spec.final_lr_frac + (1 - spec.final_lr_frac) * 0.5 * (1 + jnp.cos(math.pi * t))
  return spec.lr * jnp.where(step < spec.warmup, warm, cosine)


def init(params: dict) -> dict:
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  return {"m": zeros, "v": jax.tree_util.tree_map(jnp.zeros_like, params)}


def update(spec: TrainSpec, params: dict, grads: dict, state: dict, step: jax.Array):
  """(new params, new state, stats) after one AdamW step at 0-based `step`."""
  grads = jax.tree_util.tree_map_with_path(lambda p, g: jnp.zeros_like(g) if is_router_bias(p) else g, grads)
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
  scale = jnp.minimum(1.0, spec.grad_clip / (norm + 1e-12))
  lr = learning_rate(spec, step)
  t = jnp.asarray(step, jnp.float32) + 1.0
  c1, c2 = 1 - spec.beta1**t, 1 - spec.beta2**t

  def one(path, p, g, m, v):
    if is_router_bias(path):
      return p, m, v
    g = g * scale
    m = spec.beta1 * m + (1 - spec.beta1) * g
    v = spec.beta2 * v + (1 - spec.beta2) * g * g
    delta = (m / c1) / (jnp.sqrt(v / c2) + spec.adam_eps)
    if p.ndim >= 2:
      delta = delta + spec.weight_decay * p
    return p - lr * delta, m, v

  out = jax.tree_util.tree_map_with_path(one, params, grads, state["m"], state["v"])
  is_triple = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
  pick = lambda k: jax.tree_util.tree_map(lambda x: x[k], out, is_leaf=is_triple)  # noqa: E731
  return pick(0), {"m": pick(1), "v": pick(2)}, {"grad_norm": norm, "lr": lr}
