"""Typed DeepSeek-V3/R1 model configuration, read from a Hugging Face `config.json`.

Accepts the file as DeepSeek ships it (legacy `rope_theta` + `rope_scaling{type|rope_type: yarn}`,
`topk_method`, `scoring_func`, `moe_layer_freq`, ...) and as transformers 5 writes it (`rope_parameters`).
Every switch that changes the math is an explicit field; anything the forward pass cannot honour is
rejected with a ValueError naming the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any


class RopeKind(enum.Enum):
  DEFAULT = "default"
  YARN = "yarn"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
  """RoPE parameters with transformers 5.23 defaulting rules applied (see `_compute_yarn_parameters`)."""

  kind: RopeKind = RopeKind.DEFAULT
  theta: float = 10000.0
  factor: float = 1.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  # None/0 mean "absent": transformers then falls back to other rules (see cos_sin_factor, softmax_mscale).
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  # transformers floors/ceils the YaRN correction range unless `truncate: false`.
  truncate: bool = True

  @property
  def cos_sin_factor(self) -> float:
    """Factor transformers multiplies into cos and sin (1.0 for V3/R1 where mscale == mscale_all_dim)."""
    if self.kind is RopeKind.DEFAULT:
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)
    if self.mscale and self.mscale_all_dim:
      return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
    return yarn_mscale(self.factor, 1.0)

  @property
  def softmax_mscale(self) -> float:
    """Multiplier of the softmax scale; transformers and llama.cpp use mscale_all_dim (DeepSeek's code: mscale)."""
    if self.kind is RopeKind.DEFAULT or not self.mscale_all_dim:
      return 1.0
    return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeepseekV3Config:
  """The subset of a DeepSeek-V3 config that determines next-token logits (MTP layers are ignored)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  moe_intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  n_routed_experts: int
  n_shared_experts: int
  num_experts_per_tok: int
  n_group: int
  topk_group: int
  routed_scaling_factor: float
  norm_topk_prob: bool
  first_k_dense_replace: int
  rms_norm_eps: float = 1e-6
  # transformers builds q_a_layernorm / kv_a_layernorm with its default eps (1e-6), not rms_norm_eps.
  latent_norm_eps: float = 1e-6
  rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
  # True: rotate consecutive pairs (x0,x1),(x2,x3),... of the stored weights (DeepSeek, transformers default).
  rope_interleave: bool = True
  max_position_embeddings: int = 4096
  # noaux_tc selection bias `e_score_correction_bias`; DeepSeek's code enables it by `dim == 7168`.
  use_router_bias: bool = True

  def __post_init__(self):
    _validate(self)

  # ---- derived values
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def experts_per_group(self) -> int:
    return self.n_routed_experts // self.n_group

  @property
  def softmax_scale(self) -> float:
    return self.qk_head_dim**-0.5 * self.rope.softmax_mscale

  def is_moe_layer(self, layer: int) -> bool:
    # transformers and DeepSeek's code decide by first_k_dense_replace alone (moe_layer_freq must be 1).
    return layer >= self.first_k_dense_replace

  # ---- construction
  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any]) -> DeepseekV3Config:
    return _from_hf(hf)

  def to_hf_config(self) -> dict[str, Any]:
    """config.json in DeepSeek's legacy layout, readable by transformers 5.23 and by `from_hf_config`."""
    return _to_hf(self)

  def truncate(self, *, layers: int | None = None, experts: int | None = None) -> DeepseekV3Config:
    """A consistent smaller model made of a prefix of this one's weights.

    layers=N keeps decoder layers 0..N-1 followed by the original final norm and lm_head;
    first_k_dense_replace becomes min(first_k_dense_replace, N).

    experts=E keeps routed experts 0..E-1 of every MoE layer: their weights, the first E rows of the router
    weight and the first E entries of e_score_correction_bias. Shared experts and num_experts_per_tok (K) are
    unchanged. Groups keep their original membership: with group size S = n_routed_experts / n_group,
      * E a multiple of S: n_group = E / S, topk_group = min(topk_group, E / S) (whole groups are kept);
      * E < S: n_group = topk_group = 1 (a part of the first group, routed without group limiting);
      * otherwise ValueError (a partial trailing group would change which experts compete together).
    ValueError if E < K, if the kept groups cannot supply K experts, or if either count exceeds the original.
    """
    changes: dict[str, Any] = {}
    if layers is not None:
      if not 1 <= layers <= self.num_hidden_layers:
        raise ValueError(f"truncate: layers={layers} must be in [1, {self.num_hidden_layers}]")
      changes["num_hidden_layers"] = layers
      changes["first_k_dense_replace"] = min(self.first_k_dense_replace, layers)
    if experts is not None:
      if not 1 <= experts <= self.n_routed_experts:
        raise ValueError(f"truncate: experts={experts} must be in [1, {self.n_routed_experts}]")
      if experts < self.num_experts_per_tok:
        raise ValueError(f"truncate: experts={experts} < num_experts_per_tok={self.num_experts_per_tok}")
      size = self.experts_per_group
      if experts % size == 0:
        n_group = experts // size
        topk_group = min(self.topk_group, n_group)
      elif experts < size:
        n_group = topk_group = 1
      else:
        raise ValueError(
          f"truncate: experts={experts} is neither a multiple of the group size {size} nor smaller than it"
        )
      if topk_group * (experts // n_group) < self.num_experts_per_tok:
        raise ValueError(
          f"truncate: experts={experts} keeps {topk_group} groups of {experts // n_group}, fewer than "
          f"num_experts_per_tok={self.num_experts_per_tok}"
        )
      changes.update(n_routed_experts=experts, n_group=n_group, topk_group=topk_group)
    return dataclasses.replace(self, **changes)


def _validate(c: DeepseekV3Config) -> None:
  def need(ok: bool, key: str, msg: str) -> None:
    if not ok:
      raise ValueError(f"config key {key!r}: {msg}")

  for key in (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
  ):
    need(
      isinstance(getattr(c, key), int) and getattr(c, key) >= 1,
      key,
      f"must be a positive int, got {getattr(c, key)!r}",
    )
  need(c.q_lora_rank is None or c.q_lora_rank >= 1, "q_lora_rank", "must be null or a positive int")
  need(c.qk_rope_head_dim >= 2 and c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even and >= 2")
  need(c.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
  need(
    0 <= c.first_k_dense_replace <= c.num_hidden_layers,
    "first_k_dense_replace",
    f"must be in [0, num_hidden_layers={c.num_hidden_layers}]",
  )
  need(
    c.n_routed_experts % c.n_group == 0,
    "n_group",
    f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_group}",
  )
  # transformers scores each group by the sum of its top-2 experts, so a group needs two members.
  need(
    c.experts_per_group >= 2 or c.n_group == 1,
    "n_group",
    "groups need at least 2 experts (top-2 group score)",
  )
  need(c.topk_group <= c.n_group, "topk_group", f"{c.topk_group} > n_group={c.n_group}")
  need(
    c.num_experts_per_tok <= c.topk_group * c.experts_per_group,
    "num_experts_per_tok",
    f"{c.num_experts_per_tok} > topk_group * experts_per_group = {c.topk_group * c.experts_per_group}",
  )
  need(c.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
  r = c.rope
  need(r.theta > 0, "rope_theta", "must be > 0")
  if r.kind is RopeKind.YARN:
    need(r.factor > 0, "rope_scaling.factor", "must be > 0")
    need(
      r.original_max_position_embeddings >= 1, "rope_scaling.original_max_position_embeddings", "must be >= 1"
    )


_ROPE_KEYS = {
  "type",
  "rope_type",
  "rope_theta",
  "factor",
  "original_max_position_embeddings",
  "beta_fast",
  "beta_slow",
  "mscale",
  "mscale_all_dim",
  "attention_factor",
  "truncate",
  "partial_rotary_factor",
}


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
  legacy = hf.get("rope_scaling")
  modern = hf.get("rope_parameters")
  for key, value in (("rope_scaling", legacy), ("rope_parameters", modern)):
    if value is not None and not isinstance(value, Mapping):
      raise ValueError(f"config key {key!r}: expected an object or null, got {value!r}")
  params: dict[str, Any] = dict(modern or {})
  for key, value in (legacy or {}).items():
    if key in params and params[key] != value and not {key} <= {"type", "rope_type"}:
      raise ValueError(
        f"config key 'rope_scaling.{key}'={value!r} contradicts rope_parameters.{key}={params[key]!r}"
      )
    params.setdefault(key, value)
  unknown = set(params) - _ROPE_KEYS
  if unknown:
    raise ValueError(f"config key 'rope_parameters': unknown entries {sorted(unknown)}")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError("config key 'rope_parameters.partial_rotary_factor': only 1.0 is supported")

  kinds = {params[k] for k in ("type", "rope_type") if params.get(k) is not None}
  if legacy and modern:
    kinds |= {
      v for d in (legacy, modern) for k, v in d.items() if k in ("type", "rope_type") and v is not None
    }
  if len(kinds) > 1:
    raise ValueError(f"config key 'rope_scaling.type': contradictory values {sorted(kinds)}")
  scaling_keys = set(params) - {"type", "rope_type", "rope_theta"}
  if not kinds and scaling_keys:
    # transformers would quietly use plain RoPE here; an oracle should not guess.
    raise ValueError(f"config key 'rope_scaling.type': missing although {sorted(scaling_keys)} are given")
  kind_name = kinds.pop() if kinds else "default"
  try:
    kind = RopeKind(kind_name)
  except ValueError:
    raise ValueError(
      f"config key 'rope_scaling.type': unsupported {kind_name!r} (supported: default, yarn)"
    ) from None

  theta = hf.get("rope_theta")
  if (
    theta is not None and params.get("rope_theta") is not None and float(theta) != float(params["rope_theta"])
  ):
    raise ValueError(
      f"config key 'rope_theta'={theta} contradicts rope_parameters.rope_theta={params['rope_theta']}"
    )
  if params.get("rope_theta") is not None:
    theta = params["rope_theta"]
  theta = 10000.0 if theta is None else float(theta)
  if kind is RopeKind.DEFAULT:
    return RopeConfig(kind=kind, theta=theta)

  max_pos = int(hf.get("max_position_embeddings", 4096))
  orig = int(params.get("original_max_position_embeddings") or max_pos)
  factor = params.get("factor")
  # transformers: a missing factor means max_position_embeddings / original_max_position_embeddings.
  factor = max_pos / orig if factor is None else float(factor)
  return RopeConfig(
    kind=kind,
    theta=theta,
    factor=factor,
    original_max_position_embeddings=orig,
    # transformers uses `value or default`, so 0/null fall back to 32 / 1.
    beta_fast=float(params.get("beta_fast") or 32),
    beta_slow=float(params.get("beta_slow") or 1),
    mscale=params.get("mscale"),
    mscale_all_dim=params.get("mscale_all_dim"),
    attention_factor=params.get("attention_factor"),
    truncate=bool(params.get("truncate", True)),
  )


def _from_hf(hf: Mapping[str, Any]) -> DeepseekV3Config:
  def get(key: str, default: Any = dataclasses.MISSING) -> Any:
    if key in hf and hf[key] is not None:
      return hf[key]
    if default is dataclasses.MISSING:
      raise ValueError(f"config key {key!r}: missing")
    return default

  def expect(key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = get(key, default)
    if value not in allowed:
      raise ValueError(f"config key {key!r}: unsupported value {value!r} (supported: {list(allowed)})")

  model_type = hf.get("model_type")
  if model_type not in (None, "deepseek_v3"):
    raise ValueError(f"config key 'model_type': expected 'deepseek_v3', got {model_type!r}")
  expect("topk_method", ("noaux_tc",), "noaux_tc")
  expect("scoring_func", ("sigmoid",), "sigmoid")
  expect("hidden_act", ("silu",), "silu")
  expect("moe_layer_freq", (1,), 1)
  expect("attention_bias", (False,), False)
  expect("tie_word_embeddings", (False,), False)
  expect("rope_interleave", (True, False), True)
  for key in ("use_sliding_window", "mlp_bias"):
    expect(key, (False,), False)

  n_heads = int(get("num_attention_heads"))
  kv_heads = hf.get("num_key_value_heads")
  if kv_heads is not None and n_heads % int(kv_heads) != 0:
    raise ValueError(
      f"config key 'num_key_value_heads': {kv_heads} does not divide num_attention_heads={n_heads}"
    )
  n_routed = int(get("n_routed_experts"))
  q_lora = hf.get("q_lora_rank")
  rope = _rope_from_hf(hf)
  return DeepseekV3Config(
    vocab_size=int(get("vocab_size")),
    hidden_size=int(get("hidden_size")),
    intermediate_size=int(get("intermediate_size")),
    moe_intermediate_size=int(get("moe_intermediate_size")),
    num_hidden_layers=int(get("num_hidden_layers")),
    num_attention_heads=n_heads,
    q_lora_rank=None if q_lora is None else int(q_lora),
    kv_lora_rank=int(get("kv_lora_rank")),
    qk_nope_head_dim=int(get("qk_nope_head_dim")),
    qk_rope_head_dim=int(get("qk_rope_head_dim")),
    v_head_dim=int(get("v_head_dim")),
    n_routed_experts=n_routed,
    n_shared_experts=int(get("n_shared_experts", 0)),
    num_experts_per_tok=int(get("num_experts_per_tok")),
    # Missing group keys: one group, i.e. no group limiting (transformers' defaults 8/4 would be V3's).
    n_group=int(get("n_group", 1)),
    topk_group=int(get("topk_group", 1)),
    routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
    norm_topk_prob=bool(get("norm_topk_prob", True)),
    first_k_dense_replace=int(get("first_k_dense_replace", 0)),
    rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
    rope=rope,
    rope_interleave=bool(get("rope_interleave", True)),
    max_position_embeddings=int(get("max_position_embeddings", 4096)),
  )


def _to_hf(c: DeepseekV3Config) -> dict[str, Any]:
  r = c.rope
  out: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "intermediate_size": c.intermediate_size,
    "moe_intermediate_size": c.moe_intermediate_size,
    "num_hidden_layers": c.num_hidden_layers,
    "num_nextn_predict_layers": 0,
    "num_attention_heads": c.num_attention_heads,
    "num_key_value_heads": c.num_attention_heads,
    "q_lora_rank": c.q_lora_rank,
    "kv_lora_rank": c.kv_lora_rank,
    "qk_nope_head_dim": c.qk_nope_head_dim,
    "qk_rope_head_dim": c.qk_rope_head_dim,
    "v_head_dim": c.v_head_dim,
    "n_routed_experts": c.n_routed_experts,
    "n_shared_experts": c.n_shared_experts,
    "num_experts_per_tok": c.num_experts_per_tok,
    "n_group": c.n_group,
    "topk_group": c.topk_group,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "routed_scaling_factor": c.routed_scaling_factor,
    "norm_topk_prob": c.norm_topk_prob,
    "first_k_dense_replace": c.first_k_dense_replace,
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "rms_norm_eps": c.rms_norm_eps,
    "rope_theta": r.theta,
    "rope_interleave": c.rope_interleave,
    "max_position_embeddings": c.max_position_embeddings,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
  }
  if r.kind is RopeKind.YARN:
    scaling: dict[str, Any] = {
      "type": "yarn",
      "factor": r.factor,
      "original_max_position_embeddings": r.original_max_position_embeddings,
      "beta_fast": r.beta_fast,
      "beta_slow": r.beta_slow,
    }
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
      if getattr(r, key) is not None:
        scaling[key] = getattr(r, key)
    if not r.truncate:
      scaling["truncate"] = False
    out["rope_scaling"] = scaling
  else:
    out["rope_scaling"] = None
  if not c.use_router_bias:
    raise ValueError(
      "to_hf_config: use_router_bias=False has no HF representation (transformers always has it)"
    )
  return out
