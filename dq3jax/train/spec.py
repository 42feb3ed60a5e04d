"""What v3-pydoc is: its DeepSeek-V3 config and the training hyper-parameters of the committed weights.

The config is the real architecture at small widths: MLA with q and kv LoRA, YaRN (tiny_config's settings,
as the other presets), noaux_tc routing with 12 experts in 4 groups (topk_group 2, top-4) and a selection
bias, one shared expert, one dense first layer. Every weight row length (GGUF ne0) is a multiple of 256 so
every k-quant applies; attn_k_b (ne0 = qk_nope_head_dim = 64) takes llama.cpp's shape fallback as V3's does.
About 7.3 M parameters (1.3 M in attention, 5.1 M in the two MoE layers, 0.5 M embeddings + head).
"""

from __future__ import annotations

import dataclasses

from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.random_init import tiny_config

NAME = "v3-pydoc"

CONFIG: DeepseekV3Config = tiny_config(
  vocab_size=1024,
  hidden_size=256,
  intermediate_size=512,
  moe_intermediate_size=256,
  num_hidden_layers=3,
  first_k_dense_replace=1,
  num_attention_heads=4,
  q_lora_rank=256,
  kv_lora_rank=256,
  qk_nope_head_dim=64,
  qk_rope_head_dim=32,
  v_head_dim=64,
  n_routed_experts=12,
  n_group=4,
  topk_group=2,
  num_experts_per_tok=4,
  n_shared_experts=1,
)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  seed: int = 0  # parameter init and batch order
  steps: int = 520
  batch: int = 16  # sequences per step
  seq_len: int = 128
  lr: float = 2e-3  # AdamW peak learning rate
  warmup: int = 40  # linear warm-up steps, then cosine decay to lr * final_lr_frac
  final_lr_frac: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  adam_eps: float = 1e-8
  weight_decay: float = 0.1  # on matrices only (not norms, not the router bias)
  grad_clip: float = 1.0  # global norm
  bias_gamma: float = 1e-3  # aux-loss-free balancing: bias -= gamma * sign(load - mean load), per step
  seq_aux_alpha: float = 1e-4  # V3's sequence-wise balance loss weight
  eval_every: int = 100  # steps between progress lines with a held-out loss


TRAIN = TrainSpec()
