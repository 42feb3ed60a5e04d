"""The deepseek2 GGUF tensor list implied by a DeepSeek-V3/R1 Hugging Face config (no weights needed).

Shapes are in ggml `ne` order (fastest dimension first): torch `[out, in]` is ne `[in, out]`, stacked experts
torch `[E, out, in]` are ne `[in, out, E]`. MTP (nextn) layers are never included, as llama.cpp's converter
skips them.

Two attention layouts exist in the wild:
  * `kv_b`  - files converted before the spring-2025 MLA change: one `attn_kv_b` [kv_lora, H*(dn+dv)].
  * `split` - current converters: `attn_k_b` [dn, kv_lora, H] (key part transposed) and `attn_v_b`
              [kv_lora, dv, H].
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from dq3jax.layouts import check_layout


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelDims:
  """The config fields the tensor list depends on, after optional truncation."""

  hidden: int
  n_layer: int
  n_dense: int  # first_k_dense_replace, clipped to n_layer
  n_expert: int
  moe_ff: int
  dense_ff: int
  n_shared: int
  q_lora: int | None
  kv_lora: int
  qk_nope: int
  qk_rope: int
  v_head: int
  n_head: int
  n_head_kv: int
  vocab: int
  has_expert_bias: bool  # e_score_correction_bias -> exp_probs_b.bias (V3's noaux_tc routing)
  moe_layer_freq: int = 1

  def is_moe_layer(self, i: int) -> bool:
    return self.n_expert > 0 and i >= self.n_dense and i % self.moe_layer_freq == 0


def _req(cfg: Mapping[str, Any], key: str) -> Any:
  if key not in cfg or cfg[key] is None:
    raise ValueError(f"config is missing required field {key!r}")
  return cfg[key]


def dims_from_config(
  cfg: Mapping[str, Any], *, layers: int | None = None, experts: int | None = None
) -> ModelDims:
  """Reads a DeepSeek-V2/V3 HF config dict; `layers`/`experts` truncate to the first N layers / E experts."""
  n_layer = int(_req(cfg, "num_hidden_layers"))
  n_expert = int(cfg.get("n_routed_experts") or 0)
  if layers is not None:
    if not 1 <= layers <= n_layer:
      raise ValueError(f"layers={layers} must be in [1, {n_layer}]")
    n_layer = layers
  if experts is not None:
    if not 1 <= experts <= max(n_expert, 1) or n_expert == 0:
      raise ValueError(f"experts={experts} must be in [1, {n_expert}]")
    n_expert = experts
  q_lora = cfg.get("q_lora_rank")
  n_head = int(_req(cfg, "num_attention_heads"))
  return ModelDims(
    hidden=int(_req(cfg, "hidden_size")),
    n_layer=n_layer,
    n_dense=min(int(cfg.get("first_k_dense_replace") or 0), n_layer),
    n_expert=n_expert,
    moe_ff=int(cfg.get("moe_intermediate_size") or 0),
    dense_ff=int(_req(cfg, "intermediate_size")),
    n_shared=int(cfg.get("n_shared_experts") or 0),
    q_lora=int(q_lora) if q_lora else None,
    kv_lora=int(_req(cfg, "kv_lora_rank")),
    qk_nope=int(_req(cfg, "qk_nope_head_dim")),
    qk_rope=int(_req(cfg, "qk_rope_head_dim")),
    v_head=int(_req(cfg, "v_head_dim")),
    n_head=n_head,
    n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
    vocab=int(_req(cfg, "vocab_size")),
    # V2 uses greedy/group_limited_greedy top-k without a bias; V3/R1 use noaux_tc with one.
    has_expert_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc",
    moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
  )


def load_config(path: str | pathlib.Path) -> dict[str, Any]:
  """Loads config.json, or the config.json inside an HF checkpoint directory."""
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / "config.json"
  if not p.is_file():
    raise FileNotFoundError(f"no config.json at {path}")
  try:
    with p.open() as f:
      cfg = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: their messages do not name the file
    raise ValueError(f"{p}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{p}: expected a JSON object")
  return cfg


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorInfo:
  """One tensor of the GGUF file: name, ggml shape, layer (None for globals) and source type."""

  name: str
  ne: tuple[int, ...]
  layer: int | None
  # Type the converter writes: F32 for 1-D tensors and the router, BF16 for the other weights.
  src_type: str

  @property
  def n_params(self) -> int:
    n = 1
    for d in self.ne:
      n *= d
    return n


def _t(name: str, ne: tuple[int, ...], layer: int | None, src: str | None = None) -> TensorInfo:
  return TensorInfo(name=name, ne=ne, layer=layer, src_type=src or ("F32" if len(ne) == 1 else "BF16"))


def layer_tensors(d: ModelDims, i: int, layout: str) -> list[TensorInfo]:
  check_layout(layout)
  b = f"blk.{i}."
  qk_head = d.qk_nope + d.qk_rope
  out = [_t(b + "attn_norm.weight", (d.hidden,), i)]
  if d.q_lora:
    out += [
      _t(b + "attn_q_a.weight", (d.hidden, d.q_lora), i),
      _t(b + "attn_q_a_norm.weight", (d.q_lora,), i),
      _t(b + "attn_q_b.weight", (d.q_lora, d.n_head * qk_head), i),
    ]
  else:
    out.append(_t(b + "attn_q.weight", (d.hidden, d.n_head * qk_head), i))
  out += [
    _t(b + "attn_kv_a_mqa.weight", (d.hidden, d.kv_lora + d.qk_rope), i),
    _t(b + "attn_kv_a_norm.weight", (d.kv_lora,), i),
  ]
  if layout == "kv_b":
    out.append(_t(b + "attn_kv_b.weight", (d.kv_lora, d.n_head * (d.qk_nope + d.v_head)), i))
  else:
    out += [
      _t(b + "attn_k_b.weight", (d.qk_nope, d.kv_lora, d.n_head), i),
      _t(b + "attn_v_b.weight", (d.kv_lora, d.v_head, d.n_head), i),
    ]
  out += [
    _t(b + "attn_output.weight", (d.n_head * d.v_head, d.hidden), i),
    _t(b + "ffn_norm.weight", (d.hidden,), i),
  ]
  if not d.is_moe_layer(i):
    out += [
      _t(b + "ffn_gate.weight", (d.hidden, d.dense_ff), i),
      _t(b + "ffn_up.weight", (d.hidden, d.dense_ff), i),
      _t(b + "ffn_down.weight", (d.dense_ff, d.hidden), i),
    ]
    return out
  out.append(_t(b + "ffn_gate_inp.weight", (d.hidden, d.n_expert), i, "F32"))
  if d.has_expert_bias:
    out.append(_t(b + "exp_probs_b.bias", (d.n_expert,), i))
  out += [
    _t(b + "ffn_gate_exps.weight", (d.hidden, d.moe_ff, d.n_expert), i),
    _t(b + "ffn_up_exps.weight", (d.hidden, d.moe_ff, d.n_expert), i),
    _t(b + "ffn_down_exps.weight", (d.moe_ff, d.hidden, d.n_expert), i),
  ]
  if d.n_shared:
    sh = d.moe_ff * d.n_shared
    out += [
      _t(b + "ffn_gate_shexp.weight", (d.hidden, sh), i),
      _t(b + "ffn_up_shexp.weight", (d.hidden, sh), i),
      _t(b + "ffn_down_shexp.weight", (sh, d.hidden), i),
    ]
  return out


def llama_order_key(name: str) -> tuple[int, str]:
  """llama.cpp's weights_map order (llama-model-loader.h): layer index (-1 for globals), then name."""
  if name.startswith("blk."):
    try:
      return int(name.split(".")[1]), name
    except ValueError:
      pass
  return -1, name


def inventory(d: ModelDims, layout: str) -> list[TensorInfo]:
  """All tensors of the file, in the order llama-quantize visits them (its running counters depend on it)."""
  out = [
    _t("token_embd.weight", (d.hidden, d.vocab), None),
    _t("output_norm.weight", (d.hidden,), None),
    _t("output.weight", (d.hidden, d.vocab), None),
  ]
  for i in range(d.n_layer):
    out += layer_tensors(d, i, layout)
  return sorted(out, key=lambda t: llama_order_key(t.name))


def inventory_from_config(
  cfg: Mapping[str, Any], *, layout: str = "split", layers: int | None = None, experts: int | None = None
) -> list[TensorInfo]:
  """Every GGUF tensor of an HF config (a dict of config.json), optionally truncated, in llama-quantize's order."""
  return inventory(dims_from_config(cfg, layers=layers, experts=experts), layout)
