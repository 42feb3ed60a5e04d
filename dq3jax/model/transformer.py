"""The decoder stack: embeddings, MLA + (dense | MoE) layers, final norm and lm_head.

Params: {"embed": [V, d], "layers": [layer, ...], "norm": [d], "lm_head": [V, d]}, where a layer is
{"attn_norm": [d], "attn": mla params, "ffn_norm": [d], "mlp": swiglu params (dense) or moe params}.
The compute dtype is the dtype of params["embed"] (see runner.py for casting and the float64 scope).
`act_quant` (an act_quant.ActQuant, or None) rounds every weight's input as llama.cpp's CPU backend does;
`kv_cache="f16"` adds llama.cpp's F16 KV cache (mla.py); `route_override` forces expert choices (moe.py);
`undecided=True` counts the points a float64 evaluation cannot decide (undecided.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dq3jax.model import mla, moe, rope
from dq3jax.model import undecided as _undecided
from dq3jax.model.act_quant import ActQuant, apply, ggml_norm, scope
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import linear, rms_norm, swiglu


@dataclasses.dataclass(frozen=True)
class Output:
  logits: jax.Array  # [B, T, V]
  cache: dict | None = None
  # Per layer: attn_latent (MLA's normalised latent c of these tokens) [B, T, r]; hidden_after_attn,
  # hidden_after_mlp [B, T, d]; MoE layers also topk_ids / topk_weights [B, T, K] (descending biased score)
  # and router_scores [B, T, E] (the biased selection score top-k is taken over, before group masking).
  intermediates: list | None = None
  # With undecided=True: kind -> int32 [B, S] counts of undecided points per token position (module
  # undecided; S = the cache length, or T without a cache).
  undecided: dict | None = None


jax.tree_util.register_dataclass(
  Output, data_fields=["logits", "cache", "intermediates", "undecided"], meta_fields=[]
)


def init_cache(cfg: DeepseekV3Config, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """Empty latent KV cache for `max_len` positions: per layer c [B, S, r] and k_pe [B, S, dr]."""
  layers = [
    {
      "c": jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
      "k_pe": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype),
    }
    for _ in range(cfg.num_hidden_layers)
  ]
  return {"layers": layers, "length": jnp.zeros((), jnp.int32)}


def forward(
  params: dict,
  tokens: jax.Array,
  cfg: DeepseekV3Config,
  *,
  cache: dict | None = None,
  form: mla.AttnForm = mla.AttnForm.EXPANDED,
  intermediates: bool = False,
  act_quant: ActQuant | None = None,
  kv_cache: str = "f32",
  route_override: tuple | None = None,
  undecided: bool = False,
  experts: moe.ExpertCompute = moe.ExpertCompute.DENSE,
) -> Output:
  """Logits for tokens [B, T].

  Without a cache the tokens are positions 0..T-1. With a cache they continue it: they take positions
  length..length+T-1, attend to everything cached before them, and the returned cache includes them.
  All sequences of the batch share positions (no padding). length + T must not exceed the cache size:
  dynamic_update_slice would clamp the write offset instead of failing.

  kv_cache: "f32", or "f16" to emulate llama.cpp's F16 KV cache (mla.py). route_override: None, or per
  layer (a sequence of num_hidden_layers entries) None or int32 [B, T, K] forced expert ids for MoE layers
  (moe.routing; runner.logits validates them). undecided: count the undecided points of this pass
  (Output.undecided). experts: dense (every expert, the default) or sparse (the selected ones) routed experts.
  """
  b, t = tokens.shape
  start = jnp.zeros((), jnp.int32) if cache is None else cache["length"].astype(jnp.int32)
  q_positions = start + jnp.arange(t, dtype=jnp.int32)
  size = t if cache is None else cache["layers"][0]["c"].shape[1]
  tally = _undecided.Tally(b, q_positions, size) if undecided else None
  with _undecided.collecting(tally):
    h, rope_cs = embed(params, tokens, cfg, q_positions)
    new_layers, records = [], []
    for i, lp in enumerate(params["layers"]):
      with _undecided.layer(f"blk.{i}"):
        h, record, stored = decoder_layer(
          lp,
          h,
          cfg,
          moe_layer=cfg.is_moe_layer(i),
          rope_cs=rope_cs,
          q_positions=q_positions,
          start=start,
          cache_layer=None if cache is None else cache["layers"][i],
          form=form,
          aq=scope(act_quant, "layers", str(i)),
          kv_cache=kv_cache,
          override=None if route_override is None else route_override[i],
          experts=experts,
        )
      new_layers.append(stored)
      records.append(record)
    with _undecided.layer("output"):
      logits = head(params, h, cfg, act_quant)
  new_cache = None if cache is None else {"layers": new_layers, "length": start + t}
  return Output(
    logits=logits,
    cache=new_cache,
    intermediates=records if intermediates else None,
    undecided=tally.counts if undecided else None,
  )


def embed(params: dict, tokens: jax.Array, cfg: DeepseekV3Config, q_positions: jax.Array):
  """(h [B, T, d] token embeddings, (cos, sin) [T, dr/2] RoPE tables of the positions q_positions [T])."""
  dtype = params["embed"].dtype
  return params["embed"][tokens], rope.cos_sin(cfg.rope, cfg.qk_rope_head_dim, q_positions, dtype)


def head(params: dict, h: jax.Array, cfg: DeepseekV3Config, act_quant: ActQuant | None = None) -> jax.Array:
  """Logits [B, T, V] of the last hidden state h [B, T, d]: final RMSNorm and lm_head."""
  x = rms_norm(h, params["norm"], cfg.rms_norm_eps, ggml=ggml_norm(act_quant))
  return linear(apply(act_quant, x, "lm_head"), params["lm_head"])


def attention_block(
  lp: dict,
  h: jax.Array,
  cfg: DeepseekV3Config,
  *,
  rope_cs: tuple[jax.Array, jax.Array],
  q_positions: jax.Array,
  start: jax.Array,
  cache_layer: dict | None,
  form: mla.AttnForm,
  aq: ActQuant | None,
  kv_cache: str = "f32",
) -> tuple[jax.Array, dict, dict | None]:
  """The attention half of a decoder layer: h [B, T, d] -> (h + attention, {attn_latent, hidden_after_attn},
  updated cache entry or None). aq is scoped to the layer's params."""
  cos, sin = rope_cs
  dtype = h.dtype
  x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps, ggml=ggml_norm(aq))
  aq_attn = scope(aq, "attn")
  c, k_pe = mla.latent(lp["attn"], x, cfg, cos, sin, aq_attn)
  record = {"attn_latent": c}
  stored = None
  if cache_layer is None:
    k_positions = q_positions
  else:
    at = (jnp.zeros((), start.dtype), start, jnp.zeros((), start.dtype))  # [B, S, *] write offset
    stored = {
      "c": jax.lax.dynamic_update_slice(cache_layer["c"], c.astype(cache_layer["c"].dtype), at),
      "k_pe": jax.lax.dynamic_update_slice(cache_layer["k_pe"], k_pe.astype(cache_layer["k_pe"].dtype), at),
    }
    c, k_pe = stored["c"].astype(dtype), stored["k_pe"].astype(dtype)
    k_positions = jnp.arange(c.shape[1], dtype=jnp.int32)
  h = h + mla.attention(
    lp["attn"],
    x,
    cfg,
    cos=cos,
    sin=sin,
    q_positions=q_positions,
    c=c,
    k_pe=k_pe,
    k_positions=k_positions,
    form=form,
    aq=aq_attn,
    kv_cache=kv_cache,
  )
  record["hidden_after_attn"] = h
  return h, record, stored


