"""Reference logits and expert choices from transformers' DeepseekV3ForCausalLM (torch, CPU, eager).

Independent of dq3jax: the checkpoint is read by transformers' own loader and the math is transformers'
unmodified code. FP8 checkpoints are first dequantised here with torch (e4m3 -> float32 times the 128x128
block scale, product kept in float32) into a temporary float32 checkpoint; transformers' own FP8 path needs
`accelerate` and dequantises to bf16, which an fp32 comparison cannot use.

float64: transformers hard-codes float32 in four places (RMSNorm, router, attention softmax, RoPE tables,
`torch.float32` / `torch.float`), so `model.double()` alone still rounds through float32. For a true float64
reference we run the same code with the module-global name `torch` of `modeling_deepseek_v3` and
`modeling_rope_utils` bound to a proxy whose `float32`/`float` are `torch.float64`; nothing else changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import types

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import modeling_rope_utils
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as modeling


class _Float64Torch(types.ModuleType):
  """`torch` with float32 and float meaning float64; every other attribute is the real torch."""

  def __init__(self):
    super().__init__("torch")

  def __getattr__(self, name):
    if name in ("float32", "float"):
      return torch.float64
    return getattr(torch, name)


@contextlib.contextmanager
def _float64_modules():
  saved = modeling.torch, modeling_rope_utils.torch
  proxy = _Float64Torch()
  modeling.torch = modeling_rope_utils.torch = proxy
  try:
    yield
  finally:
    modeling.torch, modeling_rope_utils.torch = saved


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def dequantize_fp8_checkpoint(directory: str, out: str) -> None:
  """Copy an FP8 block-scaled checkpoint as float32 (same shard layout, scales dropped)."""
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  block = hf["quantization_config"].get("weight_block_size", [128, 128])
  del hf["quantization_config"]
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf, f)
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  else:
    weight_map = dict.fromkeys(load_file(os.path.join(directory, "model.safetensors")), "model.safetensors")
  loaded = {shard: load_file(os.path.join(directory, shard)) for shard in set(weight_map.values())}
  tensors = {name: loaded[shard][name] for name, shard in weight_map.items()}
  result = {}
  for name, t in tensors.items():
    if name.endswith(".weight_scale_inv"):
      continue
    if t.dtype == torch.float8_e4m3fn:
      scale = tensors[name.removesuffix(".weight") + ".weight_scale_inv"].to(torch.float32)
      m, n = t.shape
      full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)[:m, :n]
      t = t.to(torch.float32) * full
    result[name] = t.to(torch.float32).contiguous()
  save_file(result, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def load_model(directory: str, dtype: str = "float32") -> transformers.DeepseekV3ForCausalLM:
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  tmp = None
  if "quantization_config" in hf:
    tmp = tempfile.mkdtemp(prefix="dq3jax_ref_fp8_")
    dequantize_fp8_checkpoint(directory, tmp)
    directory = tmp
  try:
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
  finally:
    if tmp:
      shutil.rmtree(tmp)
  model = model.to(_DTYPES[dtype])
  model.eval()
  return model


def run(directory: str, tokens: np.ndarray, dtype: str = "float32") -> dict:
  """{'logits': [B, T, V] numpy in dtype, 'topk_ids': {layer: [B, T, K] int, sorted per token}}."""
  scope = _float64_modules() if dtype == "float64" else contextlib.nullcontext()
  with scope, torch.no_grad():
    # The model is built inside the scope so that float64 RoPE tables are computed in float64 too.
    model = load_model(directory, dtype)
    picks: dict[int, np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
      if isinstance(layer.mlp, modeling.DeepseekV3MoE):

        def hook(module, args, out, i=i):
          picks[i] = out[2].numpy()

        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    b, t = tokens.shape
    out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False)
    for h in hooks:
      h.remove()
  logits = out.logits.to(torch.float32 if dtype == "bfloat16" else out.logits.dtype).numpy()
  return {"logits": logits, "topk_ids": {i: np.sort(v.reshape(b, t, -1), axis=-1) for i, v in picks.items()}}
