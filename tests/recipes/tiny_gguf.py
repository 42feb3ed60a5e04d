"""A tiny random deepseek2 GGUF for the llama-quantize cross-checks (today's llama.cpp and the early-2025 one):
widths (160, 320, 128, 64, 32) that are not multiples of 256, so most shape fallbacks are hit."""

import gguf
import numpy as np

from dq3jax.recipes.inventory import dims_from_config, inventory

TINY = {
  "hidden_size": 256,
  "num_hidden_layers": 4,
  "first_k_dense_replace": 1,
  "n_routed_experts": 4,
  "moe_intermediate_size": 160,
  "intermediate_size": 320,
  "n_shared_experts": 1,
  "q_lora_rank": 128,
  "kv_lora_rank": 64,
  "qk_nope_head_dim": 32,
  "qk_rope_head_dim": 32,
  "v_head_dim": 32,
  "num_attention_heads": 2,
  "num_key_value_heads": 2,
  "vocab_size": 512,
}
FTYPE = {
  "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
  "Q5_K_M": 17, "Q6_K": 18, "Q2_K_S": 21, "Q8_0": 7,
  "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26,
  "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31,
}  # fmt: skip


def write_model(path, layout, cfg=TINY):
  """Writes the model (F32 random tensors, seed 0) with llama.cpp's metadata; returns its tensor inventory."""
  d = dims_from_config(cfg)
  w = gguf.GGUFWriter(path, arch="deepseek2")
  w.add_context_length(512)
  w.add_embedding_length(d.hidden)
  w.add_block_count(d.n_layer)
  w.add_feed_forward_length(d.dense_ff)
  w.add_head_count(d.n_head)
  # Pre-split files store the HF kv head count, MLA-aware (split) files store 1.
  w.add_head_count_kv(d.n_head_kv if layout == "kv_b" else 1)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_leading_dense_block_count(d.n_dense)
  w.add_q_lora_rank(d.q_lora)
  w.add_kv_lora_rank(d.kv_lora)
  w.add_key_length(d.qk_nope + d.qk_rope)
  w.add_value_length(d.v_head)
  w.add_expert_feed_forward_length(d.moe_ff)
  w.add_expert_count(d.n_expert)
  w.add_expert_used_count(2)
  w.add_expert_shared_count(d.n_shared)
  w.add_expert_weights_scale(1.0)
  w.add_rope_dimension_count(d.qk_rope)
  w.add_rope_scaling_yarn_log_mul(0.1)  # required by early-2025 loaders (test_recipe_llama_legacy)
  w.add_vocab_size(d.vocab)
  rng = np.random.default_rng(0)
  inv = inventory(d, layout)
  for t in inv:
    w.add_tensor(t.name, rng.standard_normal(tuple(reversed(t.ne))).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return inv
