"""How a deepseek2 GGUF stores MLA's kv_b projection: the one list of layouts every layer asks.

  * "kv_b": one `attn_kv_b` tensor, `wkv_b` as the HF checkpoint has it (what older llama.cpp converters
    wrote; the early-2025 files);
  * "split": `attn_k_b` / `attn_v_b`, wkv_b split per head (today's converter), which llama.cpp multiplies as
    two separate matmuls (so the model's activation quantization differs too, see model/act_quant).

A fact at the package root, beside the type registry, because the recipes (which tensors exist), the model
(which matmuls llama.cpp runs) and the files (which tensors are written) all need it and none may import the
others for it.
"""

from __future__ import annotations

# Today's converter first: the default wherever a layout is chosen.
LAYOUTS: tuple[str, ...] = ("split", "kv_b")


def check_layout(layout: str) -> str:
  """`layout` if it is one of LAYOUTS, else a ValueError naming the choices."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
  return layout
