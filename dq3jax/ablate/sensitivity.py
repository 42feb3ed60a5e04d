"""Sensitivity map: quantize one tensor class (optionally one layer group of it) to a low type, keep every other
tensor F32, and measure the KL divergence this alone adds to the unquantized model.

Classes follow the tensor roles that recipes such as DQ3_K_M treat differently: the attention projections,
the dense layers' MLP, the shared experts, each of the three routed-expert matrices, the token embeddings and
the output head. Norms, routers and `exp_probs_b` are never quantized by llama.cpp and are not a class.

Layer groups: a model of at most `PER_LAYER_MAX` layers (a truncated model, the embedded default) is mapped
per layer; a deeper one in three contiguous groups (first, middle, last third; sizes differ by at most one,
earlier groups larger). Every class is also measured over all its layers at once; a group that selects the
same tensors as its whole class (e.g. the dense MLP of a model with one dense layer) is not run twice.

Each unit is a `Recipe` run through the same planner as the presets, so llama.cpp's shape fallbacks apply as
they would under `llama-quantize --tensor-type`: a Q2_K target on a row that is not a multiple of 256 becomes
Q4_0 (current rules) or IQ4_NL (legacy rules), and so on.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from dq3jax.compare.logit_stats import LogitStats
from dq3jax.recipes.inventory import TensorInfo
from dq3jax.recipes.rules import Recipe, RecipeError, Rule, is_quantized
from dq3jax.recipes.sizes import type_size

PER_LAYER_MAX = 4
# (key, label, regex of the part of a layer tensor's name after `blk.N.`, or of a global tensor's full name)
CLASSES: tuple[tuple[str, str, str, bool], ...] = (
  ("attention", "attention (q_a, q_b, kv_a_mqa, kv_b / k_b, v_b, output)",
   r"attn_(q_a|q_b|q|kv_a_mqa|kv_b|k_b|v_b|output)\.weight$", True),
  ("dense_mlp", "dense-layer MLP (ffn_gate, ffn_up, ffn_down)", r"ffn_(gate|up|down)\.weight$", True),
  ("shared_experts", "shared experts (ffn_*_shexp)", r"ffn_(gate|up|down)_shexp\.weight$", True),
  ("ffn_gate_exps", "routed experts: ffn_gate_exps", r"ffn_gate_exps\.weight$", True),
  ("ffn_up_exps", "routed experts: ffn_up_exps", r"ffn_up_exps\.weight$", True),
  ("ffn_down_exps", "routed experts: ffn_down_exps", r"ffn_down_exps\.weight$", True),
  ("token_embd", "token embeddings", r"^token_embd\.weight$", False),
  ("output", "output head", r"^output\.weight$", False),
)  # fmt: skip
CLASS_KEYS = tuple(c[0] for c in CLASSES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unit:
  """One measurement: the tensors of one class (in one layer group) quantized, everything else F32."""

  cls: str  # a CLASS_KEYS entry
  group: str  # "all", "layer 3", "layers 0-20"
  pattern: str  # regex over GGUF names selecting exactly `tensors`
  tensors: tuple[str, ...]

  @property
  def label(self) -> str:
    return self.cls if self.group == "all" else f"{self.cls} [{self.group}]"


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitResult:
  unit: Unit
  types: tuple[str, ...]  # ggml types the unit's tensors got (a fallback may add one)
  params: int  # parameters quantized
  bytes_saved: int  # F32 bytes minus quantized bytes of those tensors
  stats: LogitStats
  seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class SensitivityResult:
  type: str  # the low type asked for
  grouping: str  # "per layer" or "thirds"
  units: tuple[UnitResult, ...]  # ranked: largest mean KLD first

  @property
  def classes(self) -> tuple[UnitResult, ...]:
    """Whole-class units, ranked."""
    return tuple(u for u in self.units if u.unit.group == "all")

  @property
  def groups(self) -> tuple[UnitResult, ...]:
    """Layer-group units, ranked."""
    return tuple(u for u in self.units if u.unit.group != "all")


def layer_groups(n_layer: int) -> list[tuple[str, tuple[int, ...]]]:
  """(name, layers) of the layer groups of an n_layer model, in layer order."""
  if n_layer <= PER_LAYER_MAX:
    return [(f"layer {i}", (i,)) for i in range(n_layer)]
  out = []
  for part in np.array_split(np.arange(n_layer), 3):
    lo, hi = int(part[0]), int(part[-1])
    out.append((f"layers {lo}-{hi}", tuple(range(lo, hi + 1))))
  return out


def grouping(n_layer: int) -> str:
  return "per layer" if n_layer <= PER_LAYER_MAX else "thirds"


def units(inventory: list[TensorInfo], n_layer: int) -> list[Unit]:
  """Every unit with at least one quantizable tensor, whole classes first, then their layer groups."""
  probe = Recipe(name="probe", default_type="Q8_0", rules=())
  names = [t.name for t in inventory if is_quantized(t.name, t.ne, probe)[0]]
  out: list[Unit] = []
  for key, _, rx, layered in CLASSES:
    whole = rf"^blk\.\d+\.{rx}" if layered else rx
    selected = tuple(n for n in names if re.search(whole, n))
    if not selected:
      continue
    out.append(Unit(cls=key, group="all", pattern=whole, tensors=selected))
    if not layered:
      continue
    for gname, layers in layer_groups(n_layer):
      pat = rf"^blk\.({'|'.join(map(str, layers))})\.{rx}"
      sub = tuple(n for n in selected if re.search(pat, n))
      if sub and sub != selected:
        out.append(Unit(cls=key, group=gname, pattern=pat, tensors=sub))
  return out


def check_type(low: str) -> str:
  """The canonical name of a sensitivity target type (a ValueError names the bad input)."""
  try:
    return type_size(low).name
  except ValueError as e:
    raise RecipeError(f"--sensitivity-type: {e}") from None


def unit_recipe(unit: Unit, low: str) -> Recipe:
  """A recipe that gives the unit's tensors `low` (with llama.cpp's shape fallbacks) and all others F32."""
  return Recipe(
    name=f"sensitivity:{unit.label}:{low}",
    # Never applied (the last rule matches every name), but llama.cpp's planner consults the rules only when
    # the default is a quantized type, so it must be one.
    default_type="Q8_0",
    rules=(
      Rule(match=unit.pattern, type=low, source=f"sensitivity: {unit.label} -> {low}"),
      Rule(match=r".", type="F32", source="sensitivity: everything else F32"),
    ),
    description=f"{unit.label} at {low}, every other tensor F32",
  )


def rank(results: list[UnitResult]) -> tuple[UnitResult, ...]:
  """Largest mean KLD first (ties: larger 99% KLD, then label, so the order is deterministic)."""
  return tuple(sorted(results, key=lambda r: (-r.stats.kld_mean, -r.stats.kld["99.0"], r.unit.label)))


def class_label(key: str) -> str:
  return {c[0]: c[1] for c in CLASSES}[key]
