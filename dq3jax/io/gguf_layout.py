"""The one table between dq3jax's params pytree (torch layout) and deepseek2 GGUF tensors (ggml `ne` order).

A GGUF tensor with ne [n0, n1, n2] holds the C-order numpy array of shape [n2, n1, n0], i.e. the torch layout.
Most tensors are one params leaf. Two kinds are built from several leaves or from a part of one:
  * routed experts: `ffn_{gate,up,down}_exps` stack the [E, out, in] leaf (ne [in, out, E]);
  * `split` layout: `attn_k_b` / `attn_v_b` are `wkv_b` viewed as [H, dn+dv, r] and split per head, the key part
    transposed (torch [H, r, dn], ne [dn, r, H]) and the value part kept (torch [H, dv, r], ne [r, dv, H]),
    exactly as llama.cpp's converter (conversion/deepseek.py) writes them;
  * fused experts: newer converters may store `ffn_gate_up_exps` = concat(gate, up) along each expert's output
    rows (ne [in, 2*out, E]) in place of the two tensors; it is read back into the same two leaves.
The tensor list and its order come from `dq3jax.recipes.inventory` (llama-quantize's visiting order).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Container

import numpy as np

from dq3jax.layouts import check_layout
from dq3jax.model.config import DeepseekV3Config
from dq3jax.recipes.inventory import ModelDims, TensorInfo, inventory


class Kind(enum.Enum):
  LEAF = "leaf"  # one params leaf, same layout
  EXPERTS = "experts"  # stacked routed experts; slice e of ne2 is expert e
  K_B = "k_b"  # key half of wkv_b, per head, transposed
  V_B = "v_b"  # value half of wkv_b, per head


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mapping:
  """Where a GGUF tensor's values live in the params pytree."""

  gguf_name: str
  path: tuple[str, ...]  # params path; layer indices as str
  kind: Kind


