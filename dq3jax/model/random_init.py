"""Seeded random parameters and tiny configs for tests, goldens and benchmarks.

Scales are chosen so that a tiny model is far from degenerate: unit-variance embeddings, fan-in-scaled
linears, norm weights near 1, router logits of order 1 and a non-zero e_score_correction_bias (transformers
initialises it to zero, which would leave the selection bias untested). Everything is numpy float32.
"""

from __future__ import annotations

import numpy as np

from dq3jax.model.config import DeepseekV3Config, RopeConfig, RopeKind


def tiny_config(**overrides) -> DeepseekV3Config:
  """A small but complete V3-shaped config: 3 layers (1 dense), 8 experts in 4 groups, YaRN."""
  base = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    rope=RopeConfig(
      kind=RopeKind.YARN,
      theta=10000.0,
      factor=40.0,
      original_max_position_embeddings=16,
      beta_fast=32.0,
      beta_slow=1.0,
      mscale=1.0,
      mscale_all_dim=1.0,
    ),
    max_position_embeddings=640,
  )
  base.update(overrides)
  return DeepseekV3Config(**base)


def init_params(cfg: DeepseekV3Config, seed: int) -> dict:
  """Random parameter pytree (numpy float32) for cfg; same seed, same values."""
  rng = np.random.default_rng(seed)

  def linear(out: int, inp: int) -> np.ndarray:
    return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

  def norm(n: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

  def mlp(width: int) -> dict:
    return {
      "w_gate": linear(width, cfg.hidden_size),
      "w_up": linear(width, cfg.hidden_size),
      "w_down": linear(cfg.hidden_size, width),
    }

  d, h = cfg.hidden_size, cfg.num_attention_heads
  layers = []
  for i in range(cfg.num_hidden_layers):
    attn = {}
    if cfg.q_lora_rank is None:
      attn["wq"] = linear(h * cfg.qk_head_dim, d)
    else:
      attn.update(
        wq_a=linear(cfg.q_lora_rank, d),
        q_norm=norm(cfg.q_lora_rank),
        wq_b=linear(h * cfg.qk_head_dim, cfg.q_lora_rank),
      )
    attn.update(
      wkv_a=linear(cfg.kv_lora_rank + cfg.qk_rope_head_dim, d),
      kv_norm=norm(cfg.kv_lora_rank),
      wkv_b=linear(h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
      wo=linear(d, h * cfg.v_head_dim),
    )
    layer = {"attn_norm": norm(d), "attn": attn, "ffn_norm": norm(d)}
    if cfg.is_moe_layer(i):
      e, width = cfg.n_routed_experts, cfg.moe_intermediate_size
      experts = [mlp(width) for _ in range(e)]
      moe = {
        "router": linear(e, d) * 2.0,
        "router_bias": rng.uniform(-0.2, 0.2, e).astype(np.float32),
        "experts": {k: np.stack([x[k] for x in experts]) for k in ("w_gate", "w_up", "w_down")},
      }
      if cfg.n_shared_experts:
        moe["shared"] = mlp(width * cfg.n_shared_experts)
      layer["mlp"] = moe
    else:
      layer["mlp"] = mlp(cfg.intermediate_size)
    layers.append(layer)
  return {
    "embed": rng.standard_normal((cfg.vocab_size, d)).astype(np.float32),
    "layers": layers,
    "norm": norm(d),
    "lm_head": linear(cfg.vocab_size, d),
  }


def truncate_params(params: dict, cfg: DeepseekV3Config, small: DeepseekV3Config) -> dict:
  """The parameters of `small = cfg.truncate(...)` taken from the full model's params (numpy slicing)."""
  e = small.n_routed_experts
  layers = []
  for i, lp in enumerate(params["layers"][: small.num_hidden_layers]):
    lp = dict(lp)
    if small.is_moe_layer(i):
      m = dict(lp["mlp"])
      m["router"], m["router_bias"] = m["router"][:e], m["router_bias"][:e]
      m["experts"] = {k: v[:e] for k, v in m["experts"].items()}
      lp["mlp"] = m
    layers.append(lp)
  return {**params, "layers": layers}
