"""Whole-model plans: the paper's Table 1, the spec's size table, and the `dq3jax plan` command."""

import json
import math

import pytest

from dq3jax.cli import main
from dq3jax.recipes.plan import gib_rounded_up, plan_from_config

# arXiv:2505.02390 Table 1 (DeepSeek-R1): model size in "G" (GiB rounded up) and average bits per weight.
TABLE_1 = {"Q4_K_M": (377, 4.82), "Q3_K_M": (298, 3.81), "DQ3_K_M": (281, 3.59), "Q2_K": (228, 2.91)}


@pytest.mark.parametrize("recipe", sorted(TABLE_1))
def test_paper_table_1(r1_config, recipe):
  plan = plan_from_config(r1_config, recipe, rules="legacy", layout="kv_b")
  g, bpw = TABLE_1[recipe]
  assert gib_rounded_up(plan.total_bytes) == g
  assert round(plan.bits_per_weight, 2) == bpw


# The spec (shared/specs/recipes.md) section 5 (GiB to 0.1, bpw to 0.001), legacy rules, pre-split tensor set.
SPEC_SIZES = {
  "Q2_K": (227.3, 2.909),
  "Q2_K_S": (209.2, 2.678),
  "Q3_K_S": (269.2, 3.446),
  "Q3_K_M": (297.3, 3.805),
  "Q3_K_L": (323.6, 4.142),
  "Q4_K_S": (353.9, 4.530),
  "Q4_K_M": (376.7, 4.822),
  "Q5_K_S": (430.1, 5.506),
  "Q5_K_M": (442.7, 5.668),
  "Q6_K": (513.0, 6.567),
  "Q8_0": (664.3, 8.504),
}


@pytest.mark.parametrize("recipe", sorted(SPEC_SIZES))
def test_spec_size_table(r1_config, recipe):
  plan = plan_from_config(r1_config, recipe, rules="legacy", layout="kv_b")
  gib, bpw = SPEC_SIZES[recipe]
  assert round(plan.total_bytes / 2**30, 1) == gib
  assert round(plan.bits_per_weight, 3) == bpw


def test_bartowski_published_totals(r1_config):
  # Published V3/R1 GGUF totals (GB = 1e9 bytes), equal to the rules' prediction to 0.1 GB.
  for recipe, gb in {"Q4_K_M": 404.4, "Q5_K_M": 475.4, "Q6_K": 550.8, "Q8_0": 713.3}.items():
    plan = plan_from_config(r1_config, recipe, rules="legacy", layout="kv_b")
    assert round(plan.total_bytes / 1e9, 1) == gb


def test_dq3_k_m_is_smaller_than_q3_k_m_in_both_rule_sets(r1_config):
  for rules in ("legacy", "current"):
    for layout in ("kv_b", "split"):
      dq3 = plan_from_config(r1_config, "DQ3_K_M", rules=rules, layout=layout)
      q3 = plan_from_config(r1_config, "Q3_K_M", rules=rules, layout=layout)
      assert dq3.total_bytes < q3.total_bytes
      assert gib_rounded_up(dq3.total_bytes) == 281


def test_totals_are_sums_and_params_match_v3(r1_config):
  plan = plan_from_config(r1_config, "Q4_K_M", rules="current", layout="split")
  assert plan.total_params == sum(t.params for t in plan.tensors)
  assert round(plan.total_params / 1e9, 2) == 671.03
  assert plan.bits_per_weight == plan.total_bytes * 8 / plan.total_params


