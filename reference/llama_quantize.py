"""llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python's ctypes bindings): the one
wrapper the tests call to have the real llama-quantize write a GGUF.

Importance matrices are passed as llama-quantize passes them to ggml, {tensor name: float32 column weights}
(flattened over experts); tensor-type overrides as [(regex, ggml type name)], like `--tensor-type`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dq3jax.qtypes import qtype_of


def quantize(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  ftype: int,
  *,
  imatrix: Mapping[str, np.ndarray] | None = None,
  overrides: Sequence[tuple[str, str]] = (),
  nthread: int = 1,
) -> int:
  """Run llama_model_quantize(src -> dst) with the llama_ftype id `ftype`; returns its status (0 = ok)."""
  from llama_cpp import llama_cpp as lc  # noqa: PLC0415

  p = lc.llama_model_quantize_default_params()
  p.ftype = ftype
  p.nthread = nthread
  keep: list = []  # every buffer the C side points into stays alive until the call returns
  if imatrix is not None:
    names = sorted(imatrix)
    arr = (lc.llama_model_imatrix_data * (len(names) + 1))()  # terminated by a null name
    for k, name in enumerate(names):
      v = np.ascontiguousarray(imatrix[name], dtype=np.float32).reshape(-1)
      keep.append(v)
      arr[k].name = name.encode()
      arr[k].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
      arr[k].size = v.size
    arr[len(names)].name = None
    p.imatrix = arr
    keep.append(arr)
  if overrides:
    tt = (lc.llama_model_tensor_override * (len(overrides) + 1))()
    pats = [pat.encode() for pat, _ in overrides]
    keep.append(pats)
    for k, (_, t) in enumerate(overrides):
      tt[k].pattern = pats[k]
      tt[k].type = qtype_of(t).id
    tt[len(overrides)].pattern = None
    p.tt_overrides = tt
    keep.append(tt)
  return int(lc.llama_model_quantize(os.fspath(src).encode(), os.fspath(dst).encode(), ctypes.byref(p)))
