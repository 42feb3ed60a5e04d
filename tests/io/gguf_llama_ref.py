"""Helpers for the GGUF tests: a seeded mini DeepSeek-V3 whose widths are multiples of 256, llama.cpp's own
quantizer (llama_model_quantize) and evaluator (llama_cpp.Llama) through llama-cpp-python, and the logit
statistics of style.md (NMSE as test-backend-ops, KLD and top-1 agreement as llama-perplexity)."""

from __future__ import annotations

import numpy as np

from dq3jax.model.config import RopeConfig, RopeKind
from dq3jax.model.random_init import tiny_config
from reference import llama_quantize as llama_quantize_ref
from reference.llama_cpp_run import llama_logits  # noqa: F401  (re-exported for the GGUF tests)

FTYPE = {
  "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
  "Q5_K_M": 17, "Q6_K": 18, "Q2_K_S": 21, "Q8_0": 7,
}  # fmt: skip


def mini_config(**overrides):
  """2 layers (1 dense, 1 MoE with 4 experts in 2 groups), every ne0 a multiple of 256 except attn_k_b's
  (dn = 32, as V3's 128 it always takes the shape fallback)."""
  base = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=256,
    kv_lora_rank=256,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=128,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    rope=RopeConfig(
      kind=RopeKind.YARN,
      theta=10000.0,
      factor=40.0,
      original_max_position_embeddings=16,
      mscale=1.0,
      mscale_all_dim=1.0,
    ),
    max_position_embeddings=640,
  )
  base.update(overrides)
  return tiny_config(**base)


def llama_quantize(
  src, dst, preset: str, *, imatrix: dict[str, np.ndarray] | None = None, overrides=()
) -> None:
  """Run llama.cpp's llama_model_quantize: preset ftype, optional imatrix {name: flat float32}, optional
  --tensor-type overrides [(regex, type name)]."""
  rc = llama_quantize_ref.quantize(src, dst, FTYPE[preset], imatrix=imatrix or None, overrides=overrides)
  assert rc == 0, f"llama_model_quantize failed ({rc})"


def logit_stats(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
  """NMSE = sum (a-b)^2 / sum a^2 (test-backend-ops), per-token KL(ref || other) mean/max, top-1 agreement."""
  ref, other = ref.astype(np.float64), other.astype(np.float64)

  def logp(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lp, lq = logp(ref), logp(other)
  kld = (np.exp(lp) * (lp - lq)).sum(-1)
  return {
    "nmse": float(((ref - other) ** 2).sum() / (ref**2).sum()),
    "mean_kld": float(kld.mean()),
    "kld_max": float(kld.max()),
    "same_top_p": float((ref.argmax(-1) == other.argmax(-1)).mean()),
    "max_abs": float(np.abs(ref - other).max()),
  }


def routing_margins(params: dict, cfg, tokens) -> np.ndarray:
  """Per position, the smallest gap in the oracle's expert selection over all MoE layers: between the last kept
  and the first dropped group score, and between the K-th and (K+1)-th biased expert score. A small gap means a
  near-tie that a tiny activation perturbation (llama.cpp's Q8 activations) flips, changing that position's
  output by far more than rounding; such positions are reported, not compared."""
  from dq3jax.model import runner

  _, inter = runner.logits_and_intermediates(params, np.asarray(tokens)[None], cfg)
  t = len(tokens)
  margin = np.full(t, np.inf)
  for i, rec in enumerate(inter):
    if not cfg.is_moe_layer(i):
      continue
    lp = params["layers"][i]
    h = np.asarray(rec["hidden_after_attn"][0], np.float64)
    x = h / np.sqrt((h**2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * lp["ffn_norm"]
    s = 1 / (1 + np.exp(-(x @ np.asarray(lp["mlp"]["router"], np.float64).T)))
    b = s + lp["mlp"]["router_bias"]
    grouped = b.reshape(t, cfg.n_group, -1)
    gs = np.sort(np.sort(grouped, -1)[..., -2:].sum(-1), -1)[:, ::-1]  # [T, G] descending
    if cfg.topk_group < cfg.n_group:
      margin = np.minimum(margin, gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group])
    kept = np.argsort(-np.sort(grouped, -1)[..., -2:].sum(-1), -1)[:, : cfg.topk_group]
    mask = np.zeros((t, cfg.n_group), bool)
    mask[np.arange(t)[:, None], kept] = True
    c = np.sort(np.where(mask[:, :, None], grouped, -np.inf).reshape(t, -1), -1)[:, ::-1]
    k = cfg.num_experts_per_tok
    margin = np.minimum(margin, c[:, k - 1] - c[:, k])
  return margin
