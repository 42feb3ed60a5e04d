"""DeepSeek-V3 mixture of experts: noaux_tc routing, routed experts, shared experts.

Params: router [E, d], router_bias [E] (e_score_correction_bias), experts {w_gate, w_up: [E, I, d],
w_down: [E, d, I]}, optional shared {w_gate, w_up: [Is, d], w_down: [d, Is]}.

`aq` (act_quant.ActQuant scoped to these params, or None) rounds each weight's input as llama.cpp's CPU
backend does: the token once per expert tensor (mul_mat_id converts each input row once), each expert's
SwiGLU output before its w_down; the router's input only if the router is not F32 (it is in every recipe).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dq3jax.model.act_quant import ActQuant, apply, scope
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import einsum, linear, swiglu, upcast_dtype


def route(
  p: dict, x: jax.Array, cfg: DeepseekV3Config, aq: ActQuant | None = None
) -> tuple[jax.Array, jax.Array]:
  """noaux_tc routing of tokens x [N, d] -> (expert ids [N, K] int32, weights [N, K]).

  Runs in float32 (float64 in x64 mode) whatever the model dtype, as transformers does. The bias only
  steers selection; weights come from the unbiased sigmoid scores. Ids are in descending biased score.
  """
  f = upcast_dtype(x.dtype)
  scores = jax.nn.sigmoid(linear(apply(aq, x.astype(f), "router"), p["router"].astype(f)))  # [N, E]
  choice = scores + p["router_bias"].astype(f) if cfg.use_router_bias else scores
  if cfg.n_group > 1:
    n = choice.shape[0]
    grouped = choice.reshape(n, cfg.n_group, cfg.experts_per_group)
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]: sum of each group's two best
    kept = jax.lax.top_k(group_score, cfg.topk_group)[1]  # [N, topk_group]
    keep = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], kept].set(True)
    choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, -1)
  ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1]  # [N, K]
  weights = jnp.take_along_axis(scores, ids, axis=-1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)  # transformers' epsilon
  return ids.astype(jnp.int32), weights * cfg.routed_scaling_factor


def routed_experts(
  p: dict, x: jax.Array, ids: jax.Array, weights: jax.Array, aq: ActQuant | None = None
) -> jax.Array:
  """sum_k weights[:, k] * expert_{ids[:, k]}(x) for x [N, d].

  Every expert runs on every token and unselected ones get weight 0 (exactly +0.0 added): simple,
  gather-free, and shardable over the expert axis. Cost is E/K times the sparse computation, fine for
  the tiny and truncated models an oracle runs.
  """
  n_exp = p["w_gate"].shape[0]
  combine = (
    jnp.zeros((x.shape[0], n_exp), weights.dtype).at[jnp.arange(x.shape[0])[:, None], ids].add(weights)
  )
  gate = einsum("nd,eid->nei", apply(aq, x, "w_gate"), p["w_gate"])
  up = einsum("nd,eid->nei", apply(aq, x, "w_up"), p["w_up"])
  out = einsum("nei,edi->ned", apply(aq, jax.nn.silu(gate) * up, "w_down"), p["w_down"])  # [N, E, d]
  return einsum("ne,ned->nd", combine.astype(x.dtype), out)


def moe(
  p: dict, x: jax.Array, cfg: DeepseekV3Config, aq: ActQuant | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [B, T, d] -> (y [B, T, d], ids [B, T, K], weights [B, T, K])."""
  flat = x.reshape(-1, x.shape[-1])
  ids, weights = route(p, flat, cfg, aq)
  y = routed_experts(p["experts"], flat, ids, weights, scope(aq, "experts"))
  if "shared" in p:
    y = y + swiglu(p["shared"], flat, scope(aq, "shared"))
  k = cfg.num_experts_per_tok
  return y.reshape(x.shape), ids.reshape(*x.shape[:-1], k), weights.reshape(*x.shape[:-1], k)
