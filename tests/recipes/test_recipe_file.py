"""User recipe files (JSON)."""

import json

import pytest

from dq3jax.cli import main
from dq3jax.recipes.builtin import builtin_recipe
from dq3jax.recipes.plan import plan_from_config
from dq3jax.recipes.recipe_file import load_recipe_file, recipe_from_dict, resolve_recipe
from dq3jax.recipes.rules import RecipeError


def test_custom_recipe_with_base(tmp_path, r1_config):
  spec = {
    "name": "down-q6",
    "base": "Q3_K_M",
    "description": "ffn_down_exps at Q6_K in the first MoE layer, attn_k_b left in BF16",
    "keep": ["attn_k_b"],
    "rules": [{"match": r"ffn_down_exps\.weight$", "when": "m == 0", "type": "Q6_K", "source": "test"}],
  }
  path = tmp_path / "r.json"
  path.write_text(json.dumps(spec))
  r = load_recipe_file(path, rules="current")
  assert r.default_type == "Q3_K" and r.ftype == "Q3_K_M"
  assert r.rules[1:] == builtin_recipe("Q3_K_M", "current").rules
  by = plan_from_config(r1_config, r, rules="current", layout="split", layers=6, experts=2).by_name()
  assert by["blk.3.ffn_down_exps.weight"].type == "Q6_K"
  assert by["blk.3.ffn_down_exps.weight"].source == "test"
  assert by["blk.4.ffn_down_exps.weight"].type == "Q4_K"  # from the base
  assert by["blk.4.attn_k_b.weight"].type == "BF16" and not by["blk.4.attn_k_b.weight"].quantized
  assert resolve_recipe(str(path)).name == "down-q6"


def test_custom_recipe_without_base(r1_config):
  r = recipe_from_dict({"name": "flat", "default_type": "Q8_0", "rules": []})
  plan = plan_from_config(r1_config, r, layout="kv_b", layers=4, experts=2)
  assert {t.type for t in plan.tensors if t.quantized} == {"Q8_0"}


def test_builtin_recipes_round_trip_through_json(tmp_path, r1_config):
  for name in ("Q4_K_M", "DQ3_K_M"):
    r = builtin_recipe(name, "legacy")
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r.to_json()))
    back = load_recipe_file(path, rules="legacy")
    assert back == r
    a = plan_from_config(r1_config, r, rules="legacy", layout="kv_b")
    b = plan_from_config(r1_config, back, rules="legacy", layout="kv_b")
    assert a.total_bytes == b.total_bytes


@pytest.mark.parametrize(
  ("spec", "msg"),
  [
    ({"name": "x", "rules": []}, "default_type"),
    ({"name": "x", "default_type": "Q4_K", "rules": [], "colour": 1}, "unknown keys"),
    ({"name": "x", "default_type": "Q4_K", "rules": [{"match": "a"}]}, "rules\\[0\\]"),
    ({"name": "x", "default_type": "Q4_K", "rules": [{"match": "(", "type": "Q4_K"}]}, "bad regex"),
    ({"name": "x", "default_type": "Q4_K", "rules": [{"match": "a", "type": "Q7_K"}]}, "Q7_K"),
    (
      {"name": "x", "default_type": "Q4_K", "rules": [{"match": "a", "type": "Q4_K", "when": "j < 2"}]},
      "unknown name 'j'",
    ),
    ({"name": "x", "default_type": "Q8_K", "rules": []}, "not a storage type"),
    ({"name": "x", "base": "Q9_K", "rules": []}, "unknown recipe"),
    ({"name": "x", "default_type": "Q4_K", "rules": {}}, "must be a list"),
  ],
)
def test_bad_recipes(spec, msg):
  with pytest.raises(RecipeError, match=msg):
    recipe_from_dict(spec)


def test_bad_recipe_file_via_cli(tmp_path, r1_config, capsys):
  (tmp_path / "config.json").write_text(json.dumps(r1_config))
  (tmp_path / "bad.json").write_text("{not json")
  assert main(["plan", str(tmp_path), "--recipe", str(tmp_path / "bad.json")]) == 2
  assert "not valid JSON" in capsys.readouterr().err
  assert main(["plan", str(tmp_path), "--recipe", "NOPE"]) == 2
