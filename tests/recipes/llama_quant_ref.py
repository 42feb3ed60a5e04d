"""Asks the real llama.cpp bundled with llama-cpp-python which type llama-quantize gives each tensor.

llama.cpp exports test hooks in src/llama-ext.h (C++ linkage, so called by their mangled names):
llama_quant_model_from_metadata builds a mock model from hparams, llama_quant_compute_types runs the exact
per-tensor type selection of llama-quantize (rules, counters, fallbacks) over metadata-only ggml tensors.
No weights are allocated.
"""

from __future__ import annotations

import ctypes
import pathlib

import llama_cpp
from llama_cpp import llama_cpp as lc

_LIB = pathlib.Path(llama_cpp.__file__).parent / "lib"

FTYPE = {
  "Q2_K": 10,
  "Q3_K_S": 11,
  "Q3_K_M": 12,
  "Q3_K_L": 13,
  "Q4_K_S": 14,
  "Q4_K_M": 15,
  "Q5_K_S": 16,
  "Q5_K_M": 17,
  "Q6_K": 18,
  "Q2_K_S": 21,
  "Q8_0": 7,
  "IQ2_XXS": 19,
  "IQ2_XS": 20,
  "IQ3_XS": 22,
  "IQ3_XXS": 23,
  "IQ1_S": 24,
  "IQ4_NL": 25,
  "IQ3_S": 26,
  "IQ3_M": 27,
  "IQ2_S": 28,
  "IQ2_M": 29,
  "IQ4_XS": 30,
  "IQ1_M": 31,
}


class _Desc(ctypes.Structure):
  _fields_ = [("architecture", ctypes.c_char_p)] + [
    (f, ctypes.c_uint32)
    for f in (
      "n_embd",
      "n_ff",
      "n_layer",
      "n_head",
      "n_head_kv",
      "n_expert",
      "n_embd_head_k",
      "n_embd_head_v",
    )
  ]


class _GgmlInit(ctypes.Structure):
  _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def bundled_commit_strings() -> list[str]:
  """Version strings compiled into the bundled libraries (ggml embeds the llama.cpp commit)."""
  out = []
  for f in sorted(_LIB.glob("lib*.so*")):
    data = f.read_bytes()
    for tok in (b"0c1e570",):
      k = data.find(tok)
      if k >= 0:
        out.append(data[k : k + 20].split(b"\0")[0].decode(errors="replace"))
  return out


class LlamaQuantRef:
  def __init__(self) -> None:
    self.llama = ctypes.CDLL(str(_LIB / "libllama.so"))
    self.ggml = ctypes.CDLL(str(_LIB / "libggml-base.so"))
    g = self.ggml
    g.ggml_init.restype = ctypes.c_void_p
    g.ggml_init.argtypes = [_GgmlInit]
    g.ggml_new_tensor.restype = ctypes.c_void_p
    g.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    g.ggml_set_name.restype = ctypes.c_void_p
    g.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    g.ggml_free.argtypes = [ctypes.c_void_p]
    g.ggml_type_name.restype = ctypes.c_char_p
    g.ggml_type_name.argtypes = [ctypes.c_int]
    L = self.llama
    self.from_metadata = L["_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc"]
    self.from_metadata.restype = ctypes.c_void_p
    self.from_metadata.argtypes = [ctypes.POINTER(_Desc)]
    self.quant_init = L["_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params"]
    self.quant_init.restype = ctypes.c_void_p
    self.quant_init.argtypes = [ctypes.c_void_p, ctypes.POINTER(lc.llama_model_quantize_params)]
    self.quant_free = L["_Z16llama_quant_freeP19quantize_state_impl"]
    self.quant_free.argtypes = [ctypes.c_void_p]
    self.compute = L[
      "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem"
    ]
    self.compute.restype = None
    self.compute.argtypes = [
      ctypes.c_void_p,
      ctypes.c_int,
      ctypes.POINTER(ctypes.c_void_p),
      ctypes.POINTER(ctypes.c_int),
      ctypes.c_size_t,
    ]
    self.model_free = L.llama_model_free
    self.model_free.argtypes = [ctypes.c_void_p]

  def types(
    self, tensors, *, preset: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int, n_embd: int
  ) -> dict[str, str]:
    """{name: ggml type name} chosen by llama.cpp for `tensors` (TensorInfo list in llama order)."""
    g = self.ggml
    ctx = g.ggml_init(_GgmlInit(mem_size=(len(tensors) + 16) * 1024, mem_buffer=None, no_alloc=True))
    desc = _Desc(
      architecture=b"deepseek2",
      n_embd=n_embd,
      n_ff=0,
      n_layer=n_layer,
      n_head=n_head,
      n_head_kv=n_head_kv,
      n_expert=n_expert,
      n_embd_head_k=192,
      n_embd_head_v=128,
    )
    model = self.from_metadata(ctypes.byref(desc))
    params = lc.llama_model_quantize_default_params()
    qs = self.quant_init(model, ctypes.byref(params))
    try:
      ptrs = (ctypes.c_void_p * len(tensors))()
      for k, t in enumerate(tensors):
        ne = (ctypes.c_int64 * len(t.ne))(*t.ne)
        ty = 0 if t.src_type == "F32" else 30  # F32 / BF16, as the converter writes them
        p = g.ggml_new_tensor(ctx, ty, len(t.ne), ne)
        g.ggml_set_name(p, t.name.encode())
        ptrs[k] = p
      out = (ctypes.c_int * len(tensors))()
      self.compute(qs, FTYPE[preset], ptrs, out, len(tensors))
      return {t.name: g.ggml_type_name(out[k]).decode().upper() for k, t in enumerate(tensors)}
    finally:
      self.quant_free(qs)
      self.model_free(model)
      g.ggml_free(ctx)
