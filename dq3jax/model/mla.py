"""Multi-head latent attention (MLA) in expanded and absorbed form, with an optional latent KV cache.

Params (torch layout [out, in]): q_lora: wq_a [q_rank, d], q_norm [q_rank], wq_b [H*(dn+dr), q_rank];
no q_lora: wq [H*(dn+dr), d]; always wkv_a [r+dr, d], kv_norm [r], wkv_b [H*(dn+dv), r], wo [d, H*dv].

The cache holds only what MLA needs per token: the normalised latent c [B, S, r] and the rotated shared key
k_pe [B, S, dr]. Both forms read the same cache, so prefill and decode may use either form.

`aq` (act_quant.ActQuant scoped to these params, or None) rounds each weight's input as llama.cpp's CPU
backend does. llama.cpp runs the split layout absorbed: q_nope [T, H, dn] meets attn_k_b per head and the
latent attention output [T, H, r] meets attn_v_b per head; the kv_b layout expanded: the latent c meets wkv_b.
The attention products themselves (scores, probs x values) run on the F32 cache in float32 there too.

`kv_cache="f16"` emulates llama.cpp's default F16 KV cache (type_k = type_v = F16, no flash attention,
llama-graph.cpp build_attn_mha): the cache stores fp16 values, and ggml's CPU mul_mat converts the F32
activation meeting an F16 src0 to fp16 (vec_dot_type of F16), so the query meeting K and the softmax
probabilities meeting V are fp16 too. Absorbed (llama.cpp's MLA graph for split-layout files): the cache row
is [c | k_pe] (K) and V is a view of its c part; the query row is [q_nope absorbed by k_b | q_pe]. Expanded
(kv_b-layout files): the cache holds each head's keys [k_nope | k_pe] and values, the query [q_nope | q_pe].
The current tokens are rounded as well, because llama.cpp writes them into the cache first and attends over
the cache view. The products then sum exact fp16 x fp16 products (in float32 there; here in the compute
dtype).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from dq3jax.model import rope
from dq3jax.model.act_quant import ActQuant, apply, ggml_norm, rounded
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import einsum, linear, rms_norm, upcast_dtype

KV_CACHES = ("f32", "f16")


def _kv(x: jax.Array, kv_cache, kind: str, positions: jax.Array | None = None) -> jax.Array:
  """x as it meets the other operand of an attention product under the cache type (F32: itself);
  positions: those of x's token axis when x holds cache rows [B, S, ...] rather than the queries."""
  if isinstance(kv_cache, str):
    return x if kv_cache == "f32" else rounded(x, "F16", kind, positions)
  return rounded(x, "F16", kind, positions, gate=kv_cache)  # traced: F16 where true


class AttnForm(enum.Enum):
  # Keys/values per head from kv_b (transformers' computation).
  EXPANDED = "expanded"
  # kv_b folded into the query and the output; attention runs over the latent (DeepSeek "absorb", llama.cpp MLA).
  ABSORBED = "absorbed"


def _queries(p: dict, x: jax.Array, cfg: DeepseekV3Config, aq: ActQuant | None) -> jax.Array:
  if cfg.q_lora_rank is None:
    q = linear(apply(aq, x, "wq"), p["wq"])
  else:
    q_a = linear(apply(aq, x, "wq_a"), p["wq_a"])
    q_a = rms_norm(q_a, p["q_norm"], cfg.latent_norm_eps, ggml=ggml_norm(aq))
    q = linear(apply(aq, q_a, "wq_b"), p["wq_b"])
  return q.reshape(*x.shape[:-1], cfg.num_attention_heads, cfg.qk_head_dim)  # [B, T, H, dn+dr]


def latent(
  p: dict, x: jax.Array, cfg: DeepseekV3Config, cos: jax.Array, sin: jax.Array, aq: ActQuant | None = None
):
  """The per-token cache entries: normalised latent c [B, T, r] and rotated shared key k_pe [B, T, dr]."""
  kv = linear(apply(aq, x, "wkv_a"), p["wkv_a"])  # [B, T, r+dr]
  c = rms_norm(kv[..., : cfg.kv_lora_rank], p["kv_norm"], cfg.latent_norm_eps, ggml=ggml_norm(aq))
  k_pe = rope.apply(kv[..., cfg.kv_lora_rank :], cos, sin, interleave=cfg.rope_interleave)
  return c, k_pe


