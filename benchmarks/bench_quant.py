"""Kernel throughput: dq3jax quantize/dequantize next to ggml's single-thread reference, same run.

Elements per second with the jit warm (compile excluded), median of `repeats`; ggml is called
through ctypes on the same input (`ggml_quantize_chunk`, `to_float`), one thread. The types dq3jax only
dequantizes (IQ1_S..IQ3_S) get dequantize rows alone, on bytes from ggml's own quantizer given the
importance matrix (IQ1_S, IQ2_XXS and IQ2_XS refuse to quantize without one; the others use it too, as
llama.cpp's i-quant files do).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

import dq3jax
from dq3jax.qtypes import REGISTRY, computable
from reference import ggml_ref


def _median_time(fn, repeats: int) -> float:
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def run(rows: int = 256, n: int = 4096, repeats: int = 3, types: list[str] | None = None) -> list[dict]:
  rng = np.random.default_rng(42)
  x = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
  imatrix = (rng.standard_normal(n) ** 2).astype(np.float32)
  results = []
  for q in computable():
    if types and q.name not in types:
      continue
    for mode in ("ref", "imatrix") if q.uses_imatrix else ("ref",):
      im = imatrix if mode == "imatrix" else None
      dq3jax.quantize(x, q, imatrix=im)  # warm the jit
      t_ours = _median_time(lambda im=im, q=q: dq3jax.quantize(x, q, imatrix=im), repeats)
      t_ggml = _median_time(lambda im=im, q=q: ggml_ref.quantize(x, q.id, im), repeats)
      row = {
        "type": q.name,
        "mode": mode,
        "elements": x.size,
        "quantize_dq3jax_Mel_s": x.size / t_ours / 1e6,
        "quantize_ggml_Mel_s": x.size / t_ggml / 1e6,
        "quantize_ratio": t_ggml / t_ours,
      }
      if mode == "ref":
        row |= _dequant_row(ggml_ref.quantize(x, q.id), q, x.shape, repeats)
      results.append(row)
      print(_fmt_row(row), flush=True)
  for q in dequantize_only():
    if types and q.name not in types:
      continue
    row = {"type": q.name, "mode": "imatrix", "elements": x.size}
    row |= _dequant_row(ggml_ref.quantize(x, q.id, imatrix), q, x.shape, repeats)
    results.append(row)
    print(_fmt_row(row), flush=True)
  return results


def dequantize_only() -> list:
  """The stored types dq3jax dequantizes but cannot quantize, in registry order."""
  return [q for q in REGISTRY.values() if q.storable and q.dequantizable and not q.computable]


def _dequant_row(data: np.ndarray, q, shape: tuple[int, int], repeats: int) -> dict:
  """dq3jax's dequantize of ggml's bytes next to ggml's to_float of the same bytes."""
  size = shape[0] * shape[1]
  dq3jax.dequantize(data, q, shape)  # warm the jit
  d_ours = _median_time(lambda: dq3jax.dequantize(data, q, shape), repeats)
  d_ggml = _median_time(lambda: ggml_ref.dequantize(data, q.id, size), repeats)
  return {
    "dequantize_dq3jax_Mel_s": size / d_ours / 1e6,
    "dequantize_ggml_Mel_s": size / d_ggml / 1e6,
    "dequantize_ratio": d_ggml / d_ours,
  }


def _fmt_row(r: dict) -> str:
  deq = (
    f"{r['dequantize_dq3jax_Mel_s']:9.1f} {r['dequantize_ggml_Mel_s']:9.1f} {r['dequantize_ratio']:6.2f}"
    if "dequantize_ratio" in r
    else " " * 26
  )
  quant = (
    f"{r['quantize_dq3jax_Mel_s']:8.2f} | {r['quantize_ggml_Mel_s']:8.2f} | {r['quantize_ratio']:6.3f}"
    if "quantize_ratio" in r
    else f"{'-':>8s} | {'-':>8s} | {'-':>6s}"  # no dq3jax quantizer (dequantize-only type)
  )
  return f"| {r['type']:5s} | {r['mode']:7s} | {quant} | {deq} |"


HEADER = (
  "| type | mode | quantize dq3jax (M el/s) | quantize ggml | ratio | dequantize dq3jax / ggml / ratio |\n"
  "|---|---|---:|---:|---:|---|"
)

if __name__ == "__main__":
  print(f"cpus={os.cpu_count()}")
  print(HEADER)
  run()
