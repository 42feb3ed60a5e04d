"""Recipe data model and the llama-quantize machinery around it: driver rules, rule sets and shape fallbacks.

A recipe is data: a default ggml type plus an ordered list of rules. Each rule has a regex searched in the
tensor name, an optional integer condition (`when`, see `expr.py`) and the type it assigns; the first rule
whose regex and condition both match decides. Tensors no rule matches get the default type. Every rule carries
its provenance (`source`), so a plan can say which choices came from llama.cpp, which the paper documents and
which dq3jax reconstructed.

Around the rules, llama-quantize applies two fixed steps that are not recipe data:
  * the driver (`is_quantized`): which tensors are quantized at all. 1-D tensors, names not ending in
    `weight` (`exp_probs_b.bias`), `*_norm.weight` and the router `ffn_gate_inp.weight` keep their source type
    (F32 from the converter).
  * the shape fallback (`RuleSet.fallback`): when a row (ne[0]) is not a multiple of the chosen type's block,
    the type is replaced; if the replacement does not fit either, F16.
Both differ slightly between llama.cpp versions; a RuleSet pins one version.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from dq3jax.recipes import expr
from dq3jax.recipes.sizes import type_size

UNQUANTIZED = ("F32", "F16", "BF16")


class RecipeError(ValueError):
  """A recipe that cannot be built or applied; the message names the recipe and the offending part."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Assign `type` to tensors whose name matches `match` (re.search) and for which `when` holds."""

  match: str
  type: str
  when: str | None = None
  source: str = ""

  def __post_init__(self) -> None:
    try:
      re.compile(self.match)
    except re.error as e:
      raise RecipeError(f"rule {self.match!r}: bad regex: {e}") from None
    try:
      type_size(self.type)
    except ValueError as e:
      raise RecipeError(f"rule {self.match!r}: {e}") from None
    if self.when is not None:
      try:
        expr.compile_condition(self.when)
      except expr.ExprError as e:
        raise RecipeError(str(e)) from None

  def matches(self, name: str, env: Mapping[str, int | None]) -> bool:
    if re.search(self.match, name) is None:
      return False
    return self.when is None or expr.evaluate(self.when, env)

  def to_json(self) -> dict[str, Any]:
    d: dict[str, Any] = {"match": self.match}
    if self.when is not None:
      d["when"] = self.when
    d["type"] = self.type
    if self.source:
      d["source"] = self.source
    return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """A named quantization recipe: a default type, rules overriding it per tensor (first match wins), and
  tensors to keep in their source type."""

  name: str
  default_type: str
  rules: tuple[Rule, ...]
  # Extra regexes of tensors to leave in their source type, on top of the driver rules.
  keep: tuple[str, ...] = ()
  description: str = ""
  # The llama.cpp ftype whose driver-level behaviour applies (imatrix requirement for Q2_K_S), if any.
  ftype: str | None = None

  def __post_init__(self) -> None:
    try:
      type_size(self.default_type)
    except ValueError as e:
      raise RecipeError(f"recipe {self.name}: default_type: {e}") from None
    for k in self.keep:
      try:
        re.compile(k)
      except re.error as e:
        raise RecipeError(f"recipe {self.name}: bad keep regex {k!r}: {e}") from None

  def to_json(self) -> dict[str, Any]:
    d: dict[str, Any] = {"name": self.name, "default_type": self.default_type}
    if self.description:
      d["description"] = self.description
    if self.ftype:
      d["ftype"] = self.ftype
    if self.keep:
      d["keep"] = list(self.keep)
    d["rules"] = [r.to_json() for r in self.rules]
    return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleSet:
  """The llama.cpp version whose per-tensor rules and fallbacks a plan follows."""

  name: str
  llama_cpp: str  # commit the rules were read from
  # Pattern of tensors that take llama.cpp's attn_v branch (deepseek2's attn_kv_b joined it later).
  attn_v_like: str
  # Fallback type per target when ne[0] is not a multiple of the target's block.
  fallback: Mapping[str, str]
  # What happens for a 32-block target (Q8_0, Q4_0, ...) whose row is not a multiple of 32:
  # "error" (paper era: "Unsupported tensor size encountered") or "f16" (current: falls to F16).
  small_block_mismatch: str
  # Whether a separate attn_qkv branch exists (paper era); later attn_qkv is attn_v-like.
  separate_qkv_branch: bool
  # Target types llama-quantize refuses to write without an importance matrix, each with the tensor names
  # exempt from that rule; and the names exempt from Q2_K_S's rule (its Q2_K tensors need one).
  imatrix_types: Mapping[str, tuple[str, ...]]
  q2_k_s_imatrix_exempt: tuple[str, ...]


# Both versions send every 256-block i-quant (IQ4_XS included) to the 32-block IQ4_NL.
_COMMON_FALLBACK = {
  "Q4_K": "Q5_0",
  "Q5_K": "Q5_1",
  "Q6_K": "Q8_0",
  **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
}
_EMB_OUT = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")

