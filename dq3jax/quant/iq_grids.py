"""The codebooks of ggml's i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) as numpy tables.

ggml stores each grid as a C table of packed integers (`iq2xxs_grid` and friends in ggml-common.h):
row r is one uint64 (8 values) or uint32 (4 values), value j in byte j, least significant first. None
of these tables is computed by ggml at start-up; they are data, and gguf-py ships the same data in its
i-quant classes (`gguf.quants.IQ2_XXS.grid_hex` ...), each value coded as an index into the class's
`grid_map` (2 bits for the three-valued IQ2/IQ1 lattices, one nibble for the eight IQ3 levels). We
decode that form here ourselves, at import, instead of carrying a copy of the hex. The tables that *are*
a construction are built by it:

* `KSIGNS_IQ2XS[i]` (IQ2_XXS, IQ2_XS, IQ3_XXS): seven stored sign bits `i`, plus an eighth bit that
  makes the number of minus signs even (the quantizer flips the least important sign to get there);
* `KMASK_IQ2XS[j] = 1 << j`: the sign bit of element j of a group of eight.

Row order and values are checked in tests/quant/test_iq_dequant.py against gguf-py's own decoder and
against live ggml (one-hot blocks dequantized by the C library reproduce each row).

Arrays are read-only: uint8 `[n_grid, 8]` / `[n_grid, 4]` for the IQ2/IQ3 grids, int8 `[2048, 8]`
(values -1, 0, 1) for IQ1_S/IQ1_M.
"""

from __future__ import annotations

import numpy as np
from gguf import quants as _gq

IQ1S_DELTA = np.float32(0.125)  # IQ1_S/IQ1_M shift every grid value by +-1/8 (one sign per group)


def _decode(cls) -> np.ndarray:
  """gguf-py's hex form of one grid -> the ggml table's values [rows, cols] as int64.

  Every hex byte holds `8 // bits` codes of `bits = ceil(log2(len(grid_map)))` bits each, lowest
  first; code k stands for grid_map[k]. For eight levels that is one 3-bit code per nibble.
  """
  levels = np.asarray(cls.grid_map, np.int64)
  bits = int(np.ceil(np.log2(len(levels))))
  per_byte = 8 // bits
  step = 8 // per_byte
  raw = np.frombuffer(bytes.fromhex(cls.grid_hex.decode("ascii")), np.uint8).astype(np.int64)
  codes = (raw[:, None] >> (step * np.arange(per_byte))) & ((1 << bits) - 1)  # [n_bytes, per_byte]
  rows, cols = cls.grid_shape
  if codes.size != rows * cols or int(codes.max()) >= len(levels):
    raise ValueError(f"gguf-py's {cls.__name__} grid does not decode to {rows}x{cols} values of its map")
  return levels[codes.reshape(rows, cols)]


def _table(cls, dtype) -> np.ndarray:
  v = _decode(cls)
  t = v.astype(dtype)
  if not np.array_equal(t.astype(np.int64), v):
    raise ValueError(f"{cls.__name__} grid values do not fit {np.dtype(dtype).name}")
  if len(np.unique(t, axis=0)) != t.shape[0]:
    raise ValueError(f"{cls.__name__} grid has repeated rows")  # a lattice codebook never does
  t.flags.writeable = False
  return t


IQ2XXS_GRID = _table(_gq.IQ2_XXS, np.uint8)  # [256, 8], values 8, 25, 43
IQ2XS_GRID = _table(_gq.IQ2_XS, np.uint8)  # [512, 8]
IQ2S_GRID = _table(_gq.IQ2_S, np.uint8)  # [1024, 8]
IQ3XXS_GRID = _table(_gq.IQ3_XXS, np.uint8)  # [256, 4], values 4, 12, ..., 52, 62
IQ3S_GRID = _table(_gq.IQ3_S, np.uint8)  # [512, 4], values 1, 3, ..., 15
IQ1S_GRID = _table(_gq.IQ1_S, np.int8)  # [2048, 8], values -1, 0, 1 (IQ1_M uses the same grid)


def _even_parity_signs() -> np.ndarray:
  i = np.arange(128, dtype=np.int64)
  ones = sum((i >> k) & 1 for k in range(7))
  t = (i | ((ones & 1) << 7)).astype(np.uint8)  # [128]
  t.flags.writeable = False
  return t


KSIGNS_IQ2XS = _even_parity_signs()
KMASK_IQ2XS = (np.uint8(1) << np.arange(8, dtype=np.uint8)).astype(np.uint8)  # [8]
KMASK_IQ2XS.flags.writeable = False
