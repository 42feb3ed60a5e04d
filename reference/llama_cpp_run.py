"""llama.cpp (through llama-cpp-python) evaluating a GGUF: the real engine the goldens are diffed against.

`python -m reference.llama_cpp_run MODEL.gguf --outputs GOLDEN_OUTPUTS.safetensors --out CANDIDATE.npz`
runs llama.cpp on the golden's tokens and writes a candidate dump in the format `dq3jax diff` reads
(docs/diff.md): `logits` [T, V] from one prefill over all T tokens, and `decode_logits` [T-P, V] from a
prefill of P tokens followed by one token at a time, as the golden has them. CPU, one thread, F32 KV cache
(type_k = type_v = 0) so the cache adds no rounding of its own. llama.cpp exposes no per-layer hidden states
through this API, so its dump has logits only.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np


def _open(path, n_ctx: int, n_batch: int):
  from llama_cpp import Llama  # noqa: PLC0415

  return Llama(
    str(path),
    logits_all=True,
    n_ctx=max(32, n_ctx),
    n_batch=max(1, n_batch),
    n_threads=1,
    verbose=False,
    type_k=0,
    type_v=0,
    seed=0,
  )


def llama_logits(path, tokens) -> np.ndarray:
  """llama.cpp's logits [T, V] for every position of one prefill over tokens [T]."""
  tokens = [int(t) for t in tokens]
  llm = _open(path, len(tokens), len(tokens))
  try:
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], np.float32)
  finally:
    llm.close()


def llama_decode_logits(path, tokens, prefill: int) -> np.ndarray:
  """llama.cpp's logits [T - prefill, V] for positions prefill..T-1: one prefill of `prefill` tokens, then one
  llama_decode per token (each reading the KV cache)."""
  tokens = [int(t) for t in tokens]
  llm = _open(path, len(tokens), max(prefill, 1))
  try:
    llm.eval(tokens[:prefill])
    rows = []
    for k in range(prefill, len(tokens)):
      llm.eval([tokens[k]])
      rows.append(np.array(llm.scores[k], np.float32))
    return np.stack(rows)
  finally:
    llm.close()


def dump(gguf_path, outputs_path, out_path) -> dict[str, np.ndarray]:
  """Run llama.cpp on a golden GGUF with the tokens of its golden outputs; write the candidate .npz atomically."""
  from safetensors import safe_open  # noqa: PLC0415

  with safe_open(str(outputs_path), "np") as f:
    tokens = f.get_tensor("tokens")
    prefill = int(f.metadata()["prefill"])
  arrays = {
    "logits": llama_logits(gguf_path, tokens),
    "decode_logits": llama_decode_logits(gguf_path, tokens, prefill),
  }
  out_path = os.fspath(out_path)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(os.path.abspath(out_path)))
  try:
    with os.fdopen(fd, "wb") as fh:
      np.savez(fh, **arrays)
    os.replace(tmp, out_path)
  except BaseException:
    os.unlink(tmp)
    raise
  return arrays


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("gguf")
  p.add_argument("--outputs", required=True, help="the golden outputs file whose tokens to run")
  p.add_argument("--out", required=True, help="candidate .npz to write")
  a = p.parse_args(argv)
  arrays = dump(a.gguf, a.outputs, a.out)
  print(f"wrote {a.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
