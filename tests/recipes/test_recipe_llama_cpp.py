"""Cross-check: the `current` rule set against the real llama.cpp bundled with llama-cpp-python 0.3.36.

llama.cpp's own type selection (llama_quant_compute_types, src/llama-ext.h) is run on metadata-only tensors
and compared tensor by tensor with dq3jax's plan, for every built-in llama.cpp preset.
"""

import pytest

from dq3jax.recipes.builtin import PRESETS
from dq3jax.recipes.inventory import dims_from_config, inventory
from dq3jax.recipes.plan import make_plan, n_gqa_for
from dq3jax.recipes.recipe_file import resolve_recipe
from dq3jax.recipes.rules import RULE_SETS

pytestmark = [
  pytest.mark.crosscheck,
]


@pytest.fixture(scope="module")
def ref():
  from tests.recipes.llama_quant_ref import LlamaQuantRef

  return LlamaQuantRef()  # the pinned llama.cpp must expose its hooks: a failure here is a test failure


def test_bundled_llama_cpp_is_the_pinned_commit():
  import llama_cpp

  from tests.recipes.llama_quant_ref import bundled_commit_strings

  assert llama_cpp.__version__ == "0.3.36"
  assert RULE_SETS["current"].llama_cpp.startswith("0c1e570")
  assert any(s.startswith("0c1e570") for s in bundled_commit_strings())


CASES = [
  ("r1", None, None),
  ("r1", 7, 8),  # truncated, and exactly 8 experts: the Mixtral special cases
  ("r1", 20, 16),
  ("v2_lite", None, None),  # rows of 1408 / 10944: fallbacks; no q LoRA
  ("v2_lite", 5, 8),
]


@pytest.mark.parametrize(("model", "layers", "experts"), CASES)
@pytest.mark.parametrize("layout", ["kv_b", "split"])
def test_current_rules_match_llama_cpp(ref, r1_config, v2_lite_config, model, layers, experts, layout):
  cfg = r1_config if model == "r1" else v2_lite_config
  d = dims_from_config(cfg, layers=layers, experts=experts)
  inv = inventory(d, layout)
  for preset in PRESETS:
    got = ref.types(
      inv,
      preset=preset,
      n_layer=d.n_layer,
      n_head=d.n_head,
      n_head_kv=d.n_head // n_gqa_for(d, layout),
      n_expert=d.n_expert,
      n_embd=d.hidden,
    )
    plan = make_plan(inv, d, resolve_recipe(preset, rules="current"), RULE_SETS["current"], layout)
    mine = {t.name: t.type for t in plan.tensors}
    diff = {n: (got[n], mine[n]) for n in got if got[n] != mine[n]}
    assert diff == {}, f"{preset}: llama.cpp vs dq3jax {dict(list(diff.items())[:5])}"


def test_n_gqa_branch_matches_llama_cpp(ref, r1_config):
  # A pre-split tensor set in a file storing head_count_kv = 1 (n_gqa = 128) takes the Q2_K -> Q4_K branch.
  d = dims_from_config(r1_config, layers=4, experts=4)
  inv = inventory(d, "kv_b")
  got = ref.types(inv, preset="Q2_K", n_layer=4, n_head=128, n_head_kv=1, n_expert=4, n_embd=d.hidden)
  assert got["blk.2.attn_kv_b.weight"] == "Q4_K"
  from dq3jax.recipes.plan import tensor_env
  from dq3jax.recipes.rules import choose

  t = next(t for t in inv if t.name == "blk.2.attn_kv_b.weight")
  c = choose(t.name, t.ne, tensor_env(t, d, 128), resolve_recipe("Q2_K"), RULE_SETS["current"])
  assert c.type == "Q4_K"