def test_cli_json(tmp_path, r1_config, capsys):
  cfg = tmp_path / "config.json"
  cfg.write_text(json.dumps(r1_config))
  rc = main(["plan", str(tmp_path), "--recipe", "DQ3_K_M", "--layout", "kv_b", "--rules", "legacy", "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert set(out["totals"]) == {"bytes", "bits_per_weight", "params"}
  assert math.ceil(out["totals"]["bytes"] / 2**30) == 281
  assert round(out["totals"]["bits_per_weight"], 2) == 3.59
  assert out["layout"] == "kv_b" and out["rules"] == "legacy" and out["recipe"] == "DQ3_K_M"
  t = {x["name"]: x for x in out["tensors"]}
  assert t["blk.3.ffn_down_exps.weight"]["type"] == "Q6_K"
  assert t["blk.3.ffn_down_exps.weight"]["shape"] == [2048, 7168, 256]
  assert t["blk.3.ffn_down_exps.weight"]["bytes"] == 2048 // 256 * 210 * 7168 * 256
  assert t["blk.3.ffn_gate_inp.weight"]["type"] == "F32"
  assert sum(x["bytes"] for x in out["tensors"]) == out["totals"]["bytes"]


def test_cli_table_and_truncation(tmp_path, r1_config, capsys):
  cfg = tmp_path / "config.json"
  cfg.write_text(json.dumps(r1_config))
  rc = main(["plan", str(cfg), "--recipe", "Q4_K_M", "--layers", "5", "--experts", "4"])
  assert rc == 0
  out = capsys.readouterr().out
  assert "blk.4.ffn_down_exps.weight" in out and "[2048, 7168, 4]" in out
  assert "blk.5." not in out
  assert "bits/weight" in out


def test_cli_errors(tmp_path, capsys):
  assert main(["plan", str(tmp_path / "missing.json"), "--recipe", "Q4_K_M"]) == 2
  (tmp_path / "config.json").write_text("{}")
  assert main(["plan", str(tmp_path), "--recipe", "Q4_K_M"]) == 2
  assert "num_hidden_layers" in capsys.readouterr().err


def test_cli_llama_tensor_types(tmp_path, r1_config, capsys):
  (tmp_path / "config.json").write_text(json.dumps(r1_config))
  assert main(["plan", str(tmp_path), "--recipe", "DQ3_K_M", "--layout", "kv_b", "--llama-tensor-types"]) == 0
  cap = capsys.readouterr()
  lines = cap.out.split()
  assert r"^blk\.(3|4)\.ffn_down_exps\.weight$=q6_k" in lines
  assert all("=" in x for x in lines)
  assert "Q3_K_M" in cap.err
  # With current rules attn_kv_b overrides must cover every layer (llama.cpp's attn_v counter).
  kvb = [x for x in lines if "attn_kv_b" in x]
  assert kvb == [r"^blk\.(" + "|".join(map(str, range(61))) + r")\.attn_kv_b\.weight$=q4_k"]


def test_cli_with_imatrix_plans_as_llama_quantize_given_one(tmp_path, r1_config, capsys):
  # IQ4_XS keeps the first eighth of ffn_down (R1: layers 0-7) in Q5_K only without an importance matrix
  # (llama.cpp's general branch); with one they stay IQ4_XS: 8 tensors of 7168 x 2048 x 256 (or 18432 for the
  # 3 dense layers), IQ4_XS 136 bytes per 256 against Q5_K's 176.
  cfg = tmp_path / "config.json"
  cfg.write_text(json.dumps(r1_config))
  out = {}
  for flag in ([], ["--with-imatrix"]):
    assert main(["plan", str(tmp_path), "--recipe", "IQ4_XS", "--json", *flag]) == 0
    out[bool(flag)] = json.loads(capsys.readouterr().out)
  assert (out[False]["imatrix"], out[True]["imatrix"]) == (False, True)
  without = {t["name"]: t["type"] for t in out[False]["tensors"]}
  given = {t["name"]: t["type"] for t in out[True]["tensors"]}
  changed = sorted(n for n in given if given[n] != without[n])
  assert changed and all("ffn_down" in n for n in changed)
  assert {without[n] for n in changed} == {"Q5_K"} and {given[n] for n in changed} == {"IQ4_XS"}
  by_name = {t["name"]: t for t in out[True]["tensors"]}
  saved = sum(by_name[n]["params"] // 256 * (176 - 136) for n in changed)
  assert out[False]["totals"]["bytes"] - out[True]["totals"]["bytes"] == saved
