"""Kernel throughput: dq3jax quantize/dequantize next to ggml's single-thread reference, same run.

Elements per second with the jit warm (compile excluded), median of `repeats`; ggml is called
through ctypes on the same input (`ggml_quantize_chunk`, `to_float`), one thread.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

import dq3jax
from dq3jax.qtypes import computable
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
        data = ggml_ref.quantize(x, q.id)
        dq3jax.dequantize(data, q, x.shape)
        d_ours = _median_time(lambda data=data, q=q: dq3jax.dequantize(data, q, x.shape), repeats)
        d_ggml = _median_time(lambda data=data, q=q: ggml_ref.dequantize(data, q.id, x.size), repeats)
        row |= {
          "dequantize_dq3jax_Mel_s": x.size / d_ours / 1e6,
          "dequantize_ggml_Mel_s": x.size / d_ggml / 1e6,
          "dequantize_ratio": d_ggml / d_ours,
        }
      results.append(row)
      print(_fmt_row(row), flush=True)
  return results


def _fmt_row(r: dict) -> str:
  deq = (
    f"{r['dequantize_dq3jax_Mel_s']:9.1f} {r['dequantize_ggml_Mel_s']:9.1f} {r['dequantize_ratio']:6.2f}"
    if "dequantize_ratio" in r
    else " " * 26
  )
  return (
    f"| {r['type']:5s} | {r['mode']:7s} | {r['quantize_dq3jax_Mel_s']:8.2f} | {r['quantize_ggml_Mel_s']:8.2f} "
    f"| {r['quantize_ratio']:6.3f} | {deq} |"
  )


HEADER = (
  "| type | mode | quantize dq3jax (M el/s) | quantize ggml | ratio | dequantize dq3jax / ggml / ratio |\n"
  "|---|---|---:|---:|---:|---|"
)

if __name__ == "__main__":
  print(f"cpus={os.cpu_count()}")
  print(HEADER)
  run()
