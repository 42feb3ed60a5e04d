"""dq3jax: reference implementation and test oracle for quantized DeepSeek-V3/R1.

Public API:
  quantize(x, qtype, *, imatrix=None) -> uint8 [rows, row_bytes], byte-identical to ggml
  dequantize(data, qtype, shape) -> float32, bit-identical to ggml's to_float
"""

from dq3jax.qtypes import REGISTRY, GGMLType, QType, qtype_of
from dq3jax.quant.api import dequantize, quantize

__version__ = "0.1.0"

__all__ = ["GGMLType", "QType", "REGISTRY", "dequantize", "qtype_of", "quantize", "__version__"]