_GLOBAL = {
  "token_embd.weight": ("embed",),
  "output_norm.weight": ("norm",),
  "output.weight": ("lm_head",),
}
_LAYER = {
  "attn_norm.weight": ("attn_norm",),
  "ffn_norm.weight": ("ffn_norm",),
  "attn_q_a.weight": ("attn", "wq_a"),
  "attn_q_a_norm.weight": ("attn", "q_norm"),
  "attn_q_b.weight": ("attn", "wq_b"),
  "attn_q.weight": ("attn", "wq"),
  "attn_kv_a_mqa.weight": ("attn", "wkv_a"),
  "attn_kv_a_norm.weight": ("attn", "kv_norm"),
  "attn_kv_b.weight": ("attn", "wkv_b"),
  "attn_output.weight": ("attn", "wo"),
  "ffn_gate.weight": ("mlp", "w_gate"),
  "ffn_up.weight": ("mlp", "w_up"),
  "ffn_down.weight": ("mlp", "w_down"),
  "ffn_gate_inp.weight": ("mlp", "router"),
  "exp_probs_b.bias": ("mlp", "router_bias"),
  "ffn_gate_shexp.weight": ("mlp", "shared", "w_gate"),
  "ffn_up_shexp.weight": ("mlp", "shared", "w_up"),
  "ffn_down_shexp.weight": ("mlp", "shared", "w_down"),
}
_EXPERTS = {
  "ffn_gate_exps.weight": ("mlp", "experts", "w_gate"),
  "ffn_up_exps.weight": ("mlp", "experts", "w_up"),
  "ffn_down_exps.weight": ("mlp", "experts", "w_down"),
}
_SPLIT = {"attn_k_b.weight": Kind.K_B, "attn_v_b.weight": Kind.V_B}
# The fused expert tensor and, in row order, the unfused tensors it stands for.
_FUSED_EXPERTS = {"ffn_gate_up_exps.weight": ("ffn_gate_exps.weight", "ffn_up_exps.weight")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedPart:
  """Where an unfused expert tensor's values lie in a fused one: part `part` of `n_parts` equal row blocks."""

  fused_name: str
  part: int  # 0 = the first half of the rows (gate), 1 = the second (up)
  n_parts: int


def fused_parts(gguf_name: str) -> list[str]:
  """The unfused tensor names a fused expert tensor holds (in row order); [] for any other name."""
  m = re.fullmatch(r"(blk\.\d+\.)(.+)", gguf_name)
  if m is None or m.group(2) not in _FUSED_EXPERTS:
    return []
  return [m.group(1) + part for part in _FUSED_EXPERTS[m.group(2)]]


def fused_source(gguf_name: str, present: Container[str]) -> FusedPart | None:
  """Where to read `gguf_name` from when the file stores it fused (`present`: the file's tensor names)."""
  if gguf_name in present:
    return None
  m = re.fullmatch(r"(blk\.\d+\.)(.+)", gguf_name)
  if m is None:
    return None
  for fused, parts in _FUSED_EXPERTS.items():
    if m.group(2) in parts and m.group(1) + fused in present:
      return FusedPart(fused_name=m.group(1) + fused, part=parts.index(m.group(2)), n_parts=len(parts))
  return None


def mapping(gguf_name: str) -> Mapping:
  """The params location of a deepseek2 GGUF tensor name; KeyError for names dq3jax does not model."""
  if gguf_name in _GLOBAL:
    return Mapping(gguf_name=gguf_name, path=_GLOBAL[gguf_name], kind=Kind.LEAF)
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
  if m is None:
    raise KeyError(gguf_name)
  lay, rest = ("layers", m.group(1)), m.group(2)
  if rest in _LAYER:
    return Mapping(gguf_name=gguf_name, path=(*lay, *_LAYER[rest]), kind=Kind.LEAF)
  if rest in _EXPERTS:
    return Mapping(gguf_name=gguf_name, path=(*lay, *_EXPERTS[rest]), kind=Kind.EXPERTS)
  if rest in _SPLIT:
    return Mapping(gguf_name=gguf_name, path=(*lay, "attn", "wkv_b"), kind=_SPLIT[rest])
  raise KeyError(gguf_name)


def dims_of(cfg: DeepseekV3Config) -> ModelDims:
  """The recipes' ModelDims for a model config. head_count_kv is the head count: pre-split (kv_b) files must
  store n_head there (llama.cpp's non-MLA path sizes its MHA cache from it), split files store 1 (see
  `metadata`), and `recipes.plan.n_gqa_for` reads it accordingly."""
  return ModelDims(
    hidden=cfg.hidden_size,
    n_layer=cfg.num_hidden_layers,
    n_dense=cfg.first_k_dense_replace,
    n_expert=cfg.n_routed_experts,
    moe_ff=cfg.moe_intermediate_size,
    dense_ff=cfg.intermediate_size,
    n_shared=cfg.n_shared_experts,
    q_lora=cfg.q_lora_rank,
    kv_lora=cfg.kv_lora_rank,
    qk_nope=cfg.qk_nope_head_dim,
    qk_rope=cfg.qk_rope_head_dim,
    v_head=cfg.v_head_dim,
    n_head=cfg.num_attention_heads,
    n_head_kv=cfg.num_attention_heads,
    vocab=cfg.vocab_size,
    has_expert_bias=cfg.use_router_bias,
  )


def tensors(cfg: DeepseekV3Config, layout: str) -> list[TensorInfo]:
  """Every GGUF tensor of cfg in llama-quantize's order."""
  check_layout(layout)
  return inventory(dims_of(cfg), layout)


def split_kv_b(wkv_b: np.ndarray, cfg: DeepseekV3Config) -> tuple[np.ndarray, np.ndarray]:
  """wkv_b [H*(dn+dv), r] -> (k_b [H, r, dn], v_b [H, dv, r]) as llama.cpp's converter splits it."""
  h, dn, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
  w = wkv_b.reshape(h, -1, r)
  return np.ascontiguousarray(w[:, :dn].transpose(0, 2, 1)), np.ascontiguousarray(w[:, dn:])


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
  """Inverse of split_kv_b: (k_b [H, r, dn], v_b [H, dv, r]) -> wkv_b [H*(dn+dv), r] (exact, a transpose)."""
  h, r, _ = k_b.shape
  return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, r)


class ParamsBuilder:
  """Assembles a params pytree from GGUF tensors (torch-layout arrays, any order): each tensor goes to its
  mapping's leaf; the split layout's attn_k_b / attn_v_b of a layer are joined back into wkv_b once both came."""

  def __init__(self, n_layers: int):
    self.tree: dict = {"layers": [{} for _ in range(n_layers)]}
    self._kv_b: dict[tuple[str, ...], dict[Kind, np.ndarray]] = {}

  def add(self, gguf_name: str, a: np.ndarray) -> None:
    m = mapping(gguf_name)
    if m.kind in (Kind.K_B, Kind.V_B):
      parts = self._kv_b.setdefault(m.path, {})
      parts[m.kind] = a
      if len(parts) < 2:
        return
      a = join_kv_b(parts.pop(Kind.K_B), parts.pop(Kind.V_B))  # [H*(dn+dv), r], a fresh array
    self.set(m.path, a)

  def set(self, path: tuple[str, ...], a: np.ndarray) -> None:
    node = self.tree
    for key in path[:-1]:
      node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[path[-1]] = a


def torch_shape(ne: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(reversed(ne))
