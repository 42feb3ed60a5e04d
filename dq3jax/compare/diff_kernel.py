"""Judging a kernel golden: its inputs, quantized bytes and dequantized floats."""

from __future__ import annotations

import dataclasses

import numpy as np

from dq3jax.compare import dumps
from dq3jax.compare.diff_kinds import TensorKind, row_order, tensor_kind
from dq3jax.compare.diff_rows import Row, bytes_row, input_row, ints_row, kernel_float_row
from dq3jax.compare.diff_thresholds import Thresholds
from dq3jax.compare.dumps import Golden


def compare_kernel(golden: Golden, m: dumps.Matched, thr: Thresholds, cand_path: str) -> list[Row]:
  """Rows for a kernel golden: inputs identical, quantized bytes by block, dequantized floats by ULP."""
  rows = []
  for name in sorted(golden.dump.tensors, key=row_order):
    if name not in m.tensors:
      continue
    g, c = np.asarray(golden.dump.tensors[name]), m.tensors[name]
    k = tensor_kind(golden.kind, name, g)
    if k is TensorKind.INPUT:
      row = input_row(name, g, c, cand_path)
    elif k is TensorKind.BYTES:
      row = bytes_row(name, g, c, golden.info["block_bytes"], thr)
    elif k is TensorKind.KERNEL_FLOATS:
      row = kernel_float_row(name, g, c, thr)
    else:
      row = ints_row(name, g, c)
    rows.append(dataclasses.replace(row, note=m.notes.get(name, "")))
  return rows
