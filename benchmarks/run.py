"""`nox -s bench`: every benchmark, printed as tables and written to bench-results/bench.json."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform

import jax

from benchmarks import bench_ablate, bench_compile, bench_memory, bench_model, bench_quant


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="bench-results/bench.json")
  ap.add_argument("--types", default=None, help="comma-separated subset of ggml types")
  ap.add_argument("--rows", type=int, default=256)
  ap.add_argument(
    "--memory-experts",
    type=int,
    default=256,
    help="experts in the full-size Q4_K memory benchmark (256: DeepSeek-V3's; 0 skips it, about 5 minutes)",
  )
  args = ap.parse_args()
  env = {
    "platform": platform.platform(),
    "processor": platform.processor(),
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  print(env)
  print(bench_quant.HEADER)
  types = args.types.split(",") if args.types else None
  quant = bench_quant.run(rows=args.rows, types=types)
  print(bench_compile.HEADER)
  compile_times = bench_compile.run(types=types)
  memory = bench_memory.run(args.memory_experts) if args.memory_experts else None
  model = bench_model.run()
  print(json.dumps(model, indent=1))
  ablate = bench_ablate.run()
  print(json.dumps(ablate, indent=1))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(
    json.dumps(
      {
        "env": env,
        "kernels": quant,
        "compile": compile_times,
        "memory": memory,
        "model": model,
        "ablate": ablate,
      },
      indent=1,
    )
  )
  os.replace(tmp, out)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
