"""DeepseekV3Config: parsing DeepSeek's and transformers' config.json, validation, truncation."""

from __future__ import annotations

import copy
import math

import pytest

from dq3jax.model.config import DeepseekV3Config, RopeKind
from tests.model.hub_configs import V3_HUB, v3


def test_v3_hub_config():
  cfg = v3()
  assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.n_group, cfg.topk_group) == (61, 256, 8, 4)
  assert (
    cfg.rope.kind is RopeKind.YARN
    and cfg.rope.factor == 40
    and cfg.rope.original_max_position_embeddings == 4096
  )
  assert cfg.rope.cos_sin_factor == 1.0
  # Spec 2.1: 192^-1/2 * (1 + 0.1 ln 40)^2.
  assert cfg.softmax_scale == pytest.approx(192**-0.5 * (1 + 0.1 * math.log(40)) ** 2, rel=1e-15)
  # The spec's rounded 0.135236 is off in the 6th digit (it squares 1.368888 as 1.873862, not 1.873855).
  assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-7)
  assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


def test_transformers5_layout_parses_the_same():
  hf = copy.deepcopy(V3_HUB)
  scaling = hf.pop("rope_scaling")
  theta = hf.pop("rope_theta")
  hf["rope_parameters"] = {
    **{k: v for k, v in scaling.items() if k != "type"},
    "rope_type": "yarn",
    "rope_theta": theta,
  }
  assert DeepseekV3Config.from_hf_config(hf) == v3()


def test_rope_type_key_and_roundtrip():
  hf = copy.deepcopy(V3_HUB)
  hf["rope_scaling"]["rope_type"] = hf["rope_scaling"].pop("type")
  assert DeepseekV3Config.from_hf_config(hf) == v3()
  assert DeepseekV3Config.from_hf_config(v3().to_hf_config()) == v3()


def test_q_lora_null_and_no_rope_scaling():
  hf = {**V3_HUB, "q_lora_rank": None, "rope_scaling": None}
  cfg = DeepseekV3Config.from_hf_config(hf)
  assert cfg.q_lora_rank is None and cfg.rope.kind is RopeKind.DEFAULT
  assert cfg.softmax_scale == pytest.approx(192**-0.5, rel=1e-15)


@pytest.mark.parametrize(
  "change, key",
  [
    ({"topk_method": "greedy"}, "topk_method"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "bogus": 1}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000}}, "rope_scaling.type"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 8}}, "rope_scaling.factor"),
    ({"rope_theta": 5.0, "rope_parameters": {"rope_theta": 10000.0}}, "rope_theta"),
    ({"rope_scaling": {"factor": 40}}, "rope_scaling.type"),
    ({"first_k_dense_replace": 70}, "first_k_dense_replace"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
  ],
  ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_values_raise_naming_the_key(change, key):
  with pytest.raises(ValueError, match=f"'{key}'"):
    DeepseekV3Config.from_hf_config({**V3_HUB, **change})


def test_truncate_layers():
  cfg = v3().truncate(layers=2)
  assert cfg.num_hidden_layers == 2 and cfg.first_k_dense_replace == 2
  assert v3().truncate(layers=5).first_k_dense_replace == 3


@pytest.mark.parametrize(
  "experts, n_group, topk_group",
  [(256, 8, 4), (64, 2, 2), (160, 5, 4), (32, 1, 1), (16, 1, 1), (8, 1, 1)],
)
def test_truncate_experts_keeps_group_membership(experts, n_group, topk_group):
  cfg = v3().truncate(experts=experts)
  assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group) == (experts, n_group, topk_group)
  assert cfg.num_experts_per_tok == 8
  if n_group > 1:
    assert cfg.experts_per_group == 32


@pytest.mark.parametrize(
  "experts, match", [(4, "num_experts_per_tok"), (48, "group size"), (0, "must be in")]
)
def test_truncate_experts_errors(experts, match):
  with pytest.raises(ValueError, match=match):
    v3().truncate(experts=experts)


def test_truncated_configs_are_valid_whenever_accepted():
  # topk_group' = min(topk_group, n_group') keeps capacity min(topk_group * size, E) >= K once E >= K.
  hf = {**V3_HUB, "n_routed_experts": 32, "n_group": 8, "topk_group": 2, "num_experts_per_tok": 8}
  cfg = DeepseekV3Config.from_hf_config(hf)
  accepted = []
  for e in range(1, 33):
    try:
      small = cfg.truncate(experts=e)
    except ValueError:
      continue
    accepted.append(e)
    assert small.num_experts_per_tok <= small.topk_group * small.experts_per_group
  assert accepted == [8, 12, 16, 20, 24, 28, 32]


@pytest.mark.crosscheck
def test_transformers_written_config_parses():
  import transformers

  t = transformers.DeepseekV3Config(
    **{k: v for k, v in V3_HUB.items() if k not in ("architectures", "model_type")}
  )
  assert DeepseekV3Config.from_hf_config(t.to_dict()) == v3()
