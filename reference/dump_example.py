"""Example writer of an engine dump that `dq3jax diff` reads: adapt `write_dump` to your engine.

    python reference/dump_example.py goldens/models/v3-tiny/outputs/Q4_K_M.safetensors cand.npz
    dq3jax diff goldens/models/v3-tiny/outputs/Q4_K_M.safetensors cand.npz

A dump is an .npz (or .safetensors) of named arrays; every name is optional except that at least one must match
the golden (docs/diff.md has the full list). An engine runs the golden's `tokens` through the golden GGUF
(goldens/models/M/gguf/R.gguf) and saves, in float32, for T tokens:

    tokens                    int   [T]      the tokens it ran (checked to be the golden's)
    logits                    float [T, V]   one prefill over all T positions
    decode_logits             float [T-P, V] positions P..T-1: prefill of P tokens, then one token at a time
    blk.{i}.attn_latent       float [T, kv_lora_rank]  MLA's normalised latent (llama.cpp: kv_cmpr after its norm)
    blk.{i}.hidden_after_attn float [T, d]   residual stream after attention (llama.cpp: ffn_inp)
    blk.{i}.hidden_after_mlp  float [T, d]   residual stream after the MLP/MoE (llama.cpp: l_out)
    blk.{i}.topk_ids          int   [T, K]   MoE layers: selected experts (llama.cpp: ffn_moe_topk)
    blk.{i}.topk_weights      float [T, K]   their weights, normalised and scaled (llama.cpp: ffn_moe_weights_scaled)

Without --logits this script stands in for an engine by running dq3jax's own model on the golden GGUF (the one
the outputs were computed from: `../gguf/<recipe>.gguf` beside the outputs file, or --gguf), so its dump
should pass with any profile. With --logits L.npy it writes only tokens and those logits ([T, V] or
[1, T, V], e.g. from `dq3jax logits`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np

LAYER_KEYS = ("attn_latent", "hidden_after_attn", "hidden_after_mlp", "topk_ids", "topk_weights")


def write_dump(
  path: str | os.PathLike,
  *,
  tokens: np.ndarray,
  logits: np.ndarray,
  decode_logits: np.ndarray | None = None,
  layers: list[dict] | None = None,
) -> None:
  """Save an engine's outputs as an .npz in the names and layout `dq3jax diff` matches against a golden.

  tokens [T]; logits [T, V]; decode_logits [T-P, V] (optional); layers: one dict per decoder layer with any of
  LAYER_KEYS ([T, ...] each; a leading batch axis of 1 is dropped here). Written atomically.
  """
  t = np.asarray(tokens).reshape(-1)
  arrays = {"tokens": t.astype(np.int32), "logits": _rows(logits, t.size, "logits").astype(np.float32)}
  if decode_logits is not None:
    arrays["decode_logits"] = np.asarray(decode_logits, np.float32)
  for i, rec in enumerate(layers or []):
    for key, value in rec.items():
      if key not in LAYER_KEYS:
        raise ValueError(f"layer {i}: unknown key {key!r}; expected one of {LAYER_KEYS}")
      a = _rows(value, t.size, f"layer {i} {key}")
      arrays[f"blk.{i}.{key}"] = a.astype(np.int32 if key == "topk_ids" else np.float32)
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(prefix=".dump-", suffix=".npz", dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _rows(a, t: int, what: str) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim >= 2 and a.shape[0] == 1 and a.shape[1] == t:
    a = a[0]  # [1, T, ...] as the runner returns it
  if a.shape[0] != t:
    raise ValueError(f"{what}: {list(a.shape)} does not start with T = {t}")
  return a


def own_model_outputs(gguf_path: str, tokens: np.ndarray, prefill: int | None, intermediates: bool) -> dict:
  """dq3jax's model on the GGUF, in write_dump's arguments: the stand-in for an engine."""
  from dq3jax.io import gguf_read
  from dq3jax.model import runner

  cfg, params = gguf_read.load(gguf_path)
  batch = tokens[None]  # [1, T]
  out: dict = {"tokens": tokens}
  if intermediates:
    logits, layers = runner.logits_and_intermediates(params, batch, cfg)
    out["layers"] = [{k: v for k, v in rec.items() if k in LAYER_KEYS} for rec in layers]
  else:
    logits = runner.logits(params, batch, cfg)
  out["logits"] = logits
  if prefill is not None:
    out["decode_logits"] = runner.incremental_logits(params, batch, cfg, prefill=prefill)[0, prefill:]
  return out


def main(argv: list[str] | None = None) -> int:
  from safetensors import safe_open

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("golden", help="a model-outputs golden: goldens/models/M/outputs/R.safetensors")
  p.add_argument("out", help="the dump to write (.npz)")
  p.add_argument("--logits", help=".npy of your engine's logits [T, V] or [1, T, V]; only these are written")
  p.add_argument("--gguf", help="model to run (default: ../gguf/<recipe>.gguf beside the golden)")
  p.add_argument("--no-intermediates", action="store_true", help="write logits only (and decode_logits)")
  p.add_argument("--no-decode", action="store_true", help="skip decode_logits (one token at a time)")
  args = p.parse_args(argv)
  with safe_open(args.golden, framework="numpy") as f:
    tokens = f.get_tensor("tokens")
    meta = f.metadata() or {}
  if args.logits:
    write_dump(args.out, tokens=tokens, logits=np.load(args.logits, allow_pickle=False))
    print(f"wrote {args.out}: tokens, logits")
    return 0
  golden = pathlib.Path(args.golden)
  gguf_path = args.gguf or str(golden.parent.parent / "gguf" / f"{meta.get('recipe', golden.stem)}.gguf")
  if not os.path.exists(gguf_path):
    print(f"error: {gguf_path} not found; pass --gguf", file=sys.stderr)
    return 2
  prefill = None if args.no_decode or "prefill" not in meta else int(meta["prefill"])
  out = own_model_outputs(gguf_path, tokens, prefill, not args.no_intermediates)
  write_dump(args.out, **out)
  print(f"wrote {args.out} from {gguf_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
