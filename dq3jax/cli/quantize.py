"""`dq3jax quantize CHECKPOINT OUT.gguf --recipe NAME`: the argparse declaration and the glue."""

from __future__ import annotations

import argparse

from dq3jax.cli import options


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = options.command(
    subparsers,
    "quantize",
    summary="write an HF DeepSeek-V3 checkpoint as a (quantized) deepseek2 GGUF",
    reads="an HF checkpoint directory (config.json + *.safetensors, FP8 or bf16/f32, single or sharded); "
    "--imatrix; a recipe .json if given",
    writes="OUT.gguf (atomically: it appears only when complete); a summary on stdout",
    about="Convert the checkpoint to a deepseek2 GGUF that llama.cpp loads, quantizing each tensor as "
    "llama-quantize would with the recipe (byte-identical to convert_hf_to_gguf --outtype f32 followed by "
    "llama-quantize). Streams one tensor at a time.",
  )
  p.add_argument("checkpoint", help="HF checkpoint directory (config.json + safetensors)")
  p.add_argument("out", metavar="OUT.gguf", help="output .gguf path")
  p.add_argument(
    "--recipe",
    required=True,
    help="F32, F16, BF16, a llama.cpp preset (Q2_K ... Q8_0), DQ3_K_M, or a recipe .json file",
  )
  options.imatrix(p)
  options.rules(p)
  options.layout(p)
  options.layers(p)
  options.experts(p)
  options.fp8_bf16(p)
  options.no_progress(p)
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from dq3jax.convert.quantize import quantize_to_gguf
  from dq3jax.convert.sources import CheckpointSource
  from dq3jax.io.imatrix import read_imatrix

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
  print(result.summary())
  return 0
