"""When llama-quantize hands an importance matrix to ggml for a tensor: recipe logic (which tensors are
quantized, which types read the weights), kept out of dq3jax.io.imatrix, which only reads and writes files."""

from __future__ import annotations

import dataclasses

from dq3jax.recipes.rules import Recipe, is_quantized, requires_imatrix
from dq3jax.recipes.sizes import type_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImatrixUse:
  applies: bool  # ggml receives and uses the column weights for this tensor
  required: bool  # llama-quantize refuses to run without them
  reason: str


def imatrix_use(
  name: str, ne: tuple[int, ...], src_type: str, dst_type: str, entry_size: int | None, recipe: Recipe
) -> ImatrixUse:
  """Mirrors llama-quantize (src/llama-quant.cpp @ 0c1e570): weights reach ggml_quantize_chunk only for a
  tensor that is quantized (driver rules, and dst differs from src), has an entry under its name whose size
  is ne0 * ne2 (a mismatch aborts, except for token_embd which is then quantized without), and whose target
  type's quantize function reads them (not Q8_0, F16, BF16, F32)."""
  required = requires_imatrix(name, dst_type, recipe)
  q, why = is_quantized(name, ne, recipe)
  if not q:
    return ImatrixUse(applies=False, required=False, reason=why)
  if type_size(dst_type).name == type_size(src_type).name:
    return ImatrixUse(applies=False, required=False, reason="target type equals source type: copied")
  if entry_size is None:
    return ImatrixUse(
      applies=False,
      required=required,
      reason="no imatrix entry" + (" (llama-quantize aborts)" if required else ""),
    )
  want = ne[0] * (ne[2] if len(ne) > 2 else 1)
  if entry_size != want:
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
      return ImatrixUse(applies=False, required=required, reason=f"size {entry_size} != {want}: ignored")
    raise ValueError(
      f"{name}: imatrix size {entry_size} is different from tensor size {want} (llama-quantize aborts)"
    )
  ts = type_size(dst_type)
  if not ts.uses_imatrix:
    return ImatrixUse(applies=False, required=required, reason=f"{ts.name} quantization ignores importance")
  return ImatrixUse(applies=True, required=required, reason="used")