def ffn_block(
  lp: dict,
  h: jax.Array,
  cfg: DeepseekV3Config,
  *,
  moe_layer: bool,
  aq: ActQuant | None,
  override: jax.Array | None = None,
  experts: moe.ExpertCompute = moe.ExpertCompute.DENSE,
) -> tuple[jax.Array, dict]:
  """The feed-forward half of a decoder layer: h [B, T, d] -> (h + MLP or MoE, its record: hidden_after_mlp
  and, for MoE layers, topk_ids, topk_weights, router_scores). override [B, T, K] or None (MoE layers)."""
  x = rms_norm(h, lp["ffn_norm"], cfg.rms_norm_eps, ggml=ggml_norm(aq))
  aq_mlp = scope(aq, "mlp")
  record = {}
  if moe_layer:
    y, r = moe.moe_layer(lp["mlp"], x, cfg, aq_mlp, override, experts)
    lead = x.shape[:-1]
    record.update(
      topk_ids=r.ids.reshape(*lead, -1),
      topk_weights=r.weights.reshape(*lead, -1),
      router_scores=r.choice.reshape(*lead, -1),
    )
    if _undecided.active() is not None:
      for kind, flags in moe.undecided_choices(r, cfg).items():
        _undecided.record(kind, flags)
  else:
    y = swiglu(lp["mlp"], x, aq_mlp)
  h = h + y
  record["hidden_after_mlp"] = h
  return h, record


def decoder_layer(
  lp: dict,
  h: jax.Array,
  cfg: DeepseekV3Config,
  *,
  moe_layer: bool,
  rope_cs: tuple[jax.Array, jax.Array],
  q_positions: jax.Array,
  start: jax.Array,
  cache_layer: dict | None,
  form: mla.AttnForm,
  aq: ActQuant | None,
  kv_cache: str = "f32",
  override: jax.Array | None = None,
  experts: moe.ExpertCompute = moe.ExpertCompute.DENSE,
) -> tuple[jax.Array, dict, dict | None]:
  """One decoder layer on h [B, T, d] -> (h, its intermediates record, its updated cache entry or None):
  attention_block then ffn_block. aq is scoped to the layer's params; override [B, T, K] or None."""
  h, record, stored = attention_block(
    lp, h, cfg, rope_cs=rope_cs, q_positions=q_positions, start=start, cache_layer=cache_layer, form=form,
    aq=aq, kv_cache=kv_cache,
  )  # fmt: skip
  h, ffn_record = ffn_block(lp, h, cfg, moe_layer=moe_layer, aq=aq, override=override, experts=experts)
  return h, record | ffn_record, stored
