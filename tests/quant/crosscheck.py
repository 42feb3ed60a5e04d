"""The cross-check of dq3jax's kernels against the real ggml, as a library for tests and nox.

`python -m tests.quant.crosscheck --blocks N` runs every type and mode on N blocks each and
exits non-zero on the first mismatch; `nox -s crosscheck` uses it under different XLA flags.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib

import gguf
import numpy as np

import dq3jax
from dq3jax.qtypes import computable
from dq3jax.quant import stress_inputs as inputs
from reference import ggml_ref
from tests.quant.compare import first_mismatch_report, float_bits_report

# Types whose ggml_quantize_chunk takes a separate path with an importance matrix get both modes.
PARAMS = [
  (q.name, mode) for q in computable() for mode in (("ref", "imatrix") if q.uses_imatrix else ("ref",))
]


def seed_for(*parts: str) -> int:
  return zlib.crc32("/".join(parts).encode())


def check_type(type_name: str, mode: str, min_blocks: int) -> int:
  """Quantizes >= min_blocks blocks with dq3jax and ggml; asserts identical bytes and floats.

  Returns the number of blocks checked.
  """
  q = dq3jax.qtype_of(type_name)
  # The float types have 1-element "blocks"; give them as many elements as a K-quant run.
  total_elems = min_blocks * max(q.block_elems, 256)
  n_blocks = 0
  for case in inputs.cases(total_elems, seed_for(type_name, mode), with_imatrix=(mode == "imatrix")):
    where = f"{type_name}/{mode} kind={case.kind} seed={case.seed} shape={case.x.shape}"
    ours = dq3jax.quantize(case.x, q, imatrix=case.imatrix)
    theirs = ggml_ref.quantize(case.x, q.id, case.imatrix)
    msg = first_mismatch_report(ours, theirs, q.block_bytes, f"quantize {where}")
    assert msg is None, msg
    # ggml's own to_float of the same bytes must equal dq3jax's dequantization, bit for bit.
    deq = dq3jax.dequantize(theirs, q, case.x.shape)
    ref = ggml_ref.dequantize(theirs, q.id, case.x.size).reshape(case.x.shape)
    msg = float_bits_report(deq, ref, q.block_elems, f"dequantize {where}")
    assert msg is None, msg
    n_blocks += case.x.size // q.block_elems
  return n_blocks


def check_random_bytes(type_name: str, n_blocks: int) -> None:
  """Dequantize arbitrary bytes (any scale bit pattern, NaN and Inf included) like ggml."""
  q = dq3jax.qtype_of(type_name)
  rng = np.random.default_rng(seed_for("random-bytes", type_name))
  data = rng.integers(0, 256, size=(n_blocks, q.block_bytes), dtype=np.uint8)
  ours = dq3jax.dequantize(data, q, (n_blocks * q.block_elems,))
  ref = ggml_ref.dequantize(data, q.id, n_blocks * q.block_elems)
  msg = float_bits_report(ours, ref, q.block_elems, f"dequantize random bytes {type_name}")
  assert msg is None, msg


def check_against_gguf_py(type_name: str, n_blocks: int) -> None:
  """Dequantize agrees with gguf-py's numpy dequantizers, a second independent implementation."""
  q = dq3jax.qtype_of(type_name)
  rng = np.random.default_rng(seed_for("gguf-py", type_name))
  x = (rng.standard_normal((n_blocks, q.block_elems)) * 0.05).astype(np.float32)
  data = ggml_ref.quantize(x.reshape(1, -1), q.id)
  ours = dq3jax.dequantize(data, q, x.size)
  theirs = gguf.quants.dequantize(data.reshape(-1), gguf.GGMLQuantizationType(q.id)).reshape(-1)
  msg = float_bits_report(ours, theirs.astype(np.float32), q.block_elems, f"gguf-py dequantize {type_name}")
  assert msg is None, msg


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--blocks", type=int, default=50_000)
  ap.add_argument("--types", default=None, help="comma-separated subset of types")
  args = ap.parse_args(argv)
  wanted = set(args.types.split(",")) if args.types else None
  for name, mode in PARAMS:
    if wanted and name not in wanted:
      continue
    t0 = time.perf_counter()
    n = check_type(name, mode, args.blocks)
    print(
      f"{name:5s} {mode:8s} {n:9d} blocks identical to ggml ({time.perf_counter() - t0:.1f} s)", flush=True
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
