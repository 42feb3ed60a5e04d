"""Per-tensor rules: use_more_bits, ordering, fallbacks, driver rules, truncation scaling, DQ3_K_M."""

import collections

import pytest

from dq3jax.recipes import expr
from dq3jax.recipes.builtin import IQ_PRESETS, builtin_recipe
from dq3jax.recipes.plan import plan_from_config
from dq3jax.recipes.rules import (
  RULE_SETS,
  Recipe,
  RecipeError,
  Rule,
  apply_fallback,
  choose,
  is_quantized,
  requires_imatrix,
)


def test_use_more_bits_layers_for_61():
  got = {i for i in range(61) if expr.use_more_bits(i, 61)}
  assert got == set(range(7)) | set(range(9, 52, 3)) | set(range(53, 61))
  assert len(got) == 30


def _types(plan, suffix):
  return {t.name.split(".")[1]: t.type for t in plan.tensors if t.name.endswith(suffix)}


def test_q4_k_m_ffn_down_follows_use_more_bits(r1_config):
  plan = plan_from_config(r1_config, "Q4_K_M", rules="legacy", layout="kv_b")
  for suffix in ("ffn_down_exps.weight", "ffn_down_shexp.weight", ".ffn_down.weight"):
    for layer, t in _types(plan, suffix).items():
      assert t == ("Q6_K" if expr.use_more_bits(int(layer), 61) else "Q4_K"), (suffix, layer)


def test_attn_kv_b_differs_between_rule_sets(r1_config):
  legacy = plan_from_config(r1_config, "Q3_K_M", rules="legacy", layout="kv_b")
  current = plan_from_config(r1_config, "Q3_K_M", rules="current", layout="kv_b")
  assert set(_types(legacy, "attn_kv_b.weight").values()) == {"Q3_K"}
  cur = _types(current, "attn_kv_b.weight")
  assert cur["0"] == cur["1"] == "Q5_K" and {cur[str(i)] for i in range(2, 61)} == {"Q4_K"}
  # Q2_K: n_gqa = 128/128 = 1 in pre-split files -> Q3_K.
  q2 = plan_from_config(r1_config, "Q2_K", rules="current", layout="kv_b")
  assert set(_types(q2, "attn_kv_b.weight").values()) == {"Q3_K"}


def test_q3_k_m_assignment_table(r1_config):
  by = plan_from_config(r1_config, "Q3_K_M", rules="legacy", layout="kv_b").by_name()
  assert by["token_embd.weight"].type == "Q3_K"
  assert by["output.weight"].type == "Q6_K"
  assert by["blk.10.attn_output.weight"].type == "Q4_K"
  assert by["blk.0.ffn_down.weight"].type == "Q5_K"  # i < 61 // 16 = 3: the dense layers
  assert by["blk.3.ffn_down_exps.weight"].type == "Q4_K"
  assert by["blk.3.ffn_gate_exps.weight"].type == "Q3_K"
  assert by["blk.3.attn_q_b.weight"].type == "Q3_K"


def test_driver_rules(r1_config):
  plan = plan_from_config(r1_config, "Q4_K_M", rules="current", layout="split")
  for t in plan.tensors:
    if len(t.ne) == 1 or "_norm" in t.name or "ffn_gate_inp" in t.name or t.name.endswith(".bias"):
      assert not t.quantized and t.type == "F32", t.name
    else:
      assert t.quantized, t.name
  r = builtin_recipe("Q4_K_M")
  assert is_quantized("blk.3.exp_probs_b.bias", (256,), r)[0] is False
  assert is_quantized("foo.bias", (16, 16), r)[0] is False  # not ending in 'weight'
  assert is_quantized("x.weight", (16, 1), r)[0] is False  # ggml_n_dims ignores trailing 1s


def test_rule_order_first_match_wins():
  env = {
    "i": 5,
    "n": 61,
    "k": 3,
    "m": 2,
    "n_moe": 58,
    "n_gqa": 1,
    "n_expert": 256,
    "ne0": 2048,
    "ne1": 7168,
    "ne2": 256,
  }
  a = Rule(match="ffn_down", type="Q6_K", source="a")
  b = Rule(match="ffn_down_exps", type="Q5_K", source="b")
  rs = RULE_SETS["current"]
  name, ne = "blk.5.ffn_down_exps.weight", (2048, 7168, 256)
  assert choose(name, ne, env, Recipe(name="x", default_type="Q4_K", rules=(a, b)), rs).source == "a"
  assert choose(name, ne, env, Recipe(name="x", default_type="Q4_K", rules=(b, a)), rs).type == "Q5_K"
  # A rule whose condition fails lets the next one decide; none matching gives the default.
  c = Rule(match="ffn_down", when="i > 10", type="Q8_0")
  assert choose(name, ne, env, Recipe(name="x", default_type="Q4_K", rules=(c, b)), rs).type == "Q5_K"
  assert choose(name, ne, env, Recipe(name="x", default_type="Q4_K", rules=(c,)), rs).source == "default"


