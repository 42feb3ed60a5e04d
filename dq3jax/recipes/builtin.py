"""Built-in recipes: llama.cpp's k-quant and i-quant presets for deepseek2 and the paper's DQ3_K_M, as rule data.

Preset rules mirror `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp (read at the commits named in
`rules.RULE_SETS`), restricted to the branches a deepseek2 tensor can reach. Variable meanings (see
`expr.py`): i = layer of the tensor (`blk.i.`), n = number of layers of the model being planned (truncated
models use their own count, exactly as llama-quantize does on a truncated file), k = first_k_dense_replace,
m = i - k on MoE layers (undefined on dense layers), n_gqa = head_count / head_count_kv of the GGUF,
n_expert = routed experts, ffn_down_idx = llama.cpp's running ffn_down counter, imatrix = 1 when the plan
assumes an importance matrix (llama.cpp's has_imatrix; only IQ3_XXS, IQ4_NL and IQ4_XS depend on it).

For attn_v-like tensors llama.cpp uses a running counter over attn_v-like tensors (i_attention_wv of
n_attention_wv) rather than the layer; a deepseek2 file has exactly one attn_kv_b per layer, visited in layer
order, so the counter equals i and the count equals n. The ffn_down counter has no such identity (MoE layers
hold two ffn_down tensors), so the one rule that reads it (IQ1/IQ2 presets) uses ffn_down_idx.
"""

from __future__ import annotations

from dq3jax.qtypes import qtype_of
from dq3jax.recipes.rules import Recipe, RecipeError, Rule, RuleSet, rule_set

K_PRESETS = (
  "Q2_K",
  "Q2_K_S",
  "Q3_K_S",
  "Q3_K_M",
  "Q3_K_L",
  "Q4_K_S",
  "Q4_K_M",
  "Q5_K_S",
  "Q5_K_M",
  "Q6_K",
  "Q8_0",
)
# llama.cpp's i-quant presets. The first six take llama_tensor_get_type's very-low-bit branch (their own
# attn_v / ffn_down / attn_output rules, none of the k-quant ones); the others share the general branches.
IQ_LOW_PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")
IQ_PRESETS = (*IQ_LOW_PRESETS, "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL")
PRESETS = (*K_PRESETS, *IQ_PRESETS)
DEFAULT_TYPE = {
  "Q2_K": "Q2_K",
  "Q2_K_S": "Q2_K",
  "Q3_K_S": "Q3_K",
  "Q3_K_M": "Q3_K",
  "Q3_K_L": "Q3_K",
  "Q4_K_S": "Q4_K",
  "Q4_K_M": "Q4_K",
  "Q5_K_S": "Q5_K",
  "Q5_K_M": "Q5_K",
  "Q6_K": "Q6_K",
  "Q8_0": "Q8_0",
  # llama_ftype_get_default_type: several i-quant presets are named one step above their bulk type.
  "IQ1_S": "IQ1_S",
  "IQ1_M": "IQ1_M",
  "IQ2_XXS": "IQ2_XXS",
  "IQ2_XS": "IQ2_XS",
  "IQ2_S": "IQ2_XS",
  "IQ2_M": "IQ2_S",
  "IQ3_XXS": "IQ3_XXS",
  "IQ3_XS": "IQ3_S",
  "IQ3_S": "IQ3_S",
  "IQ3_M": "IQ3_S",
  "IQ4_XS": "IQ4_XS",
  "IQ4_NL": "IQ4_NL",
}

OUTPUT = r"^output\.weight$"
FFN_DOWN = r"ffn_down"
ATTN_OUTPUT = r"attn_output\.weight"
ATTN_K = r"attn_k\.weight"
ATTN_QKV = r"attn_qkv\.weight"
ATTN_Q = r"attn_q\.weight"
TOKEN_EMBD = r"^token_embd\.weight$"
FFN_GATE_UP = r"ffn_(gate|up)"

