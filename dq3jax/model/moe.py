"""DeepSeek-V3 mixture of experts: noaux_tc routing, routed experts, shared experts.

Params: router [E, d], router_bias [E] (e_score_correction_bias), experts {w_gate, w_up: [E, I, d],
w_down: [E, d, I]}, optional shared {w_gate, w_up: [Is, d], w_down: [d, Is]}.

`aq` (act_quant.ActQuant scoped to these params, or None) rounds each weight's input as llama.cpp's CPU
backend does: the token once per expert tensor (mul_mat_id converts each input row once), each expert's
SwiGLU output before its w_down; the router's input only if the router is not F32 (it is in every recipe).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dq3jax.model import undecided
from dq3jax.model.act_quant import ActQuant, apply, scope
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import einsum, linear, swiglu, upcast_dtype


class ExpertCompute(enum.Enum):
  """How the routed experts are evaluated; both give the same experts' outputs and differ only in the order
  the K selected contributions are summed (float rounding)."""

  # Every expert on every token, unselected ones weighted by +0.0: gather-free and shardable over experts
  # (model/sharding.py); E/K times the work of the sparse form.
  DENSE = "dense"
  # Only the K selected experts per token: token slots sorted by expert and multiplied per expert group
  # (lax.ragged_dot), the work and activations of K experts instead of E.
  SPARSE = "sparse"


class Routing(NamedTuple):
  ids: jax.Array  # [N, K] int32, descending biased score
  weights: jax.Array  # [N, K]: unbiased scores of ids, normalised if norm_topk_prob, times the scaling factor
  choice: jax.Array  # [N, E]: the biased selection score sigmoid(router x) + bias, before group masking
  masked: jax.Array  # [N, E]: choice with the experts of unselected groups at -inf (what top-k runs over)
  group_score: jax.Array | None  # [N, G]: sum of each group's two best choices (None without groups)
  forced: jax.Array  # [N] bool: the row's ids came from an override


def routing(
  p: dict, x: jax.Array, cfg: DeepseekV3Config, aq: ActQuant | None = None, override: jax.Array | None = None
) -> Routing:
  """noaux_tc routing of tokens x [N, d] (see `route`); override [N, K] int32 or None: rows whose entries
  are >= 0 take those expert ids instead of the model's choice (rows of -1 keep it; runner.logits checks
  that a row is all -1 or K distinct valid ids). Forced ids are put in descending biased score (lower id
  first on ties, as top-k orders its own) and weighted exactly as selected ids are, so forcing the model's
  own choice changes nothing, bit for bit."""
  f = upcast_dtype(x.dtype)
  scores = jax.nn.sigmoid(linear(apply(aq, x.astype(f), "router"), p["router"].astype(f)))  # [N, E]
  choice = scores + p["router_bias"].astype(f) if cfg.use_router_bias else scores
  masked, group_score = choice, None
  if cfg.n_group > 1:
    n = choice.shape[0]
    grouped = choice.reshape(n, cfg.n_group, cfg.experts_per_group)
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]: sum of each group's two best
    kept = jax.lax.top_k(group_score, cfg.topk_group)[1]  # [N, topk_group]
    keep = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], kept].set(True)
    masked = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, -1)
  ids = jax.lax.top_k(masked, cfg.num_experts_per_tok)[1].astype(jnp.int32)  # [N, K]
  forced = jnp.zeros(ids.shape[:1], bool)
  if override is not None:
    forced = override[:, 0] >= 0  # [N]
    want = jnp.where(override >= 0, override, 0).astype(jnp.int32)
    # Sort by (descending biased score, ascending id): top-k's own order.
    order = jnp.lexsort((want, -jnp.take_along_axis(choice, want, axis=-1)), axis=-1)
    ids = jnp.where(forced[:, None], jnp.take_along_axis(want, order, axis=-1), ids)
  weights = jnp.take_along_axis(scores, ids, axis=-1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)  # transformers' epsilon
  return Routing(ids, weights * cfg.routed_scaling_factor, choice, masked, group_score, forced)


def undecided_choices(r: Routing, cfg: DeepseekV3Config) -> dict[str, jax.Array]:
  """Per token [N] bool, the decisions a reordered float64 evaluation could take differently (module
  undecided): "router.topk" (the K-th best masked score against the next), "router.group" (the
  topk_group-th group score against the next) and "router.order" (two selected experts' order, which only
  the recorded topk_ids/topk_weights show). Forced rows decide nothing."""
  k = cfg.num_experts_per_tok
  top = jax.lax.top_k(r.masked, min(k + 1, r.masked.shape[-1]))[0]  # [N, K+1] descending
  out = {"router.order": undecided.gap_undecided(top[:, : k - 1], top[:, 1:k]).any(-1)}
  out["router.topk"] = (
    undecided.gap_undecided(top[:, k - 1], top[:, k]) if top.shape[-1] > k else jnp.zeros(top.shape[:1], bool)
  )
  if r.group_score is not None and cfg.topk_group < cfg.n_group:
    g = jax.lax.top_k(r.group_score, cfg.topk_group + 1)[0]
    out["router.group"] = undecided.gap_undecided(g[:, -2], g[:, -1])
  return {name: flags & ~r.forced for name, flags in out.items()}


def route(
  p: dict, x: jax.Array, cfg: DeepseekV3Config, aq: ActQuant | None = None, override: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """noaux_tc routing of tokens x [N, d] -> (expert ids [N, K] int32, weights [N, K]).

  Runs in float32 (float64 in x64 mode) whatever the model dtype, as transformers does. The bias only
  steers selection; weights come from the unbiased sigmoid scores. Ids are in descending biased score.
  override: see `routing`.
  """
  r = routing(p, x, cfg, aq, override)
  return r.ids, r.weights


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


def routed_experts_sparse(
  p: dict, x: jax.Array, ids: jax.Array, weights: jax.Array, aq: ActQuant | None = None
) -> jax.Array:
  """sum_k weights[:, k] * expert_{ids[:, k]}(x) for x [N, d], computing only the selected experts.

  The N*K (token, slot) pairs are sorted by expert id, so each expert multiplies one contiguous run of rows
  (a ragged matmul over expert groups); the outputs are put back in slot order and summed over k in order.
  Activation rounding (aq) is per row, so rounding the tokens before the gather is rounding each copy.
  """
  n, k = ids.shape
  n_exp = p["w_gate"].shape[0]
  flat = ids.reshape(-1)  # [N*K]
  order = jnp.argsort(flat, stable=True)  # [N*K]: slots grouped by expert, token order within an expert
  token = order // k  # [N*K]: the token each sorted slot belongs to
  sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)  # [E] rows per expert group
  # Contract the rows' `in` with the stored weight's last axis: w stays in its torch layout [E, out, in]
  # (no transposed copy of every expert's weights per call).
  dims = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
  )

  def per_expert(rows, w):  # rows [N*K, in] sorted; w [E, out, in] -> [N*K, out]
    return jax.lax.ragged_dot_general(rows, w, sizes, dims, precision=jax.lax.Precision.HIGHEST)

  gate = per_expert(apply(aq, x, "w_gate")[token], p["w_gate"])  # [N*K, I]
  up = per_expert(apply(aq, x, "w_up")[token], p["w_up"])
  out = per_expert(apply(aq, jax.nn.silu(gate) * up, "w_down"), p["w_down"])  # [N*K, d]
  by_slot = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)  # [N, K, d]
  return einsum("nk,nkd->nd", weights.astype(x.dtype), by_slot)


def moe(
  p: dict, x: jax.Array, cfg: DeepseekV3Config, aq: ActQuant | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [B, T, d] -> (y [B, T, d], ids [B, T, K], weights [B, T, K])."""
  y, r = moe_layer(p, x, cfg, aq)
  k = cfg.num_experts_per_tok
  return y, r.ids.reshape(*x.shape[:-1], k), r.weights.reshape(*x.shape[:-1], k)


def moe_layer(
  p: dict,
  x: jax.Array,
  cfg: DeepseekV3Config,
  aq: ActQuant | None = None,
  override: jax.Array | None = None,
  experts: ExpertCompute = ExpertCompute.DENSE,
) -> tuple[jax.Array, Routing]:
  """x [B, T, d] -> (y [B, T, d], the Routing of its B * T tokens, flattened). override: [B, T, K] or None
  (see `routing`); experts: how the routed experts are evaluated."""
  flat = x.reshape(-1, x.shape[-1])
  if override is not None:
    override = override.reshape(flat.shape[0], -1)
  r = routing(p, flat, cfg, aq, override)
  run = routed_experts_sparse if experts is ExpertCompute.SPARSE else routed_experts
  y = run(p["experts"], flat, r.ids, r.weights, scope(aq, "experts"))
  if "shared" in p:
    y = y + swiglu(p["shared"], flat, scope(aq, "shared"))
  return y.reshape(x.shape), r
