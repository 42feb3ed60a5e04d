"""Write a params pytree as a Hugging Face DeepSeek-V3 directory (config.json + safetensors).

Options: several shards with an index (tensors dealt out so that a weight and its scale land in different
shards, as in DeepSeek's release), storage dtype float32/bfloat16/float16, and FP8 e4m3 with 128x128 block
scales for the linears DeepSeek stores in FP8 (router, norms, embeddings, lm_head stay unquantised).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from dq3jax.io import fp8 as fp8_lib
from dq3jax.io import hf_names
from dq3jax.io.safetensors_format import write_file
from dq3jax.model.config import DeepseekV3Config

_STORE = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def save(
  directory: str,
  cfg: DeepseekV3Config,
  params: dict,
  *,
  shards: int = 1,
  dtype: str = "float32",
  fp8: bool = False,
) -> None:
  """Write `params` as a Hugging Face DeepSeek-V3 checkpoint in `directory` (config.json, and one
  model.safetensors or `shards` files with an index): weights stored in `dtype` (float32, bfloat16, float16), or with fp8=True the
  FP8 e4m3 weights with 128x128 block scales that DeepSeek ships; the router bias stays float32."""
  os.makedirs(directory, exist_ok=True)
  store = _STORE[dtype]
  tensors: dict[str, np.ndarray] = {}
  for spec in hf_names.tensor_specs(cfg):
    w = np.asarray(hf_names.get_leaf(params, spec), np.float32)
    if fp8 and spec.fp8:
      q, scale = fp8_lib.quantize(w)
      tensors[spec.hf_name] = q
      tensors[hf_names.scale_name(spec.hf_name)] = scale
    elif spec.path[-1] == "router_bias":
      tensors[spec.hf_name] = w  # transformers keeps e_score_correction_bias in float32
    else:
      tensors[spec.hf_name] = w.astype(store)

  hf = cfg.to_hf_config()
  hf["torch_dtype"] = dtype
  if fp8:
    hf["quantization_config"] = {
      "quant_method": "fp8",
      "fmt": "e4m3",
      "activation_scheme": "dynamic",
      "weight_block_size": [fp8_lib.BLOCK, fp8_lib.BLOCK],
    }
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)

  if shards == 1:
    write_file(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    return
  names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
  # Round-robin over tensor order: consecutive tensors (a weight and its scale_inv) go to different shards.
  assignment = {name: names[k % shards] for k, name in enumerate(tensors)}
  for shard in names:
    write_file(
      os.path.join(directory, shard),
      {n: t for n, t in tensors.items() if assignment[n] == shard},
      {"format": "pt"},
    )
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": assignment}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
