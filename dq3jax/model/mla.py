"""Multi-head latent attention (MLA) in expanded and absorbed form, with an optional latent KV cache.

Params (torch layout [out, in]): q_lora: wq_a [q_rank, d], q_norm [q_rank], wq_b [H*(dn+dr), q_rank];
no q_lora: wq [H*(dn+dr), d]; always wkv_a [r+dr, d], kv_norm [r], wkv_b [H*(dn+dv), r], wo [d, H*dv].

The cache holds only what MLA needs per token: the normalised latent c [B, S, r] and the rotated shared key
k_pe [B, S, dr]. Both forms read the same cache, so prefill and decode may use either form.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from dq3jax.model import rope
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import einsum, linear, rms_norm, upcast_dtype


class AttnForm(enum.Enum):
  # Keys/values per head from kv_b (transformers' computation).
  EXPANDED = "expanded"
  # kv_b folded into the query and the output; attention runs over the latent (DeepSeek "absorb", llama.cpp MLA).
  ABSORBED = "absorbed"


def _queries(p: dict, x: jax.Array, cfg: DeepseekV3Config) -> jax.Array:
  if cfg.q_lora_rank is None:
    q = linear(x, p["wq"])
  else:
    q = linear(rms_norm(linear(x, p["wq_a"]), p["q_norm"], cfg.latent_norm_eps), p["wq_b"])
  return q.reshape(*x.shape[:-1], cfg.num_attention_heads, cfg.qk_head_dim)  # [B, T, H, dn+dr]


def latent(p: dict, x: jax.Array, cfg: DeepseekV3Config, cos: jax.Array, sin: jax.Array):
  """The per-token cache entries: normalised latent c [B, T, r] and rotated shared key k_pe [B, T, dr]."""
  kv = linear(x, p["wkv_a"])  # [B, T, r+dr]
  c = rms_norm(kv[..., : cfg.kv_lora_rank], p["kv_norm"], cfg.latent_norm_eps)
  k_pe = rope.apply(kv[..., cfg.kv_lora_rank :], cos, sin, interleave=cfg.rope_interleave)
  return c, k_pe


def _softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
  s = jnp.where(mask, scores.astype(upcast_dtype(dtype)), -jnp.inf)
  return jax.nn.softmax(s, axis=-1).astype(dtype)


def attention(
  p: dict,
  x: jax.Array,
  cfg: DeepseekV3Config,
  *,
  cos: jax.Array,
  sin: jax.Array,
  q_positions: jax.Array,
  c: jax.Array,
  k_pe: jax.Array,
  k_positions: jax.Array,
  form: AttnForm = AttnForm.EXPANDED,
) -> jax.Array:
  """MLA output [B, T, d] for queries x [B, T, d] over keys given as latents c [B, S, r], k_pe [B, S, dr].

  A key at position s is visible to a query at position t iff s <= t (causal; cache slots not yet written
  sit at positions beyond every query).
  """
  h, dn, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  q = _queries(p, x, cfg)
  q_nope = q[..., :dn]  # [B, T, H, dn]
  q_pe = rope.apply(q[..., dn:], cos[..., None, :], sin[..., None, :], interleave=cfg.rope_interleave)
  wkv_b = p["wkv_b"].reshape(h, dn + dv, r)
  w_k, w_v = wkv_b[:, :dn], wkv_b[:, dn:]  # [H, dn, r], [H, dv, r]
  mask = (k_positions[None, :] <= q_positions[:, None])[None, None]  # [1, 1, T, S]
  dtype = x.dtype

  if form is AttnForm.EXPANDED:
    k_nope = einsum("bsr,hkr->bshk", c, w_k)  # [B, S, H, dn]
    v = einsum("bsr,hvr->bshv", c, w_v)  # [B, S, H, dv]
    k = jnp.concatenate(
      [k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:3], k_pe.shape[-1]))], -1
    )
    q_full = jnp.concatenate([q_nope, q_pe], axis=-1)
    scores = einsum("bthk,bshk->bhts", q_full, k) * cfg.softmax_scale
    probs = _softmax(scores, mask, dtype)  # [B, H, T, S]
    o = einsum("bhts,bshv->bthv", probs, v)
  else:
    q_lat = einsum("bthk,hkr->bthr", q_nope, w_k)  # [B, T, H, r]
    scores = (einsum("bthr,bsr->bhts", q_lat, c) + einsum("bthe,bse->bhts", q_pe, k_pe)) * cfg.softmax_scale
    probs = _softmax(scores, mask, dtype)
    o_lat = einsum("bhts,bsr->bthr", probs, c)  # [B, T, H, r]
    o = einsum("bthr,hvr->bthv", o_lat, w_v)
  return linear(o.reshape(*o.shape[:2], h * dv), p["wo"])