RULE_SETS: dict[str, RuleSet] = {
  "current": RuleSet(
    name="current",
    llama_cpp="0c1e57098bba43ac29e6e3b677cdceebdd22334f (bundled with llama-cpp-python 0.3.36)",
    attn_v_like=r"attn_(v|qkv|kv_b)\.weight",
    fallback={"Q2_K": "Q4_0", "Q3_K": "Q4_0", **_COMMON_FALLBACK},
    small_block_mismatch="f16",
    separate_qkv_branch=False,
    # tensor_requires_imatrix: by target type; token_embd and output are always exempt.
    imatrix_types={t: _EMB_OUT for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")},
    q2_k_s_imatrix_exempt=_EMB_OUT,
  ),
  "legacy": RuleSet(
    name="legacy",
    llama_cpp="7841fc723e059d1fd9640e5c0ef19050fcc7c698 (2025-03-12, vendored by llama-cpp-python 0.3.8; "
    "k-quant rules unchanged through 8784689fee07c6daabf3487d24e1535534ef6e6b)",
    attn_v_like=r"attn_v\.weight",
    fallback={"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", **_COMMON_FALLBACK},
    small_block_mismatch="error",
    separate_qkv_branch=True,
    # The inline check of the paper era: IQ3_XXS is not on the list, only IQ1_M exempts token_embd and
    # output, and Q2_K_S exempts token_embd alone.
    imatrix_types={
      "IQ1_S": (),
      "IQ2_XXS": (),
      "IQ2_XS": (),
      "IQ2_S": (),
      "IQ1_M": ("token_embd.weight", "output.weight"),
    },
    q2_k_s_imatrix_exempt=("token_embd.weight",),
  ),
}


def rule_set(name: str) -> RuleSet:
  if name not in RULE_SETS:
    raise RecipeError(f"unknown rule set {name!r}; known: {', '.join(RULE_SETS)}")
  return RULE_SETS[name]


# llama-quantize's name-based exclusions relevant to deepseek2 (tensor_allows_quantization); each keeps the
# tensor in its source type. The 1-D and `weight`-suffix checks are in is_quantized.
DRIVER_KEEP = (
  ("_norm.weight", "norms are never quantized"),
  ("ffn_gate_inp.weight", "the MoE router is never quantized"),
)


def is_quantized(name: str, ne: tuple[int, ...], recipe: Recipe) -> tuple[bool, str]:
  """llama-quantize's driver rule: (quantized?, why not)."""
  if len(ne) < 2 or all(d == 1 for d in ne[1:]):
    return False, "driver: 1-D tensors are never quantized"
  if not name.endswith("weight"):
    return False, "driver: only names ending in 'weight' are quantized"
  for sub, why in DRIVER_KEEP:
    if sub in name:
      return False, f"driver: {why}"
  for k in recipe.keep:
    if re.search(k, name):
      return False, f"recipe keep: {k}"
  return True, ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice:
  type: str
  source: str  # provenance of the deciding rule ("default" when none matched)
  rule_index: int | None
  fallback_from: str | None = None


def choose(
  name: str, ne: tuple[int, ...], env: Mapping[str, int | None], recipe: Recipe, rs: RuleSet
) -> Choice:
  """Type of one quantized tensor: first matching rule (or the default), then the shape fallback."""
  default = type_size(recipe.default_type).name
  if default in UNQUANTIZED:
    # llama.cpp runs the per-tensor rules only when the default type is a quantized one.
    return Choice(type=default, source="default", rule_index=None)
  chosen, source, index = default, "default", None
  for k, r in enumerate(recipe.rules):
    if r.matches(name, env):
      chosen, source, index = type_size(r.type).name, r.source, k
      break
  final = apply_fallback(name, ne[0], chosen, rs)
  return Choice(
    type=final, source=source, rule_index=index, fallback_from=chosen if final != chosen else None
  )


def apply_fallback(name: str, ne0: int, t: str, rs: RuleSet) -> str:
  """llama.cpp's replacement type when rows of ne0 elements do not fit whole blocks of `t`."""
  block = type_size(t).block_elems
  if ne0 % block == 0:
    return t
  if t in rs.fallback:
    fb = rs.fallback[t]
  elif block <= 32:
    if rs.small_block_mismatch == "error":
      raise RecipeError(
        f"{name}: row width {ne0} is not a multiple of {block} for {t}; llama.cpp "
        f"({rs.name} rules) aborts with 'Unsupported tensor size encountered'"
      )
    fb = t
  else:
    raise RecipeError(f"{name}: no fallback is defined for {t} (row width {ne0}) in the {rs.name} rules")
  return fb if ne0 % type_size(fb).block_elems == 0 else "F16"


def requires_imatrix(name: str, t: str, recipe: Recipe, rs: RuleSet | None = None) -> bool:
  """Whether llama-quantize (rule set `rs`, default `current`) refuses to write tensor `name` as type `t`
  without an importance matrix: the very-low-bit i-quants, and the Q2_K tensors of a Q2_K_S file."""
  rs = RULE_SETS["current"] if rs is None else rs
  t = type_size(t).name
  if t in rs.imatrix_types:
    return name not in rs.imatrix_types[t]
  return t == "Q2_K" and recipe.ftype == "Q2_K_S" and name not in rs.q2_k_s_imatrix_exempt
