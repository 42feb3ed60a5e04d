"""Sensitivity units, their recipes, and the ranking on models built so that one class must dominate."""

from __future__ import annotations

import copy

import pytest

from dq3jax.ablate import run as ablate
from dq3jax.ablate import sensitivity
from dq3jax.convert.quantize import plan_for
from dq3jax.io import gguf_layout
from dq3jax.model import presets


def test_units_of_the_embedded_default():
  cfg = presets.preset("v3-mini-256").config  # 3 layers: 0 dense, 1-2 MoE
  units = sensitivity.units(gguf_layout.tensors(cfg, "split"), cfg.num_hidden_layers)
  labels = [u.label for u in units]
  assert [u.cls for u in units if u.group == "all"] == list(sensitivity.CLASS_KEYS)
  assert "attention [layer 0]" in labels and "ffn_down_exps [layer 2]" in labels
  # The dense MLP lives in layer 0 only: its layer unit would repeat the whole class.
  assert not any(lb.startswith("dense_mlp [") for lb in labels) and "ffn_up_exps [layer 0]" not in labels
  by = {u.label: u for u in units}
  assert set(by["attention [layer 1]"].tensors) == {
    f"blk.1.{n}.weight"
    for n in ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output")
  }
  assert set(by["dense_mlp"].tensors) == {
    "blk.0.ffn_gate.weight",
    "blk.0.ffn_up.weight",
    "blk.0.ffn_down.weight",
  }
  assert by["token_embd"].tensors == ("token_embd.weight",) and by["output"].tensors == ("output.weight",)
  assert (
    len(units) == 8 + 3 + 2 + 3 * 2
  )  # classes, attention per layer, shexp and the three exps in 2 MoE layers


def test_layer_groups():
  assert sensitivity.layer_groups(3) == [("layer 0", (0,)), ("layer 1", (1,)), ("layer 2", (2,))]
  assert sensitivity.layer_groups(10) == [
    ("layers 0-3", (0, 1, 2, 3)), ("layers 4-6", (4, 5, 6)), ("layers 7-9", (7, 8, 9))
  ]  # fmt: skip
  assert sensitivity.grouping(61) == "thirds"


@pytest.mark.parametrize("rules, fallback", [("current", "Q4_0"), ("legacy", "IQ4_NL")])
def test_unit_recipe_quantizes_only_the_unit_with_llama_fallbacks(rules, fallback):
  cfg = presets.preset("v3-mini-256").config
  units = {u.label: u for u in sensitivity.units(gguf_layout.tensors(cfg, "split"), cfg.num_hidden_layers)}
  unit = units["attention [layer 2]"]
  plan = plan_for(cfg, sensitivity.unit_recipe(unit, "Q2_K"), rules, "split")
  for t in plan.tensors:
    if t.name in unit.tensors:
      # attn_k_b rows are 64 wide: Q2_K does not fit, llama.cpp falls back.
      assert t.type == (fallback if "attn_k_b" in t.name else "Q2_K"), t.name
    else:
      assert t.type == "F32", t.name


def _ranked(params_edit, low="Q2_K"):
  spec = ablate.AblationSpec(checkpoint="builtin:v3-tiny", layers=2, recipes=("F32",), ctx=16, sequences=4,
                             sensitivity=True, sensitivity_type=low)  # fmt: skip
  s = ablate.setup(spec)
  _, params = presets.params_of("v3-tiny")
  params = copy.deepcopy(ablate.truncate_params(params, s.config))
  for layer in params["layers"]:
    params_edit(layer)
  return ablate.run(s, params=params).sensitivity


def test_negligible_attention_ranks_last():
  # Attention output scaled by 1e-3: its branch hardly touches the residual stream, so quantizing it adds
  # (almost) nothing, while every other class still matters.
  def edit(layer):
    layer["attn"]["wo"] = layer["attn"]["wo"] * 1e-3

  sens = _ranked(edit)
  classes = sens.classes
  assert classes[-1].unit.cls == "attention"
  assert classes[-1].stats.kld_mean < 1e-4 * classes[-2].stats.kld_mean
  assert classes[0].stats.kld_mean >= classes[1].stats.kld_mean  # ranked
  # The per-layer units of attention are negligible too.
  assert all(u.stats.kld_mean < 1e-6 for u in sens.groups if u.unit.cls == "attention")


def test_dominant_attention_ranks_first():
  # Attention output x30 and every MLP's down projection x1e-3: the residual stream is attention's.
  def edit(layer):
    layer["attn"]["wo"] = layer["attn"]["wo"] * 30
    mlp = layer["mlp"]
    for part in (mlp, mlp.get("shared"), mlp.get("experts")):
      if part is not None and "w_down" in part:
        part["w_down"] = part["w_down"] * 1e-3

  classes = _ranked(edit).classes
  assert classes[0].unit.cls == "attention"
  assert classes[0].stats.kld_mean > 2 * classes[1].stats.kld_mean
  mlp_like = [
    u for u in classes if u.unit.cls in ("dense_mlp", "shared_experts") or u.unit.cls.endswith("_exps")
  ]
  assert all(u.stats.kld_mean < 1e-3 * classes[0].stats.kld_mean for u in mlp_like)
