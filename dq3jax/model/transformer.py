"""The decoder stack: embeddings, MLA + (dense | MoE) layers, final norm and lm_head.

Params: {"embed": [V, d], "layers": [layer, ...], "norm": [d], "lm_head": [V, d]}, where a layer is
{"attn_norm": [d], "attn": mla params, "ffn_norm": [d], "mlp": swiglu params (dense) or moe params}.
The compute dtype is the dtype of params["embed"] (see runner.py for casting and the float64 scope).
`act_quant` (an act_quant.ActQuant, or None) rounds every weight's input as llama.cpp's CPU backend does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dq3jax.model import mla, moe, rope
from dq3jax.model.act_quant import ActQuant, apply, scope
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import linear, rms_norm, swiglu


@dataclasses.dataclass(frozen=True)
class Output:
  logits: jax.Array  # [B, T, V]
  cache: dict | None = None
  # Per layer: attn_latent (MLA's normalised latent c of these tokens) [B, T, r]; hidden_after_attn,
  # hidden_after_mlp [B, T, d]; MoE layers also topk_ids / topk_weights [B, T, K] (descending biased score).
  intermediates: list | None = None


jax.tree_util.register_dataclass(Output, data_fields=["logits", "cache", "intermediates"], meta_fields=[])


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
) -> Output:
  """Logits for tokens [B, T].

  Without a cache the tokens are positions 0..T-1. With a cache they continue it: they take positions
  length..length+T-1, attend to everything cached before them, and the returned cache includes them.
  All sequences of the batch share positions (no padding). length + T must not exceed the cache size:
  dynamic_update_slice would clamp the write offset instead of failing.
  """
  dtype = params["embed"].dtype
  t = tokens.shape[1]
  start = jnp.zeros((), jnp.int32) if cache is None else cache["length"].astype(jnp.int32)
  q_positions = start + jnp.arange(t, dtype=jnp.int32)
  cos, sin = rope.cos_sin(cfg.rope, cfg.qk_rope_head_dim, q_positions, dtype)  # [T, dr/2]
  h = params["embed"][tokens]  # [B, T, d]
  new_layers, records = [], []
  for i, lp in enumerate(params["layers"]):
    aq_attn, aq_mlp = scope(act_quant, "layers", str(i), "attn"), scope(act_quant, "layers", str(i), "mlp")
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    c, k_pe = mla.latent(lp["attn"], x, cfg, cos, sin, aq_attn)
    record = {"attn_latent": c}
    if cache is None:
      k_positions = q_positions
    else:
      lc = cache["layers"][i]
      at = (jnp.zeros((), start.dtype), start, jnp.zeros((), start.dtype))  # [B, S, *] write offset
      stored = {
        "c": jax.lax.dynamic_update_slice(lc["c"], c.astype(lc["c"].dtype), at),
        "k_pe": jax.lax.dynamic_update_slice(lc["k_pe"], k_pe.astype(lc["k_pe"].dtype), at),
      }
      new_layers.append(stored)
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
    )
    record["hidden_after_attn"] = h
    x = rms_norm(h, lp["ffn_norm"], cfg.rms_norm_eps)
    if cfg.is_moe_layer(i):
      y, ids, weights = moe.moe(lp["mlp"], x, cfg, aq_mlp)
      record.update(topk_ids=ids, topk_weights=weights)
    else:
      y = swiglu(lp["mlp"], x, aq_mlp)
    h = h + y
    record["hidden_after_mlp"] = h
    records.append(record)
  logits = linear(
    apply(act_quant, rms_norm(h, params["norm"], cfg.rms_norm_eps), "lm_head"), params["lm_head"]
  )
  new_cache = None if cache is None else {"layers": new_layers, "length": start + t}
  return Output(logits=logits, cache=new_cache, intermediates=records if intermediates else None)