# Which preset takes which bump; keyed by llama.cpp branch. Each entry: (when, type).
_ATTN_V = {
  "Q2_K": [("n_gqa >= 4", "Q4_K"), (None, "Q3_K")],
  "Q2_K_S": [("n_gqa >= 4", "Q4_K")],
  "Q3_K_M": [("i < 2", "Q5_K"), (None, "Q4_K")],
  "Q3_K_L": [(None, "Q5_K")],
  "Q4_K_M": [("use_more_bits(i, n)", "Q6_K")],
  "Q5_K_M": [("use_more_bits(i, n)", "Q6_K")],
  "Q4_K_S": [("i < 4", "Q5_K")],
  "IQ3_XXS": [("n_gqa >= 4", "Q4_K"), ("imatrix == 0", "IQ3_S")],
  "IQ3_XS": [("n_gqa >= 4", "Q4_K")],
  "IQ3_S": [("n_gqa >= 4", "Q4_K")],
  "IQ3_M": [(None, "Q4_K")],
  "IQ4_NL": [("n_gqa >= 4", "Q5_K")],
  "IQ4_XS": [("n_gqa >= 4", "Q5_K")],
}
_FFN_DOWN = {
  "Q2_K": [(None, "Q3_K")],
  "Q2_K_S": [("i < n // 8", "Q4_K")],
  "Q3_K_M": [("i < n // 16", "Q5_K"), (None, "Q4_K")],  # the Q3_K branch exists only for Falcon
  "Q3_K_L": [(None, "Q5_K")],
  "Q4_K_M": [("use_more_bits(i, n)", "Q6_K")],
  "Q5_K_M": [("use_more_bits(i, n)", "Q6_K")],
  "Q4_K_S": [("i < n // 8", "Q5_K")],
  # without an imatrix llama.cpp protects the first eighth of the layers (IQ3_XXS: all of ffn_down)
  "IQ3_XXS": [("imatrix == 0 and i < n // 8", "Q4_K"), ("imatrix == 0", "Q3_K")],
  "IQ3_M": [("i < n // 8 or (n_expert == 8 and use_more_bits(i, n))", "Q4_K")],
  "IQ4_NL": [("imatrix == 0 and i < n // 8", "Q5_K")],
  "IQ4_XS": [("imatrix == 0 and i < n // 8", "Q5_K")],
}
# attn_output: with exactly 8 experts (Mixtral) these presets go to Q5_K; DeepSeek's 256 never do.
_ATTN_OUTPUT_8X = (
  "Q2_K",
  "Q3_K_S",
  "Q3_K_M",
  "Q4_K_S",
  "Q4_K_M",
  "IQ3_XXS",
  "IQ3_XS",
  "IQ3_S",
  "IQ3_M",
  "IQ4_NL",
  "IQ4_XS",
)
_ATTN_OUTPUT = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_XXS": "IQ3_S", "IQ3_M": "Q4_K"}
_ATTN_QKV = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K", "IQ3_M": "Q4_K"}
# attn_k / attn_q (names of non-MLA models; deepseek2 has attn_q only without a q LoRA, e.g. V2-Lite).
_ATTN_K_Q = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}
# token_embd of the presets that change it.
_TOKEN_EMBD = {"IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ2_S": "IQ3_S"}
_TOKEN_EMBD |= {"IQ2_M": "IQ3_S", "IQ3_XXS": "IQ3_S"}
# output goes to Q5_K instead of Q6_K for these.
_OUTPUT_Q5_K = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS")


def llama_preset(preset: str, rs: RuleSet) -> Recipe:
  """llama.cpp's rules for one preset (k-quant or i-quant) under one rule set, as a Recipe."""
  if preset not in PRESETS:
    raise RecipeError(f"unknown preset {preset!r}")
  src = f"llama.cpp@{rs.llama_cpp.split()[0][:12]}"
  default = DEFAULT_TYPE[preset]
  rules: list[Rule] = []

  def add(match: str, when: str | None, t: str) -> None:
    rules.append(Rule(match=match, when=when, type=t, source=src))

  # output.weight: Q8_0 when the row does not fit the default type's block, else Q6_K (Q5_K for the lowest
  # i-quants; Q8_0 stays Q8_0).
  add(OUTPUT, f"ne0 % {qtype_of(default).block_elems} != 0", "Q8_0")
  if preset in _OUTPUT_Q5_K:
    add(OUTPUT, None, "Q5_K")
  elif default != "Q8_0":
    add(OUTPUT, None, "Q6_K")
  if preset in _TOKEN_EMBD:
    add(TOKEN_EMBD, None, _TOKEN_EMBD[preset])
  if preset in IQ_LOW_PRESETS:
    _iq_low_rules(preset, rs, add)
  else:
    _general_rules(preset, rs, add)
  return Recipe(
    name=preset,
    default_type=default,
    rules=tuple(rules),
    ftype=preset,
    description=f"llama.cpp {preset} ({rs.name} rules, {rs.llama_cpp})",
  )


