"""`dq3jax ablate` on the embedded default (v3-mini-256, 3.7M params) over the six recipes of the README table:
wall time split into sampling the evaluation tokens, quantization (quantize + dequantize + rebuild, through
the bit-exact kernels) and forward passes.

The first run in a process includes XLA compilation of every kernel type and of the model (unless a persistent
compilation cache, JAX_COMPILATION_CACHE_DIR, already holds them); the second run in the same process reuses
the compiled code, so first minus second is about the compile cost. `run()` returns a flat dict;
`python -m benchmarks.bench_ablate` (from the repository root) prints it as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import time

from dq3jax.ablate.run import DEFAULT_RECIPES, AblationSpec
from dq3jax.ablate.run import run as ablate


def _timed(spec: AblationSpec) -> dict:
  t = time.perf_counter()
  res = ablate(spec)
  wall = time.perf_counter() - t
  tm = res.timings
  return {
    "wall_s": wall,
    "sample_s": tm.sample_s,
    "base_forward_s": tm.base_forward_s,
    "quantize_s": tm.quantize_s,
    "forward_s": tm.forward_s,
    "sensitivity_s": tm.sensitivity_s,
    "per_recipe_quantize_s": {r.recipe: r.quantize_s for r in res.recipes},
    "per_recipe_forward_s": {r.recipe: r.forward_s for r in res.recipes},
  }


def run(sensitivity: bool = True) -> dict:
  spec = AblationSpec(recipes=DEFAULT_RECIPES, sensitivity=sensitivity)
  out: dict = {
    "model": spec.checkpoint or "builtin:v3-mini-256",
    "recipes": list(DEFAULT_RECIPES),
    "tokens": f"{spec.sequences} x {spec.ctx} sampled",
    "sensitivity": sensitivity,
    "cpu": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "persistent_compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
  }
  out["first_run"] = _timed(spec)
  out["second_run"] = _timed(spec)
  out["compile_estimate_s"] = out["first_run"]["wall_s"] - out["second_run"]["wall_s"]
  return out


if __name__ == "__main__":
  print(json.dumps(run(), indent=2))
