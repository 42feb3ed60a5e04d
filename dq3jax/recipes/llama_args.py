"""Express a plan as llama-quantize `--tensor-type` overrides, so the real tool can produce the file.

Run llama-quantize with the recipe's `ftype` preset plus these overrides (e.g. via `--tensor-type-file`): each
override names exactly the tensors whose rule choice differs from the preset's, so first-match (current
llama.cpp) and last-match (paper era) semantics agree. The type given is the rule's choice before the shape
fallback, which current llama.cpp then applies itself. The paper-era llama.cpp (March 2025) had no
`--tensor-type`, and 2025-H2 versions ignored an override on a tensor whose preset choice had fallen back, so
only the `current` rule set reproduces a plan exactly.
"""

from __future__ import annotations

import re

from dq3jax.recipes.builtin import builtin_recipe
from dq3jax.recipes.inventory import inventory
from dq3jax.recipes.plan import Plan, make_plan


def _choice(t) -> str:
  return (t.fallback_from or t.type) if t.quantized else t.type


def tensor_type_overrides(plan: Plan) -> list[tuple[str, str]]:
  """(regex, type) pairs; layers sharing a tensor kind and type are folded into one alternation."""
  if not plan.recipe.ftype:
    raise ValueError(f"recipe {plan.recipe.name} names no llama.cpp preset (ftype) to start from")
  base = make_plan(
    inventory(plan.dims, plan.layout),
    plan.dims,
    builtin_recipe(plan.recipe.ftype, plan.rules.name),
    plan.rules,
    plan.layout,
    imatrix=plan.imatrix,
  )
  base_by = base.by_name()
  # llama.cpp's attn_v rules index a running counter that only advances for tensors the rules visit; an
  # overridden attn_v-like tensor skips the rules, shifting the counter for the rest. So once one of them is
  # overridden, all of them are.
  attn_v = [t for t in plan.tensors if re.search(plan.rules.attn_v_like, t.name)]
  pin_attn_v = any(_choice(t) != _choice(base_by[t.name]) for t in attn_v)
  # Likewise the IQ1/IQ2 presets' ffn_down rule reads the running ffn_down counter (ffn_down_idx).
  down = [t for t in plan.tensors if "ffn_down" in t.name]
  pin_down = any("ffn_down_idx" in (r.when or "") for r in base.recipe.rules) and any(
    _choice(t) != _choice(base_by[t.name]) for t in down
  )
  groups: dict[tuple[str, str], list[int]] = {}
  singles: list[tuple[str, str]] = []
  for t in plan.tensors:
    want, have = _choice(t), _choice(base_by[t.name])
    pinned = (pin_attn_v and re.search(plan.rules.attn_v_like, t.name)) or (pin_down and "ffn_down" in t.name)
    if want == have and not pinned:
      continue
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
    if m:
      groups.setdefault((m.group(2), want), []).append(int(m.group(1)))
    else:
      singles.append((f"^{re.escape(t.name)}$", want))
  out = list(singles)
  for (suffix, ty), layers in sorted(groups.items()):
    alt = "|".join(str(i) for i in sorted(layers))
    out.append((rf"^blk\.({alt})\.{re.escape(suffix)}$", ty))
  return out


def tensor_type_file(plan: Plan) -> str:
  """Contents for llama-quantize `--tensor-type-file` (whitespace-separated `pattern=type` items)."""
  return "".join(f"{p}={t.lower()}\n" for p, t in tensor_type_overrides(plan))
