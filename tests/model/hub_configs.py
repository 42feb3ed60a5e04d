"""Reference config.json contents shared by the model tests."""

from __future__ import annotations

from dq3jax.model.config import DeepseekV3Config

# The hub config.json of DeepSeek-V3 / R1 (fields that matter here, legacy layout).
V3_HUB = {
  "architectures": ["DeepseekV3ForCausalLM"],
  "model_type": "deepseek_v3",
  "vocab_size": 129280,
  "hidden_size": 7168,
  "intermediate_size": 18432,
  "moe_intermediate_size": 2048,
  "num_hidden_layers": 61,
  "num_nextn_predict_layers": 1,
  "num_attention_heads": 128,
  "num_key_value_heads": 128,
  "q_lora_rank": 1536,
  "kv_lora_rank": 512,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "num_experts_per_tok": 8,
  "n_group": 8,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "scoring_func": "sigmoid",
  "routed_scaling_factor": 2.5,
  "norm_topk_prob": True,
  "first_k_dense_replace": 3,
  "moe_layer_freq": 1,
  "hidden_act": "silu",
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000,
  "max_position_embeddings": 163840,
  "ep_size": 1,
  "aux_loss_alpha": 0.001,
  "seq_aux": True,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
  },
  "tie_word_embeddings": False,
  "attention_bias": False,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
  },
}


def v3() -> DeepseekV3Config:
  return DeepseekV3Config.from_hf_config(V3_HUB)