def _softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
  s = jnp.where(mask, scores.astype(upcast_dtype(dtype)), -jnp.inf)
  return jax.nn.softmax(s, axis=-1).astype(dtype)


def _probs(probs: jax.Array, kv_cache: str) -> jax.Array:
  """Softmax probabilities [B, H, T, S] as they meet V: fp16 under an F16 cache (counted per query token)."""
  if isinstance(kv_cache, str) and kv_cache == "f32":
    return probs
  return jnp.swapaxes(_kv(jnp.swapaxes(probs, 1, 2), kv_cache, "kv.probs"), 1, 2)  # via [B, T, H, S]


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
  aq: ActQuant | None = None,
  kv_cache: str = "f32",
) -> jax.Array:
  """MLA output [B, T, d] for queries x [B, T, d] over keys given as latents c [B, S, r], k_pe [B, S, dr].

  A key at position s is visible to a query at position t iff s <= t (causal; cache slots not yet written
  sit at positions beyond every query). kv_cache: "f32" or "f16" (module doc), or a traced boolean (true:
  f16), so that one compiled function serves both (runner.evaluate).
  """
  if isinstance(kv_cache, str) and kv_cache not in KV_CACHES:
    raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
  h, dn, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  q = _queries(p, x, cfg, aq)
  q_nope = q[..., :dn]  # [B, T, H, dn]
  q_pe = rope.apply(q[..., dn:], cos[..., None, :], sin[..., None, :], interleave=cfg.rope_interleave)
  wkv_b = p["wkv_b"].reshape(h, dn + dv, r)
  w_k, w_v = wkv_b[:, :dn], wkv_b[:, dn:]  # [H, dn, r], [H, dv, r]
  mask = (k_positions[None, :] <= q_positions[:, None])[None, None]  # [1, 1, T, S]
  dtype = x.dtype

  if form is AttnForm.EXPANDED:
    c_in = apply(aq, c, "wkv_b")  # per cached token, as llama.cpp's kv_b path multiplies it before caching
    k_nope = einsum("bsr,hkr->bshk", c_in, w_k)  # [B, S, H, dn]
    v = einsum("bsr,hvr->bshv", c_in, w_v)  # [B, S, H, dv]
    k = jnp.concatenate(
      [k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (*k_nope.shape[:3], k_pe.shape[-1]))], -1
    )
    # [B, S, H, *]: what the cache holds per token
    k, v = _kv(k, kv_cache, "kv.k", k_positions), _kv(v, kv_cache, "kv.v", k_positions)
    q_full = _kv(jnp.concatenate([q_nope, q_pe], axis=-1), kv_cache, "kv.q")
    scores = einsum("bthk,bshk->bhts", q_full, k) * cfg.softmax_scale
    probs = _probs(_softmax(scores, mask, dtype), kv_cache)  # [B, H, T, S]
    o = einsum("bhts,bshv->bthv", probs, v)
  else:
    q_lat = einsum("bthk,hkr->bthr", apply(aq, q_nope, "wkv_b", "k_b"), w_k)  # [B, T, H, r]
    # The cache row [c | k_pe].
    c, k_pe = _kv(c, kv_cache, "kv.c", k_positions), _kv(k_pe, kv_cache, "kv.k_pe", k_positions)
    q_lat, q_pe = _kv(q_lat, kv_cache, "kv.q"), _kv(q_pe, kv_cache, "kv.q")  # the query row [q_lat | q_pe]
    scores = (einsum("bthr,bsr->bhts", q_lat, c) + einsum("bthe,bse->bhts", q_pe, k_pe)) * cfg.softmax_scale
    probs = _probs(_softmax(scores, mask, dtype), kv_cache)
    o_lat = einsum("bhts,bsr->bthr", probs, c)  # [B, T, H, r]
    o = einsum("bthr,hvr->bthv", apply(aq, o_lat, "wkv_b", "v_b"), w_v)
  return linear(apply(aq, o.reshape(*o.shape[:2], h * dv), "wo"), p["wo"])