@pytest.mark.parametrize(
  ("rules", "target", "ne0", "want"),
  [
    ("legacy", "Q2_K", 128, "IQ4_NL"),
    ("current", "Q2_K", 128, "Q4_0"),
    ("legacy", "Q3_K", 1408, "IQ4_NL"),
    ("current", "Q3_K", 1408, "Q4_0"),
    ("legacy", "Q4_K", 128, "Q5_0"),
    ("current", "Q4_K", 128, "Q5_0"),
    ("legacy", "Q5_K", 10944, "Q5_1"),
    ("current", "Q5_K", 10944, "Q5_1"),
    ("legacy", "Q6_K", 128, "Q8_0"),
    ("current", "Q6_K", 128, "Q8_0"),
    ("legacy", "Q4_K", 100, "F16"),
    ("current", "Q3_K", 100, "F16"),  # not a multiple of 32 either
    ("current", "Q8_0", 100, "F16"),
    ("current", "Q4_K", 512, "Q4_K"),
  ],
)
def test_fallbacks(rules, target, ne0, want):
  assert apply_fallback("t.weight", ne0, target, RULE_SETS[rules]) == want


def test_legacy_32_block_mismatch_is_an_error():
  with pytest.raises(RecipeError, match="Unsupported tensor size"):
    apply_fallback("t.weight", 100, "Q8_0", RULE_SETS["legacy"])


def test_attn_k_b_falls_back_in_split_files(r1_config):
  for rules, want in (("legacy", "IQ4_NL"), ("current", "Q4_0")):
    by = plan_from_config(r1_config, "Q2_K", rules=rules, layout="split").by_name()
    t = by["blk.7.attn_k_b.weight"]
    assert (t.type, t.fallback_from) == (want, "Q2_K")
    assert t.bytes == 128 // 32 * 18 * 512 * 128
    assert by["blk.7.attn_v_b.weight"].type == "Q2_K"  # ne0 = 512 fits


def test_v2_lite_fallbacks(v2_lite_config):
  # Expert width 1408 and dense width 10944 are not multiples of 256.
  for rules, q3_fb in (("legacy", "IQ4_NL"), ("current", "Q4_0")):
    by = plan_from_config(v2_lite_config, "Q3_K_M", rules=rules, layout="kv_b").by_name()
    assert by["blk.1.ffn_down_exps.weight"].type == "Q5_0"  # Q4_K target
    assert by["blk.0.ffn_down.weight"].type == "Q5_1"  # Q5_K target (dense, i < 27 // 16)
    assert by["blk.1.ffn_gate_exps.weight"].type == "Q3_K"  # ne0 = hidden 2048
    assert by["blk.0.attn_q.weight"].type == "Q3_K"  # no q LoRA
    assert "blk.1.exp_probs_b.bias" not in by  # greedy top-k has no bias
    q2 = plan_from_config(v2_lite_config, "Q2_K", rules=rules, layout="kv_b").by_name()
    assert q2["blk.1.ffn_down_exps.weight"].type == q3_fb  # Q2_K -> Q3_K rule, then ne0 1408 falls back
    assert q2["blk.1.ffn_down_shexp.weight"].type == "Q3_K"  # ne0 = 2 x 1408 = 2816 = 11 x 256 fits


def test_truncation_scales_layer_rules(r1_config):
  n = 16
  plan = plan_from_config(r1_config, "Q4_K_M", rules="legacy", layout="kv_b", layers=n, experts=4)
  got = {int(k) for k, t in _types(plan, "ffn_down_exps.weight").items() if t == "Q6_K"}
  assert got == {i for i in range(3, n) if expr.use_more_bits(i, n)} == {4, 7, 10, 13, 14, 15}
  q3 = plan_from_config(r1_config, "Q3_K_M", rules="legacy", layout="kv_b", layers=n)
  assert _types(q3, ".ffn_down.weight") == {"0": "Q5_K", "1": "Q4_K", "2": "Q4_K"}  # i < 16 // 16


