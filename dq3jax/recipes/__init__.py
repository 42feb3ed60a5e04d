"""Quantization recipes as data: which ggml type llama-quantize (or DQ3_K_M) gives each deepseek2 tensor.

Modules: `inventory` (tensor list from an HF config), `rules` (recipe model, driver rules, rule sets,
fallbacks), `builtin` (llama.cpp presets and DQ3_K_M), `recipe_file` (user JSON recipes), `expr` (the rule
condition language), `sizes` (bytes per type, incl. size-only types), `plan` (the `dq3jax plan` command).
"""

from dq3jax.recipes.builtin import BUILTIN, builtin_recipe
from dq3jax.recipes.inventory import dims_from_config, inventory, inventory_from_config
from dq3jax.recipes.plan import Plan, make_plan, plan_from_config
from dq3jax.recipes.recipe_file import load_recipe_file, recipe_from_dict, resolve_recipe
from dq3jax.recipes.rules import RULE_SETS, Recipe, RecipeError, Rule

__all__ = [
  "BUILTIN",
  "RULE_SETS",
  "Plan",
  "Recipe",
  "RecipeError",
  "Rule",
  "builtin_recipe",
  "dims_from_config",
  "inventory",
  "inventory_from_config",
  "load_recipe_file",
  "make_plan",
  "plan_from_config",
  "recipe_from_dict",
  "resolve_recipe",
]
