"""The llama.cpp activation-quantization mapping (dq3jax.model.act_quant.ActQuant) of a deepseek2 GGUF.

The model knows weights only by params path; which ggml type each weight is stored in is a fact of a file.
This module reads it: GGUF tensor names go through `gguf_layout.mapping` (the one table between GGUF names
and params paths) to the paths `ActQuant` is keyed by.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from dq3jax.io import gguf_layout
from dq3jax.io.gguf_file import read_gguf
from dq3jax.model.act_quant import ActQuant, Path


def params_paths(name: str) -> list[Path]:
  """Params paths a GGUF tensor's type applies to (empty for tensors no matmul reads)."""
  parts = gguf_layout.fused_parts(name)
  if parts:  # newer converters fuse gate and up: one mul_mat_id, one type for both
    return [p for part in parts for p in params_paths(part)]
  try:
    mp = gguf_layout.mapping(name)
  except KeyError:
    return []
  if mp.path[-1] in ("embed", "norm", "router_bias") or mp.path[-1].endswith("norm"):
    return []  # get_rows, elementwise: no activation quantization
  suffix = {gguf_layout.Kind.K_B: ("k_b",), gguf_layout.Kind.V_B: ("v_b",)}.get(mp.kind, ())
  return [(*mp.path, *suffix)]


def from_gguf_types(types: Mapping[str, str], layout: str | None = None) -> ActQuant:
  """From {GGUF tensor name: ggml type name}. Names without a params location (norms, biases, token_embd,
  ...) are ignored; layout defaults to "split" iff attn_k_b/attn_v_b appear (ActQuant.from_types)."""
  return ActQuant.from_types({p: ty for name, ty in types.items() for p in params_paths(name)}, layout)


def weight_type(aq: ActQuant, name: str) -> str:
  """The ggml type `aq` gives the weight stored as GGUF tensor `name` (absolute, whatever aq's prefix)."""
  paths = params_paths(name)
  if not paths:
    raise KeyError(f"{name!r} is not a deepseek2 weight with a params location")
  return dataclasses.replace(aq, prefix=()).weight_type(paths[0])


def act_quant_from_gguf(path: str | os.PathLike) -> ActQuant:
  """The ActQuant of a deepseek2 GGUF: each weight's stored type, and the file's attention layout."""
  f = read_gguf(path)
  types: dict[str, str] = {n: t.type_name for n, t in f.tensors.items()}
  if "output.weight" not in types and "token_embd.weight" in types:
    types["output.weight"] = types["token_embd.weight"]  # tied head, as llama.cpp loads it
  return from_gguf_types(types)
