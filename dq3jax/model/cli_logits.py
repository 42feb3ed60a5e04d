"""`dq3jax logits CHECKPOINT --tokens T.npy --out L.npy [--layers N] [--experts E] [--dtype ...]`."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
    "logits",
    help="full-sequence logits of a Hugging Face DeepSeek-V3 checkpoint",
    description="Load an HF DeepSeek-V3/R1 checkpoint (optionally truncated) and write logits [batch, seq, vocab] "
    "as float32 .npy.",
  )
  p.add_argument(
    "checkpoint", help="HF checkpoint directory (config.json + safetensors, single or sharded) or a deepseek2 .gguf"
  )
  p.add_argument("--tokens", required=True, help=".npy of integer token ids [batch, seq]")
  p.add_argument("--out", required=True, help="output .npy, float32 [batch, seq, vocab]")
  p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
  p.add_argument(
    "--experts", type=int, default=None, help="keep only the first E routed experts per MoE layer"
  )
  p.add_argument(
    "--dtype", choices=["float32", "float64", "bfloat16"], default="float32", help="compute dtype"
  )
  p.add_argument("--form", choices=["expanded", "absorbed"], default="expanded", help="MLA computation form")
  p.add_argument(
    "--fp8-bf16",
    action="store_true",
    help="round dequantised FP8 weights to bfloat16, as DeepSeek's weight_dequant does (default: exact float32)",
  )
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from dq3jax.io import safetensors_ckpt
  from dq3jax.io.safetensors_format import CheckpointError
  from dq3jax.model import runner
  from dq3jax.model.mla import AttnForm

  try:
    tokens = np.load(args.tokens, allow_pickle=False)
  except (OSError, ValueError) as e:
    print(f"error: cannot read --tokens {args.tokens}: {e}", file=sys.stderr)
    return 2
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    print(
      f"error: --tokens must be an integer array [batch, seq], got {tokens.dtype} {list(tokens.shape)}",
      file=sys.stderr,
    )
    return 2
  from dq3jax.io import gguf_read

  try:
    if gguf_read.is_gguf(args.checkpoint):
      cfg, params = gguf_read.load(args.checkpoint, layers=args.layers, experts=args.experts, progress=True)
    else:
      cfg, params = safetensors_ckpt.load(
        args.checkpoint,
        layers=args.layers,
        experts=args.experts,
        progress=True,
        round_fp8_to_bf16=args.fp8_bf16,
      )
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
    print(
      f"error: token ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]",
      file=sys.stderr,
    )
    return 2
  logits = runner.logits(params, tokens, cfg, dtype=args.dtype, form=AttnForm(args.form))
  np.save(args.out, np.asarray(logits, np.float32))
  log.info("wrote %s %s", args.out, logits.shape)
  return 0