def test_dq3_k_m_composition(r1_config):
  plan = plan_from_config(r1_config, "DQ3_K_M", rules="legacy", layout="kv_b")
  down = _types(plan, "ffn_down_exps.weight")
  assert collections.Counter(down.values()) == {"Q3_K": 44, "Q4_K": 12, "Q6_K": 2}
  assert {k for k, v in down.items() if v == "Q6_K"} == {"3", "4"}
  assert sorted(int(k) for k, v in down.items() if v == "Q4_K") == list(range(7, 52, 4))
  by = plan.by_name()
  assert by["blk.3.ffn_down_exps.weight"].source.startswith("documented")
  assert by["blk.3.attn_output.weight"].type == "Q5_K"
  assert by["blk.3.attn_output.weight"].source.startswith("reconstructed")
  assert by["output.weight"].type == "Q6_K" and by["token_embd.weight"].type == "Q3_K"
  assert by["blk.0.ffn_down.weight"].type == "Q6_K" and by["blk.0.ffn_up.weight"].type == "Q4_K"
  assert by["blk.9.ffn_down_shexp.weight"].type == "Q5_K" and by["blk.9.ffn_up_shexp.weight"].type == "Q4_K"
  # Parameter split inside ffn_down_exps: 75.9 % / 20.7 % / 3.4 % as the paper states.
  assert [round(100 * c / 58, 1) for c in (44, 12, 2)] == [75.9, 20.7, 3.4]


def test_dq3_k_m_truncated(r1_config):
  # "first two MoE layers" = the first two layers >= first_k_dense_replace, whatever n is.
  plan = plan_from_config(r1_config, "DQ3_K_M", rules="current", layout="split", layers=8, experts=2)
  down = _types(plan, "ffn_down_exps.weight")
  assert down == {"3": "Q6_K", "4": "Q6_K", "5": "Q4_K", "6": "Q3_K", "7": "Q3_K"}  # 8 // 8 = 1: 1, 5
  by = plan.by_name()
  assert by["blk.3.attn_k_b.weight"].type == "Q5_0"  # Q4_K on a 128-wide row falls back
  assert by["blk.3.attn_v_b.weight"].type == "Q4_K"


def test_eight_expert_bumps(r1_config):
  # llama.cpp special-cases exactly 8 experts (Mixtral); a model truncated to 8 experts gets them too.
  by = plan_from_config(r1_config, "Q3_K_M", rules="current", layout="kv_b", layers=4, experts=8).by_name()
  assert by["blk.3.attn_output.weight"].type == "Q5_K"
  assert by["blk.3.attn_kv_b.weight"].type == "Q8_0"
  by = plan_from_config(r1_config, "Q3_K_L", rules="current", layout="kv_b", layers=4, experts=8).by_name()
  assert by["blk.3.attn_output.weight"].type == "Q3_K"


def test_q2_k_s_requires_imatrix(r1_config):
  by = plan_from_config(r1_config, "Q2_K_S", rules="current", layout="kv_b").by_name()
  assert by["blk.10.ffn_up_exps.weight"].requires_imatrix
  assert not by["token_embd.weight"].requires_imatrix  # Q2_K too, but exempt
  assert not by["blk.3.ffn_down_exps.weight"].requires_imatrix  # Q4_K (i < 61 // 8)


def test_iq2_ffn_down_follows_the_running_counter(r1_config):
  # The IQ1/IQ2 presets bump ffn_down while llama.cpp's ffn_down counter is below n / 8 = 7: the three dense
  # layers, then two tensors (exps, shexp) per MoE layer, so layers 0-4 and not 5-6 as a layer rule would.
  plan = plan_from_config(r1_config, "IQ2_XXS", rules="current", layout="split")
  low = sorted({t.name for t in plan.tensors if "ffn_down" in t.name and t.type == "Q2_K"})
  assert low == sorted(
    [f"blk.{i}.ffn_down.weight" for i in range(3)]
    + [f"blk.{i}.ffn_down_{k}.weight" for i in (3, 4) for k in ("exps", "shexp")]
  )
  assert not any(t.requires_imatrix for t in plan.tensors if t.type == "Q2_K")


