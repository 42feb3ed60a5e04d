"""The one table mapping dq3jax parameter paths to Hugging Face DeepSeek-V3 tensor names and shapes."""

from __future__ import annotations

import dataclasses

import numpy as np

from dq3jax.model.config import DeepseekV3Config


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  path: tuple[str, ...]  # where the array goes in the params pytree ("layers", i, ... with i as str)
  hf_name: str
  shape: tuple[int, ...]  # torch layout, as stored
  expert: int | None = None  # routed expert index: the array is row `expert` of a stacked [E, ...] leaf
  fp8: bool = False  # DeepSeek stores this one as FP8 with a weight_scale_inv sibling


def _mlp(prefix: str, path: tuple, d: int, width: int, expert: int | None = None) -> list[TensorSpec]:
  return [
    TensorSpec((*path, "w_gate"), f"{prefix}.gate_proj.weight", (width, d), expert, True),
    TensorSpec((*path, "w_up"), f"{prefix}.up_proj.weight", (width, d), expert, True),
    TensorSpec((*path, "w_down"), f"{prefix}.down_proj.weight", (d, width), expert, True),
  ]


def tensor_specs(cfg: DeepseekV3Config) -> list[TensorSpec]:
  """Every tensor the forward pass of cfg needs (already truncated configs give the truncated list)."""
  d, h = cfg.hidden_size, cfg.num_attention_heads
  specs = [TensorSpec(("embed",), "model.embed_tokens.weight", (cfg.vocab_size, d))]
  for i in range(cfg.num_hidden_layers):
    pre, lay = f"model.layers.{i}", ("layers", str(i))
    att = (*lay, "attn")
    specs += [
      TensorSpec((*lay, "attn_norm"), f"{pre}.input_layernorm.weight", (d,)),
      TensorSpec((*lay, "ffn_norm"), f"{pre}.post_attention_layernorm.weight", (d,)),
    ]
    if cfg.q_lora_rank is None:
      specs.append(
        TensorSpec((*att, "wq"), f"{pre}.self_attn.q_proj.weight", (h * cfg.qk_head_dim, d), fp8=True)
      )
    else:
      specs += [
        TensorSpec((*att, "wq_a"), f"{pre}.self_attn.q_a_proj.weight", (cfg.q_lora_rank, d), fp8=True),
        TensorSpec((*att, "q_norm"), f"{pre}.self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,)),
        TensorSpec(
          (*att, "wq_b"), f"{pre}.self_attn.q_b_proj.weight", (h * cfg.qk_head_dim, cfg.q_lora_rank), fp8=True
        ),
      ]
    r = cfg.kv_lora_rank
    specs += [
      TensorSpec(
        (*att, "wkv_a"), f"{pre}.self_attn.kv_a_proj_with_mqa.weight", (r + cfg.qk_rope_head_dim, d), fp8=True
      ),
      TensorSpec((*att, "kv_norm"), f"{pre}.self_attn.kv_a_layernorm.weight", (r,)),
      TensorSpec(
        (*att, "wkv_b"),
        f"{pre}.self_attn.kv_b_proj.weight",
        (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), r),
        fp8=True,
      ),
      TensorSpec((*att, "wo"), f"{pre}.self_attn.o_proj.weight", (d, h * cfg.v_head_dim), fp8=True),
    ]
    mlp = (*lay, "mlp")
    if not cfg.is_moe_layer(i):
      specs += _mlp(f"{pre}.mlp", mlp, d, cfg.intermediate_size)
      continue
    e = cfg.n_routed_experts
    specs += [
      TensorSpec((*mlp, "router"), f"{pre}.mlp.gate.weight", (e, d)),
      TensorSpec((*mlp, "router_bias"), f"{pre}.mlp.gate.e_score_correction_bias", (e,)),
    ]
    for j in range(e):
      specs += _mlp(f"{pre}.mlp.experts.{j}", (*mlp, "experts"), d, cfg.moe_intermediate_size, expert=j)
    if cfg.n_shared_experts:
      specs += _mlp(
        f"{pre}.mlp.shared_experts", (*mlp, "shared"), d, cfg.moe_intermediate_size * cfg.n_shared_experts
      )
  specs += [
    TensorSpec(("norm",), "model.norm.weight", (d,)),
    TensorSpec(("lm_head",), "lm_head.weight", (cfg.vocab_size, d)),
  ]
  return specs


def scale_name(hf_name: str) -> str:
  return hf_name.removesuffix(".weight") + ".weight_scale_inv"


def get_leaf(params: dict, spec: TensorSpec):
  node = params
  for key in spec.path:
    node = node[int(key)] if key.isdigit() else node[key]
  return node if spec.expert is None else node[spec.expert]


def set_leaf(params: dict, spec: TensorSpec, array, n_experts: int = 0) -> None:
  """Insert into a nested dict tree whose layers are keyed by str index (see `layers_to_list`).

  Routed-expert rows go into one preallocated [n_experts, ...] array, so stacking never copies.
  """
  node = params
  for key in spec.path[:-1]:
    node = node.setdefault(key, {})
  if spec.expert is None:
    node[spec.path[-1]] = array
    return
  if spec.path[-1] not in node:
    node[spec.path[-1]] = np.empty((n_experts, *array.shape), array.dtype)
  node[spec.path[-1]][spec.expert] = array


def layers_to_list(tree: dict) -> dict:
  return {**tree, "layers": [tree["layers"][str(i)] for i in range(len(tree.get("layers", {})))]}


def flatten_hf(params: dict, cfg: DeepseekV3Config) -> dict[str, np.ndarray]:
  """HF tensor name -> array for a params pytree (routed experts unstacked), in tensor_specs order."""
  return {spec.hf_name: np.asarray(get_leaf(params, spec)) for spec in tensor_specs(cfg)}
