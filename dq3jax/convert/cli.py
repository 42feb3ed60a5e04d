"""`dq3jax quantize CHECKPOINT OUT.gguf --recipe NAME [--imatrix FILE] [--rules current|legacy] [--layers N]
[--experts E] [--layout split|kv_b]`: an HF DeepSeek-V3 checkpoint (FP8 or not) to a deepseek2 GGUF."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
    "quantize",
    help="write an HF DeepSeek-V3 checkpoint as a (quantized) deepseek2 GGUF",
    description="Convert an HF DeepSeek-V3/R1 checkpoint directory (FP8 or bf16/f32, single or sharded) to a "
    "deepseek2 GGUF that llama.cpp loads, quantizing each tensor as llama-quantize would with the recipe "
    "(byte-identical to convert_hf_to_gguf --outtype f32 followed by llama-quantize). Streams one tensor "
    "at a time; the output appears only when complete.",
  )
  p.add_argument("checkpoint", help="HF checkpoint directory (config.json + safetensors)")
  p.add_argument("out", help="output .gguf path")
  p.add_argument(
    "--recipe",
    required=True,
    help="F32, F16, BF16, a llama.cpp preset (Q2_K ... Q8_0), DQ3_K_M, or a recipe .json file",
  )
  p.add_argument("--imatrix", default=None, help="llama.cpp importance matrix (.dat or .gguf)")
  p.add_argument("--rules", choices=["current", "legacy"], default="current", help="llama.cpp rule set")
  p.add_argument(
    "--layout",
    choices=["split", "kv_b"],
    default="split",
    help="attention tensors: split attn_k_b/attn_v_b (current converters) or attn_kv_b (older files)",
  )
  p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
  p.add_argument(
    "--experts", type=int, default=None, help="keep only the first E routed experts per MoE layer"
  )
  p.add_argument(
    "--fp8-bf16",
    action="store_true",
    help="round dequantised FP8 weights to bfloat16 (DeepSeek's weight_dequant)",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from dq3jax.convert.quantize import quantize_to_gguf
  from dq3jax.convert.sources import CheckpointSource
  from dq3jax.io.imatrix import ImatrixError, read_imatrix
  from dq3jax.io.safetensors_format import CheckpointError

  try:
    imatrix = read_imatrix(args.imatrix) if args.imatrix else None
    source = CheckpointSource(
      args.checkpoint, layers=args.layers, experts=args.experts, round_fp8_to_bf16=args.fp8_bf16
    )
    result = quantize_to_gguf(
      source,
      args.out,
      args.recipe,
      imatrix=imatrix,
      rules=args.rules,
      layout=args.layout,
      progress=not args.no_progress,
    )
  except (CheckpointError, ImatrixError, ValueError, KeyError, OSError) as e:  # RecipeError is a ValueError
    print(f"dq3jax quantize: error: {e}", file=sys.stderr)
    return 1
  print(result.summary())
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="dq3jax")
  add_parser(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  raise SystemExit(main())