def test_imatrix_requirement_differs_between_rule_sets(r1_config):
  # current: IQ3_XXS tensors need one too; token_embd and output never. legacy: IQ3_XXS did not, and only
  # IQ1_M exempted token_embd / output.
  cur, old = RULE_SETS["current"], RULE_SETS["legacy"]
  r = Recipe(name="x", default_type="IQ2_XXS", rules=())
  assert requires_imatrix("blk.0.ffn_up.weight", "IQ3_XXS", r, cur)
  assert not requires_imatrix("blk.0.ffn_up.weight", "IQ3_XXS", r, old)
  assert not requires_imatrix("output.weight", "IQ2_XXS", r, cur)
  assert requires_imatrix("output.weight", "IQ2_XXS", r, old)
  assert not requires_imatrix("output.weight", "IQ1_M", r, old)
  assert not requires_imatrix("blk.0.ffn_up.weight", "IQ4_XS", r, cur)
  xs = {rs: plan_from_config(r1_config, "IQ3_XS", rules=rs, layout="split") for rs in ("current", "legacy")}
  assert {t.type for t in xs["current"].tensors if t.requires_imatrix} == {"IQ3_XXS"}
  assert not any(t.requires_imatrix for t in xs["legacy"].tensors)


def test_imatrix_changes_only_iq3_xxs_and_iq4_presets(r1_config):
  for preset in IQ_PRESETS:
    a = plan_from_config(r1_config, preset, layout="kv_b").by_name()
    b = plan_from_config(r1_config, preset, layout="kv_b", imatrix=True).by_name()
    diff = {n for n in a if a[n].type != b[n].type}
    if preset in ("IQ4_NL", "IQ4_XS"):
      # Q5_K for the first eighth of ffn_down only without an imatrix
      assert diff and all("ffn_down" in n and a[n].type == "Q5_K" for n in diff), preset
    elif preset == "IQ3_XXS":
      assert {a[n].type for n in diff} == {"IQ3_S", "Q4_K", "Q3_K"}
      assert {b[n].type for n in diff} == {"IQ3_XXS"}
    else:
      assert diff == set(), preset


def test_expression_language():
  env = {"i": 9, "n": 61}
  assert expr.evaluate("use_more_bits(i, n)", env)
  assert expr.evaluate("n // 8 <= i < 7 * n // 8", env)
  assert not expr.evaluate("m < 2", env)  # m is undefined here: no match
  assert expr.evaluate("-7 // 2 == -3 and -7 % 2 == -1", env)  # C semantics
  for bad in ("__import__('os')", "i.real", "open", "[i]", "i if n else 0", "1.5 < i", "'a'"):
    with pytest.raises(expr.ExprError):
      expr.compile_condition(bad)


@pytest.mark.parametrize(
  "preset", ["Q2_K", "Q2_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q8_0", *IQ_PRESETS]
)
def test_legacy_differs_from_current_only_where_documented(r1_config, v2_lite_config, preset):
  # The current rules are checked against the real llama.cpp; legacy must differ only in attn_kv_b's branch
  # and in the Q2_K/Q3_K fallback.
  for cfg in (r1_config, v2_lite_config):
    for layout in ("kv_b", "split"):
      old = plan_from_config(cfg, preset, rules="legacy", layout=layout).by_name()
      new = plan_from_config(cfg, preset, rules="current", layout=layout).by_name()
      for name, t in old.items():
        if t.type == new[name].type:
          continue
        assert name.endswith("attn_kv_b.weight") or (
          t.type == "IQ4_NL" and new[name].type == "Q4_0" and t.fallback_from in ("Q2_K", "Q3_K")
        ), (name, t.type, new[name].type)


def test_size_only_types():
  from dq3jax.qtypes import REGISTRY
  from dq3jax.recipes.sizes import tensor_bytes, type_size

  # Sizes come from the registry alone, also for the types without a quantizer.
  assert type_size("iq4_nl") is REGISTRY[20] and type_size("IQ4_NL").computable
  assert not type_size("IQ2_XXS").computable and not type_size("TQ1_0").dequantizable
  assert type_size("Q4_K").computable
  assert tensor_bytes("IQ4_NL", (128, 512, 128)) == 4 * 18 * 512 * 128
  with pytest.raises(ValueError, match="not a storage type"):
    type_size("Q8_1")
  # The i-quants of published DeepSeek mixes are sized too (a plan or a GGUF header can name them).
  assert tensor_bytes("IQ2_XXS", (7168, 2048)) == 7168 // 256 * 66 * 2048
  with pytest.raises(ValueError, match="plannable types: BF16, F16, F32, IQ1_M, IQ1_S, IQ2_S"):
    type_size("IQ5_K")  # an ik_llama.cpp type: neither ggml nor the registry knows it
  assert tensor_bytes("F32", (7168,)) == 4 * 7168
  with pytest.raises(ValueError, match="multiple of the block"):
    tensor_bytes("Q4_K", (128, 4))
