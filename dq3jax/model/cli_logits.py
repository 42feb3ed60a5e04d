"""`dq3jax logits CHECKPOINT --tokens T.npy --out L.npy [--layers N] [--experts E] [--dtype ...]
[--allow-nonfinite]`. Exit codes: 0 written, 2 bad input (tokens, checkpoint path or file, NaN/Inf
weights)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

log = logging.getLogger(__name__)


_EXPECTED = "a deepseek2 .gguf file or an HF checkpoint directory (config.json + *.safetensors)"
_WARN_LIST = 10  # non-finite tensors listed in the --allow-nonfinite warning; the rest are counted


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
    "logits",
    help="full-sequence logits of a Hugging Face DeepSeek-V3 checkpoint",
    description="Load an HF DeepSeek-V3/R1 checkpoint or a deepseek2 GGUF (optionally truncated) and write "
    "logits [batch, seq, vocab] as .npy: float64 with --dtype float64, else float32. Weights holding NaN or "
    "Inf (also from an Inf/NaN scale of a quantized block) are refused unless --allow-nonfinite.",
  )
  p.add_argument(
    "checkpoint",
    help="HF checkpoint directory (config.json + safetensors, single or sharded) or a deepseek2 .gguf",
  )
  p.add_argument("--tokens", required=True, help=".npy of integer token ids [batch, seq]")
  p.add_argument(
    "--out", required=True, help="output .npy [batch, seq, vocab], float64 or float32 (see --dtype)"
  )
  p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
  p.add_argument(
    "--experts", type=int, default=None, help="keep only the first E routed experts per MoE layer"
  )
  p.add_argument(
    "--dtype",
    choices=["float32", "float64", "bfloat16"],
    default="float32",
    help="compute dtype; the output is float64 for float64, float32 otherwise (bfloat16 widened exactly)",
  )
  p.add_argument("--form", choices=["expanded", "absorbed"], default="expanded", help="MLA computation form")
  p.add_argument(
    "--fp8-bf16",
    action="store_true",
    help="round dequantised FP8 weights to bfloat16, as DeepSeek's weight_dequant does (default: exact float32)",
  )
  p.add_argument(
    "--allow-nonfinite",
    action="store_true",
    help="compute even if weights hold NaN/Inf (with a warning); the logits are then likely NaN",
  )
  p.set_defaults(func=run)
  return p


def _error(msg: str) -> int:
  print(f"dq3jax logits: error: {msg}", file=sys.stderr)
  return 2


def _is_gguf_or_hf(path: str) -> bool:
  """True for a GGUF file, False for a directory (an HF checkpoint: its loader checks the contents); anything
  else is bad input, described by what was found, since a wrong path otherwise fails deep in a loader."""
  if os.path.isdir(path):
    return False
  if not os.path.exists(path):
    raise ValueError(f"checkpoint {path}: no such file or directory; expected {_EXPECTED}")
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint {path}: not a regular file or directory; expected {_EXPECTED}")
  from dq3jax.io import gguf_read

  with open(path, "rb") as f:
    head = f.read(8)
  if head[:4] == gguf_read.MAGIC:
    return True
  size = os.path.getsize(path)
  found = (
    "an empty file"
    if not head
    else f"a {size}-byte file starting with {head!r} (no {gguf_read.MAGIC!r} magic)"
  )
  hint = ""
  if path.endswith((".safetensors", ".json")):
    hint = (
      f"; for an HF checkpoint give the directory that holds it ({os.path.dirname(os.path.abspath(path))})"
    )
  raise ValueError(f"checkpoint {path}: expected {_EXPECTED}, found {found}{hint}")


def _warn_nonfinite(errors: list) -> None:
  print(
    f"dq3jax logits: WARNING: --allow-nonfinite: {len(errors)} weight tensor(s) hold NaN or Inf; "
    "the logits computed from them are likely NaN or meaningless:",
    file=sys.stderr,
  )
  for e in errors[:_WARN_LIST]:
    print(f"  {e}", file=sys.stderr)
  if len(errors) > _WARN_LIST:
    print(f"  ... and {len(errors) - _WARN_LIST} more tensor(s)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
  from dq3jax.io import finite, gguf_read, safetensors_ckpt
  from dq3jax.model import runner
  from dq3jax.model.mla import AttnForm

  try:
    tokens = np.load(args.tokens, allow_pickle=False)
  except (OSError, ValueError) as e:
    return _error(f"cannot read --tokens {args.tokens}: {e}")
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    return _error(f"--tokens must be an integer array [batch, seq], got {tokens.dtype} {list(tokens.shape)}")
  nonfinite: list[finite.NonFiniteError] = []
  on_nonfinite = nonfinite.append if args.allow_nonfinite else None
  try:
    if _is_gguf_or_hf(args.checkpoint):
      cfg, params = gguf_read.load(
        args.checkpoint, layers=args.layers, experts=args.experts, progress=True, on_nonfinite=on_nonfinite
      )
    else:
      cfg, params = safetensors_ckpt.load(
        args.checkpoint,
        layers=args.layers,
        experts=args.experts,
        progress=True,
        round_fp8_to_bf16=args.fp8_bf16,
        on_nonfinite=on_nonfinite,
      )
  except finite.NonFiniteError as e:
    return _error(f"{e} (--allow-nonfinite computes the logits anyway)")
  except (ValueError, OSError) as e:  # CheckpointError, GGUFError: a bad file is bad input
    return _error(str(e))
  if nonfinite:
    _warn_nonfinite(nonfinite)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
    return _error(f"token ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
  logits = runner.logits(params, tokens, cfg, dtype=args.dtype, form=AttnForm(args.form))
  # numpy has no bfloat16; float32 holds it exactly. float64 stays float64: narrowing it would lose its point.
  logits = np.asarray(logits, np.float64 if args.dtype == "float64" else np.float32)
  np.save(args.out, logits)
  bad = int(logits.size - np.count_nonzero(np.isfinite(logits)))
  if bad:
    print(f"dq3jax logits: WARNING: {bad} of {logits.size} logits are NaN or Inf", file=sys.stderr)
  log.info("wrote %s %s", args.out, logits.shape)
  return 0
