"""Peak memory of quantizing one full-size DeepSeek-V3 routed-expert tensor through `dq3jax quantize`'s path.

A [256, 2048, 7168] expert tensor (15 GB in float32, 2.1 GB as Q4_K) is generated expert by expert from a seed
(never stored), quantized by the converter's row-chunk producer and streamed into a GGUF by `write_gguf`, in a
child process whose peak resident set size (`ru_maxrss`) is the figure reported. The file goes to a temporary
directory and is deleted.

`python -m benchmarks.bench_memory [--experts 256] [--type Q4_K]` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS, COLS = 2048, 7168  # DeepSeek-V3 ffn_gate_exps: [n_expert, moe_intermediate, hidden] in torch layout


class _GeneratedExperts:
  """A weight source whose every routed expert is a fresh seeded Gaussian [2048, 7168] (nothing kept)."""

  config = None  # slices() reads it only for the split attention tensors

  def get(self, path, expert=None):
    rng = np.random.default_rng(expert)
    return (rng.standard_normal((ROWS, COLS), dtype=np.float32) * np.float32(0.02)).astype(np.float32)


def _child(n_experts: int, type_name: str) -> dict:
  from dq3jax.convert import quantize as convert_quantize
  from dq3jax.io.gguf_write import TensorJob, write_gguf
  from dq3jax.qtypes import qtype_of

  q = qtype_of(type_name)
  name = "blk.3.ffn_gate_exps.weight"
  ne = (COLS, ROWS, n_experts)
  pieces = convert_quantize._producer(_GeneratedExperts(), name, ne, q, None, None, None)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "experts.gguf")
    t = time.perf_counter()
    write_gguf(path, lambda w: None, [TensorJob(name=name, ne=ne, qtype=q, pieces=pieces)])
    seconds = time.perf_counter() - t
    size = os.path.getsize(path)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
  elements = ROWS * COLS * n_experts
  return {
    "type": type_name,
    "shape": [n_experts, ROWS, COLS],
    "elements": elements,
    "float32_bytes": elements * 4,
    "file_bytes": size,
    "peak_rss_bytes": peak,
    "seconds": seconds,
    "Mel_s_including_generation": elements / seconds / 1e6,
  }


def run(n_experts: int = 256, type_name: str = "Q4_K") -> dict:
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.bench_memory",
      "--child",
      "--experts",
      str(n_experts),
      "--type",
      type_name,
    ],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  r = json.loads(out.strip().splitlines()[-1])
  print(
    f"{type_name} {r['shape']}: {r['float32_bytes'] / 2**30:.1f} GiB float32 -> {r['file_bytes'] / 2**30:.2f} GiB "
    f"file, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['seconds']:.0f} s "
    f"({r['Mel_s_including_generation']:.1f} M el/s with generation)",
    flush=True,
  )
  return r


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--type", default="Q4_K")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    print(json.dumps(_child(a.experts, a.type)))
  else:
    run(a.experts, a.type)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