def _general_rules(preset: str, rs: RuleSet, add) -> None:
  # attn_v-like: the 8-expert bump to Q8_0 is applied after the preset choice, so it wins outright.
  add(rs.attn_v_like, "n_expert == 8", "Q8_0")
  for when, t in _ATTN_V.get(preset, []):
    add(rs.attn_v_like, when, t)
  add(ATTN_K, "n_expert == 8", "Q8_0")
  if preset in _ATTN_K_Q:
    add(ATTN_K, None, _ATTN_K_Q[preset])
    add(ATTN_Q, None, _ATTN_K_Q[preset])
  for when, t in _FFN_DOWN.get(preset, []):
    add(FFN_DOWN, when, t)
  if preset in _ATTN_OUTPUT_8X:
    add(ATTN_OUTPUT, "n_expert == 8", "Q5_K")
  if preset in _ATTN_OUTPUT:
    # the general attn_output bumps live in the else of the 8-expert test
    add(ATTN_OUTPUT, "n_expert != 8", _ATTN_OUTPUT[preset])
  if rs.separate_qkv_branch and preset in _ATTN_QKV:
    add(ATTN_QKV, None, _ATTN_QKV[preset])
  if preset == "IQ3_XS":
    # the middle three quarters of the layers (i = layer parsed from the name on MoE models)
    add(FFN_GATE_UP, "n // 8 <= i and i < 7 * n // 8", "IQ3_XXS")


def _iq_low_rules(preset: str, rs: RuleSet, add) -> None:
  """llama.cpp's branch for IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ2_M, which replaces all the others:
  no 8-expert Q8_0 bumps, and ffn_down is decided by the running ffn_down counter, not the layer."""
  low = "IQ3_S" if preset in ("IQ2_S", "IQ2_M") else "Q2_K"
  add(rs.attn_v_like, "n_gqa >= 4 or n_expert >= 4", "Q4_K")
  add(rs.attn_v_like, None, low)
  add(ATTN_K, "n_expert == 8", "Q4_K")
  add(FFN_DOWN, "ffn_down_idx < n // 8", low)
  add(ATTN_OUTPUT, "n_expert == 8", "Q5_K")
  if preset in ("IQ1_S", "IQ1_M"):
    add(ATTN_OUTPUT, None, "IQ2_XXS")
  elif preset in ("IQ2_S", "IQ2_M"):
    add(ATTN_OUTPUT, None, "IQ3_S")


PAPER = "documented: arXiv:2505.02390"
RECON = "reconstructed (dq3jax; fits the paper's 281G / 3.59 bpw, not the authors' code)"

# DQ3_K_M on top of Q3_K_M. The ffn_down_exps split (2 x Q6_K, 12 x Q4_K, 44 x Q3_K of 58 MoE layers) is the
# paper's; the phase of "every fourth layer" (every fourth layer inside [n/8, 7n/8), i.e. 7, 11, ..., 51 for
# n = 61) and every other tensor's type are reconstructed from the published size and bpw.
DQ3_K_M_RULES = (
  Rule(
    match=r"ffn_down_exps\.weight$",
    when="m < 2",
    type="Q6_K",
    source=PAPER + " (Q6_K in the first two MoE layers)",
  ),
  Rule(
    match=r"ffn_down_exps\.weight$",
    when="n // 8 <= i and i < 7 * n // 8 and (i - n // 8) % 4 == 0",
    type="Q4_K",
    source=PAPER + " (Q4_K in every fourth layer; count documented, phase reconstructed)",
  ),
  Rule(match=r"ffn_down_exps\.weight$", type="Q3_K", source=PAPER + " (Q3_K otherwise)"),
  Rule(match=r"attn_(q_a|q_b|q|kv_a_mqa|kv_b|k_b|v_b)\.weight$", type="Q4_K", source=RECON),
  Rule(match=r"attn_output\.weight$", type="Q5_K", source=RECON),
  Rule(match=r"ffn_(gate|up)_shexp\.weight$", type="Q4_K", source=RECON),
  Rule(match=r"ffn_down_shexp\.weight$", type="Q5_K", source=RECON),
  Rule(match=r"ffn_(gate|up)\.weight$", type="Q4_K", source=RECON),
  Rule(match=r"ffn_down\.weight$", type="Q6_K", source=RECON),
)


def dq3_k_m(rs: RuleSet) -> Recipe:
  base = llama_preset("Q3_K_M", rs)
  return Recipe(
    name="DQ3_K_M",
    default_type=base.default_type,
    rules=DQ3_K_M_RULES + base.rules,
    ftype="Q3_K_M",
    description="DQ3_K_M (arXiv:2505.02390): Q3_K_M with ffn_down_exps raised per the paper; the rest "
    "of the non-routed tensors one level up (reconstructed)",
  )


BUILTIN = (*PRESETS, "DQ3_K_M")


def builtin_recipe(name: str, rules: str = "current") -> Recipe:
  """The built-in recipe `name` (a llama.cpp preset such as "Q4_K_M", or "DQ3_K_M"; case-insensitive) under
  the rule set `rules` ("current" or "legacy", llama.cpp's early-2025 rules)."""
  rs = rule_set(rules)
  key = name.strip().upper()
  if key == "DQ3_K_M":
    return dq3_k_m(rs)
  if key in PRESETS:
    return llama_preset(key, rs)
  raise RecipeError(f"unknown recipe {name!r}; built in: {', '.join(BUILTIN)} (or a path to a .json file)")
