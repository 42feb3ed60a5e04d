"""Built-in seeded mini DeepSeek-V3 models: the embedded defaults of goldens, ablations and benchmarks.

- `v3-mini-256`: every weight row length (GGUF ne0) is a multiple of 256, so every k-quant applies as it does
  on the real model, except attn_k_b's (ne0 = qk_nope_head_dim = 64), which takes llama.cpp's shape fallback
  exactly as V3's (ne0 = 128) does. Ratios follow V3 where the multiple-of-256 rule and the goldens' size
  budget allow: rope head dim = nope / 2 as in V3, v_head_dim = 128 as in V3, q_lora_rank = kv_lora_rank
  (V3: 3:1), dense intermediate = 2 x hidden (V3: 2.57x), expert width = hidden (V3: 0.29x). One dense layer
  and two MoE layers, 4 routed experts in 2 groups (not 8: llama.cpp special-cases n_expert == 8, which V3
  never hits), top-2, one shared expert, YaRN (tiny_config's: factor 40 over 16 original positions).
- `v3-tiny`: small widths (multiples of 32, not 256: k-quants take their shape fallbacks), 16 experts in 4
  groups with topk_group 2 and top-4, so group routing is exercised richly; four layers (one dense).

Weights come from `random_init.init_params(config, seed)` rounded to bfloat16 (as the released checkpoints'
weights are bf16 values), so the HF directory in bf16 and an F32 GGUF hold exactly the same numbers.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.random_init import init_params, tiny_config


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  config: DeepseekV3Config
  seed: int
  description: str


PRESETS = {
  p.name: p
  for p in (
    Preset(
      name="v3-mini-256",
      config=tiny_config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        q_lora_rank=256,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=128,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
      ),
      seed=256,
      description="3 layers (1 dense), 4 experts, every k-quant applicable (ne0 multiple of 256)",
    ),
    Preset(
      name="v3-tiny",
      config=tiny_config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
      ),
      seed=64,
      description="4 layers (1 dense), 16 experts in 4 groups, widths multiples of 32 (k-quant fallbacks)",
    ),
  )
}
DEFAULT = "v3-mini-256"


def preset(name: str) -> Preset:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(PRESETS)}") from None


def bf16_round(params: dict) -> dict:
  """Every leaf rounded to the nearest bfloat16 value (kept as float32)."""
  import jax  # noqa: PLC0415

  return jax.tree_util.tree_map(
    lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32), params
  )


def params_of(name: str) -> tuple[DeepseekV3Config, dict]:
  """(config, float32 numpy params with bf16-representable values) of a built-in model."""
  p = preset(name)
  return p.config, bf16_round(init_params(p.config, p.seed))
