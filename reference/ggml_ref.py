"""The real ggml, called through ctypes: the independent producer dq3jax's kernels are checked against.

We load the `libggml-base.so` that the pinned `llama-cpp-python` wheel bundles (built from source
at install time), and call exactly what llama-quantize calls: `ggml_quantize_chunk` for quantization,
`quantize_row_q8_K_ref` for Q8_K (an activation-side type ggml_quantize_chunk refuses), and the
type traits' `to_float` for dequantization.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import numpy as np

# The version whose ggml the oracle is pinned to (see pyproject.toml's `reference` extra).
PINNED_LLAMA_CPP_PYTHON = "0.3.36"


class _TypeTraits(ctypes.Structure):
  _fields_ = [
    ("type_name", ctypes.c_char_p),
    ("blck_size", ctypes.c_int64),
    ("blck_size_interleave", ctypes.c_int64),
    ("type_size", ctypes.c_size_t),
    ("is_quantized", ctypes.c_bool),
    ("to_float", ctypes.c_void_p),
    ("from_float_ref", ctypes.c_void_p),
  ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def library_path() -> pathlib.Path:
  """Path of the libggml-base shared library bundled with llama-cpp-python."""
  import llama_cpp  # noqa: PLC0415  (optional dependency: the `reference` extra)

  if llama_cpp.__version__ != PINNED_LLAMA_CPP_PYTHON:
    raise RuntimeError(
      f"llama-cpp-python {llama_cpp.__version__} is installed, the oracle is pinned to "
      f"{PINNED_LLAMA_CPP_PYTHON}; install the `reference` extra"
    )
  lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
  for name in ("libggml-base.so", "libggml-base.dylib"):
    if (lib_dir / name).exists():
      return lib_dir / name
  raise FileNotFoundError(f"no libggml-base in {lib_dir}")


@functools.cache
def _lib() -> ctypes.CDLL:
  lib = ctypes.CDLL(str(library_path()))
  lib.ggml_quantize_chunk.restype = ctypes.c_size_t
  lib.ggml_quantize_chunk.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
  ]
  lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
  lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
  lib.ggml_row_size.restype = ctypes.c_size_t
  lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
  lib.quantize_row_q8_K_ref.restype = None
  lib.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
  lib.dequantize_row_q8_K.restype = None
  lib.dequantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
  return lib


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
  return ctypes.c_void_p(a.ctypes.data)


_Q8_K = 15


def row_size(type_id: int, n: int) -> int:
  return int(_lib().ggml_row_size(type_id, n))


def quantize(x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
  """ggml's bytes for float32 rows `x` [rows, n] -> uint8 [rows, row_bytes]."""
  x = np.ascontiguousarray(x, dtype=np.float32)
  if x.ndim == 1:
    x = x[None, :]
  rows, n = x.shape
  rb = row_size(type_id, n)
  # Zero-initialised: quantize_row_q8_K_ref leaves bsums unwritten for all-zero blocks.
  out = np.zeros((rows, rb), dtype=np.uint8)
  if type_id == _Q8_K:
    _lib().quantize_row_q8_K_ref(_ptr(x), _ptr(out), rows * n)
    return out
  qw = None
  if imatrix is not None:
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    qw = _ptr(imatrix)
  written = _lib().ggml_quantize_chunk(type_id, _ptr(x), _ptr(out), 0, rows, n, qw)
  if written != rows * rb:
    raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {rows * rb}")
  return out


def dequantize(data: np.ndarray, type_id: int, n_elements: int) -> np.ndarray:
  """ggml's `to_float` of raw bytes -> float32 [n_elements]."""
  data = np.ascontiguousarray(data, dtype=np.uint8)
  if type_id == 0:  # F32 has no to_float: ggml reads it in place
    return data.reshape(-1).view(np.float32)[:n_elements].copy()
  out = np.empty(n_elements, dtype=np.float32)
  if type_id == _Q8_K:  # the base traits carry no to_float for Q8_K; its row function is exported
    _lib().dequantize_row_q8_K(_ptr(data), _ptr(out), n_elements)
    return out
  traits = _lib().ggml_get_type_traits(type_id).contents
  if not traits.to_float:
    raise ValueError(f"ggml type {type_id} has no to_float")
  _TO_FLOAT(traits.to_float)(_ptr(data), _ptr(out), n_elements)
  return out


def type_name(type_id: int) -> str:
  return _lib().ggml_get_type_traits(type_id).contents.type_name.decode()
