"""Compile time of every kernel: the fast float32 quantizer, the exact float64 one, and the dequantizer.

Each is lowered and compiled by XLA once, at the shapes `dq3jax.quantize` uses (one chunk), in a fresh child
process with no persistent compilation cache (in a process that has already run a kernel, XLA returns it from
memory); seconds of wall time on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax
import numpy as np

from dq3jax.qtypes import Family, computable
from dq3jax.quant import api


def _seconds(fn, *args) -> float:
  t = time.perf_counter()
  fn.lower(*args).compile()
  return time.perf_counter() - t


def run(types: list[str] | None = None) -> list[dict]:
  cmd = [sys.executable, "-m", "benchmarks.bench_compile", "--child"]
  if types:
    cmd += ["--types", ",".join(types)]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  results = json.loads(out.strip().splitlines()[-1])
  for row in results:
    print(_fmt(row), flush=True)
  total = {key: sum(r.get(key, 0.0) for r in results) for key in ("fast_s", "exact_s", "dequantize_s")}
  print(
    f"| all | | {total['fast_s']:.1f} | {total['exact_s']:.1f} | {total['dequantize_s']:.1f} |", flush=True
  )
  return results


def _measure(types: list[str] | None) -> list[dict]:
  results = []
  for q in computable():
    k = q.kernels
    if (types and q.name not in types) or k.on_host:
      continue
    be = q.block_elems
    for with_qw in (False, True) if q.uses_imatrix else (False,):
      with_s2 = with_qw and k.family is Family.LEGACY
      nbk = api._chunk_blocks(api._FAST_CHUNK, be)
      x = np.zeros((nbk, be), np.float32)
      qw = x if with_qw else np.zeros((1,), np.float32)
      s2 = np.zeros((nbk,), np.float32) if with_s2 else np.zeros((1,), np.float32)
      row = {"type": q.name, "mode": "imatrix" if with_qw else "ref"}
      row["fast_s"] = _seconds(api._fast_quantizer(q.id, with_qw, with_s2), x, qw, s2, api._ZERO)
      if k.family is not Family.FLOAT:
        nex = api._chunk_blocks(api._EXACT_CHUNK, be)
        xb = np.zeros((be, nex), np.uint32)
        with jax.enable_x64(True):
          row["exact_s"] = _seconds(
            api._exact_quantizer(q.id, with_qw, with_s2),
            xb,
            xb if with_qw else np.zeros((1,), np.uint32),
            np.zeros((nex,), np.uint32) if with_s2 else np.zeros((1,), np.uint32),
            api._ZERO,
          )
      if not with_qw:
        blocks = np.zeros((api._chunk_blocks(api._DEQUANT_CHUNK, be), q.block_bytes), np.uint8)
        with jax.enable_x64(k.dequantize_x64):
          row["dequantize_s"] = _seconds(api._dequantizer(q.id), blocks, api._ZERO)
      results.append(row)
      print(_fmt(row), flush=True)
  total = {key: sum(r.get(key, 0.0) for r in results) for key in ("fast_s", "exact_s", "dequantize_s")}
  print(
    f"| all | | {total['fast_s']:.1f} | {total['exact_s']:.1f} | {total['dequantize_s']:.1f} |", flush=True
  )
  return results


def _fmt(r: dict) -> str:
  cell = lambda key: f"{r[key]:.2f}" if key in r else ""  # noqa: E731
  return f"| {r['type']} | {r['mode']} | {cell('fast_s')} | {cell('exact_s')} | {cell('dequantize_s')} |"


HEADER = (
  "| type | mode | fast quantizer (s) | exact quantizer (s) | dequantizer (s) |\n|---|---|---:|---:|---:|"
)

if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--types", default=None)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args()
  types = a.types.split(",") if a.types else None
  if a.child:
    print(json.dumps(_measure(types)))
  else:
    print(HEADER)
    run(types)
