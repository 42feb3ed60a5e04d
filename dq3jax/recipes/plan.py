"""Which ggml type and how many bytes every tensor of a deepseek2 GGUF gets under a recipe (`dq3jax plan`).

Works from the HF config alone (no weights are read). Sizes are tensor data only, as llama-quantize reports
them; GGUF metadata, tokenizer and alignment padding add well under 0.1 GiB for V3/R1. bits_per_weight =
total bytes * 8 / total parameters, including the F32 norms and routers (llama.cpp's "BPW").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from dq3jax.recipes.inventory import ModelDims, TensorInfo, dims_from_config, inventory
from dq3jax.recipes.recipe_file import resolve_recipe
from dq3jax.recipes.rules import (
  Recipe,
  RecipeError,
  RuleSet,
  choose,
  is_quantized,
  requires_imatrix,
)
from dq3jax.recipes.rules import rule_set as get_rule_set
from dq3jax.recipes.sizes import tensor_bytes

GIB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannedTensor:
  name: str
  ne: tuple[int, ...]
  type: str
  bytes: int
  params: int
  quantized: bool
  source: str  # the rule (or driver rule) that decided
  fallback_from: str | None
  requires_imatrix: bool

  def to_json(self) -> dict[str, Any]:
    d = {
      "name": self.name,
      "shape": list(self.ne),
      "type": self.type,
      "bytes": self.bytes,
      "params": self.params,
      "source": self.source,
    }
    if self.fallback_from:
      d["fallback_from"] = self.fallback_from
    if self.requires_imatrix:
      d["requires_imatrix"] = True
    return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """Every tensor of a model with the type a recipe gives it (what `dq3jax plan` prints and quantize writes)."""

  recipe: Recipe
  rules: RuleSet
  layout: str
  dims: ModelDims
  tensors: tuple[PlannedTensor, ...]
  # Planned as if llama-quantize were given an importance matrix (changes IQ3_XXS / IQ4_NL / IQ4_XS choices).
  imatrix: bool = False

  @property
  def total_bytes(self) -> int:
    return sum(t.bytes for t in self.tensors)

  @property
  def total_params(self) -> int:
    return sum(t.params for t in self.tensors)

  @property
  def bits_per_weight(self) -> float:
    return self.total_bytes * 8 / self.total_params

  def by_name(self) -> dict[str, PlannedTensor]:
    return {t.name: t for t in self.tensors}

  def to_json(self) -> dict[str, Any]:
    return {
      "recipe": self.recipe.name,
      "rules": self.rules.name,
      "llama_cpp": self.rules.llama_cpp,
      "layout": self.layout,
      "layers": self.dims.n_layer,
      "experts": self.dims.n_expert,
      "imatrix": self.imatrix,
      "tensors": [t.to_json() for t in self.tensors],
      "totals": {
        "bytes": self.total_bytes,
        "bits_per_weight": self.bits_per_weight,
        "params": self.total_params,
      },
    }


def n_gqa_for(dims: ModelDims, layout: str) -> int:
  """head_count / head_count_kv as stored in the GGUF: pre-split files store the HF num_key_value_heads;
  MLA-aware (split) files store head_count_kv = 1."""
  return dims.n_head // (dims.n_head_kv if layout == "kv_b" else 1)


def tensor_env(
  t: TensorInfo, dims: ModelDims, n_gqa: int, ffn_down_idx: int | None = None, imatrix: bool = False
) -> dict[str, int | None]:
  """Condition variables of one tensor. `ffn_down_idx`: its position among the quantized `ffn_down` tensors
  in visit order (llama.cpp's running i_ffn_down, which the IQ1/IQ2 presets compare with n / 8; on MoE layers
  it advances twice per layer, for ffn_down_exps and ffn_down_shexp)."""
  i = t.layer
  moe = i is not None and dims.is_moe_layer(i)
  return {
    "i": i,
    "n": dims.n_layer,
    "k": dims.n_dense,
    "m": i - dims.n_dense if moe else None,
    "n_moe": dims.n_layer - dims.n_dense,
    "n_gqa": n_gqa,
    "n_expert": dims.n_expert,
    "ne0": t.ne[0],
    "ne1": t.ne[1] if len(t.ne) > 1 else 1,
    "ne2": t.ne[2] if len(t.ne) > 2 else 1,
    "ffn_down_idx": ffn_down_idx,
    "imatrix": int(imatrix),
  }


def make_plan(
  tensors: Sequence[TensorInfo],
  dims: ModelDims,
  recipe: Recipe,
  rs: RuleSet,
  layout: str,
  *,
  imatrix: bool = False,
) -> Plan:
  """The type, size and reason llama-quantize (under rule set `rs`) would give each of `tensors` (in its
  visit order) for `recipe`: tensors it leaves alone keep their source type, the others go through the
  recipe's rules, the driver rules and the shape fallbacks. `imatrix`: plan as if an importance matrix is
  given (llama.cpp's has_imatrix; without one, the presets that need it are marked requires_imatrix)."""
  n_gqa = n_gqa_for(dims, layout)
  out = []
  n_down = 0
  for t in tensors:
    q, why = is_quantized(t.name, t.ne, recipe)
    if not q:
      out.append(
        PlannedTensor(
          name=t.name,
          ne=t.ne,
          type=t.src_type,
          bytes=tensor_bytes(t.src_type, t.ne),
          params=t.n_params,
          quantized=False,
          source=why,
          fallback_from=None,
          requires_imatrix=False,
        )
      )
      continue
    down_idx = None
    if "ffn_down" in t.name:
      down_idx, n_down = n_down, n_down + 1
    c = choose(t.name, t.ne, tensor_env(t, dims, n_gqa, down_idx, imatrix), recipe, rs)
    out.append(
      PlannedTensor(
        name=t.name,
        ne=t.ne,
        type=c.type,
        bytes=tensor_bytes(c.type, t.ne),
        params=t.n_params,
        quantized=True,
        source=c.source,
        fallback_from=c.fallback_from,
        requires_imatrix=requires_imatrix(t.name, c.type, recipe, rs),
      )
    )
  return Plan(recipe=recipe, rules=rs, layout=layout, dims=dims, tensors=tuple(out), imatrix=imatrix)


def plan_from_config(
  cfg: Mapping[str, Any],
  recipe: str | Recipe,
  *,
  rules: str = "current",
  layout: str = "split",
  layers: int | None = None,
  experts: int | None = None,
  imatrix: bool = False,
) -> Plan:
  """make_plan for the model an HF config describes (optionally truncated); `recipe` a name or a path."""
  rs = get_rule_set(rules)
  r = resolve_recipe(recipe, rules=rules) if isinstance(recipe, str) else recipe
  dims = dims_from_config(cfg, layers=layers, experts=experts)
  return make_plan(inventory(dims, layout), dims, r, rs, layout, imatrix=imatrix)


def gib_rounded_up(nbytes: int) -> int:
  """The paper's "G": GiB rounded up (an inference from its Table 1, see docs/recipes.md)."""
  return math.ceil(nbytes / GIB)


def format_table(plan: Plan) -> str:
  w = max(len(t.name) for t in plan.tensors)
  lines = [
    f"recipe {plan.recipe.name}  rules {plan.rules.name} (llama.cpp {plan.rules.llama_cpp})  "
    f"layout {plan.layout}  layers {plan.dims.n_layer}  experts {plan.dims.n_expert}"
    + ("  with imatrix" if plan.imatrix else ""),
    "",
  ]
  lines.append(f"{'tensor':<{w}}  {'shape (ne)':<22} {'type':<7} {'MiB':>11}  note")
  for t in plan.tensors:
    note = f"fallback from {t.fallback_from}" if t.fallback_from else ""
    if t.requires_imatrix:
      note = (note + "; " if note else "") + "needs imatrix"
    lines.append(f"{t.name:<{w}}  {str(list(t.ne)):<22} {t.type:<7} {t.bytes / 2**20:11.2f}  {note}")
  by_type: dict[str, list[int]] = {}
  for t in plan.tensors:
    acc = by_type.setdefault(t.type, [0, 0, 0])
    acc[0] += 1
    acc[1] += t.params
    acc[2] += t.bytes
  lines += ["", f"{'type':<7} {'tensors':>8} {'params':>16} {'GiB':>10} {'share':>7}"]
  for ty, (cnt, par, nb) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
    lines.append(f"{ty:<7} {cnt:>8} {par:>16,} {nb / GIB:>10.3f} {100 * par / plan.total_params:>6.2f}%")
  lines += [
    "",
    f"total: {plan.total_bytes:,} bytes = {plan.total_bytes / GIB:.3f} GiB "
    f"({plan.total_bytes / 1e9:.2f} GB), {plan.total_params:,} params, "
    f"{plan.bits_per_weight:.4f} bits/weight",
  ]
  return "\n".join(line.rstrip() for line in lines)


__all__ = ["Plan", "PlannedTensor", "RecipeError", "make_plan", "plan_from_config"]
