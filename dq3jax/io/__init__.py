"""Model files, read and written: HF safetensors checkpoints (bf16, FP8 block-scaled, sharded), deepseek2 GGUF
files, and llama.cpp importance matrices.

The face (everything else in the package's modules is implementation):
  models:    load (a checkpoint directory or a .gguf, optionally truncated), is_gguf, save_hf
  GGUF:      read_gguf / GGUFFile / GGUFError (the one header parser), write_gguf / TensorJob (atomic, streamed),
             act_quant_from_gguf (each weight's stored type, for the llama.cpp emulation)
  imatrix:   read_imatrix / write_imatrix / Imatrix / ImatrixError (legacy .dat and GGUF)
  errors:    NonFiniteError (a NaN/Inf weight or block scale, named by tensor and offset)
Names resolve on first use, so `import dq3jax.io` costs nothing until one is asked for.
"""

from __future__ import annotations

import importlib

_FACE = {
  "load": ("checkpoint", "load"),
  "is_gguf": ("gguf_file", "is_gguf"),
  "save_hf": ("hf_writer", "save"),
  "read_gguf": ("gguf_file", "read_gguf"),
  "GGUFFile": ("gguf_file", "GGUFFile"),
  "GGUFError": ("gguf_file", "GGUFError"),
  "write_gguf": ("gguf_write", "write_gguf"),
  "TensorJob": ("gguf_write", "TensorJob"),
  "act_quant_from_gguf": ("gguf_act_quant", "act_quant_from_gguf"),
  "read_imatrix": ("imatrix", "read_imatrix"),
  "write_imatrix": ("imatrix", "write_imatrix"),
  "Imatrix": ("imatrix", "Imatrix"),
  "ImatrixError": ("imatrix", "ImatrixError"),
  "NonFiniteError": ("finite", "NonFiniteError"),
}

__all__ = sorted(_FACE)


def __getattr__(name: str):
  where = _FACE.get(name)
  if where is None:
    raise AttributeError(f"module 'dq3jax.io' has no attribute {name!r}")
  module, attr = where
  return getattr(importlib.import_module(f"dq3jax.io.{module}"), attr)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_FACE))
