"""User recipe files (JSON) and resolution of a `--recipe` argument.

Schema (all keys except `name` and `rules` optional; unknown keys are an error):

    {
      "name": "my-recipe",
      "base": "Q3_K_M",           # a built-in recipe; its rules (for the chosen rule set) run after ours,
                                  # and its default_type / ftype are inherited unless given here
      "default_type": "Q3_K",     # type of quantized tensors no rule matches (required without "base")
      "ftype": "Q3_K_M",          # llama.cpp preset whose driver behaviour applies (Q2_K_S imatrix rule)
      "description": "free text",
      "keep": ["attn_k_b"],       # regexes of tensors to leave in their source type
      "rules": [                  # ordered; the first rule whose regex and condition match decides
        {"match": "ffn_down_exps\\.weight$",     # re.search on the GGUF tensor name
         "when": "m < 2",                         # optional integer condition, see dq3jax/recipes/expr.py
         "type": "Q6_K",                          # ggml type name
         "source": "why this rule exists"}        # optional provenance, reported per tensor
      ]
    }

Condition variables: i (layer of `blk.i.`), n (layers of the model planned, after truncation), k
(first_k_dense_replace), m (= i - k on MoE layers, undefined on dense ones), n_moe (= n - k), n_gqa, n_expert
(after truncation), ne0/ne1/ne2 (ggml shape), ffn_down_idx (the tensor's position among the quantized
ffn_down tensors in llama-quantize's visit order), imatrix (1 when planning with an importance matrix);
function use_more_bits(i, n); `//` and `%` truncate like C.
A condition that mentions a variable the tensor lacks (i on token_embd, m on a dense layer) is false.
Rules written in these terms scale to truncated models by construction.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from dq3jax.recipes.builtin import BUILTIN, builtin_recipe
from dq3jax.recipes.rules import Recipe, RecipeError, Rule

_TOP_KEYS = {"name", "base", "default_type", "ftype", "description", "keep", "rules"}
_RULE_KEYS = {"match", "when", "type", "source"}


def recipe_from_dict(d: Mapping[str, Any], *, rules: str = "current", where: str = "recipe") -> Recipe:
  """A Recipe from its JSON form (README, "Recipes as data"); RecipeError naming `where` and the bad key."""
  if not isinstance(d, Mapping):
    raise RecipeError(f"{where}: expected a JSON object")
  extra = set(d) - _TOP_KEYS
  if extra:
    raise RecipeError(f"{where}: unknown keys {sorted(extra)}; allowed: {sorted(_TOP_KEYS)}")
  if "name" not in d or "rules" not in d:
    raise RecipeError(f"{where}: 'name' and 'rules' are required")
  if not isinstance(d["rules"], list):
    raise RecipeError(f"{where}: 'rules' must be a list")
  own: list[Rule] = []
  for k, r in enumerate(d["rules"]):
    if not isinstance(r, Mapping) or "match" not in r or "type" not in r or set(r) - _RULE_KEYS:
      raise RecipeError(
        f"{where}: rules[{k}] must be an object with 'match' and 'type' and only {sorted(_RULE_KEYS)}"
      )
    try:
      own.append(
        Rule(
          match=str(r["match"]),
          type=str(r["type"]),
          when=r.get("when"),
          source=str(r.get("source", f"{d['name']} rules[{k}]")),
        )
      )
    except RecipeError as e:
      raise RecipeError(f"{where}: rules[{k}]: {e}") from None
  base = builtin_recipe(d["base"], rules) if d.get("base") else None
  default_type = d.get("default_type") or (base.default_type if base else None)
  if default_type is None:
    raise RecipeError(f"{where}: 'default_type' is required when there is no 'base'")
  keep = d.get("keep", [])
  if not isinstance(keep, list) or not all(isinstance(x, str) for x in keep):
    raise RecipeError(f"{where}: 'keep' must be a list of regex strings")
  return Recipe(
    name=str(d["name"]),
    default_type=str(default_type),
    rules=tuple(own) + (base.rules if base else ()),
    keep=tuple(keep),
    description=str(d.get("description", "")),
    ftype=d.get("ftype") or (base.ftype if base else None),
  )


def load_recipe_file(path: str | pathlib.Path, *, rules: str = "current") -> Recipe:
  """The Recipe a JSON recipe file describes (see recipe_from_dict)."""
  p = pathlib.Path(path)
  try:
    d = json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise RecipeError(f"{p}: not valid JSON: {e}") from None
  return recipe_from_dict(d, rules=rules, where=str(p))


def resolve_recipe(arg: str, *, rules: str = "current") -> Recipe:
  """A built-in recipe name, or the path of a JSON recipe file."""
  if arg.strip().upper() in BUILTIN:
    return builtin_recipe(arg, rules)
  p = pathlib.Path(arg)
  if p.suffix == ".json" or p.is_file():
    if not p.is_file():
      raise RecipeError(f"recipe file {arg} does not exist")
    return load_recipe_file(p, rules=rules)
  raise RecipeError(f"unknown recipe {arg!r}; built in: {', '.join(BUILTIN)} (or a path to a .json file)")
