"""`dq3jax plan CONFIG_OR_CHECKPOINT --recipe NAME_OR_FILE`: the argparse declaration and the glue."""

from __future__ import annotations

import argparse
import json
import sys

from dq3jax.cli import options


def add_parser(subparsers) -> argparse.ArgumentParser:
  from dq3jax.recipes.builtin import BUILTIN

  p = options.command(
    subparsers,
    "plan",
    summary="per-tensor ggml types and sizes of a recipe, from a config.json (no weights read)",
    reads="an HF config.json (or the checkpoint directory holding it; no weights); a recipe .json if given",
    writes="stdout only: the per-tensor table, --json, or --llama-tensor-types file contents",
    about="Which ggml type and how many bytes every tensor of the corresponding deepseek2 GGUF gets under a "
    "recipe. Sizes are tensor data only, as llama-quantize reports them; GGUF metadata, tokenizer and "
    "alignment padding add well under 0.1 GiB for V3/R1. bits_per_weight = total bytes * 8 / total "
    'parameters, including the F32 norms and routers (llama.cpp\'s "BPW").',
  )
  p.add_argument(
    "config", metavar="CONFIG_OR_CHECKPOINT", help="config.json or an HF directory containing one"
  )
  p.add_argument("--recipe", required=True, help=f"built-in ({', '.join(BUILTIN)}) or a recipe .json file")
  options.layout(p)
  options.rules(p)
  options.layers(p)
  options.experts(p)
  p.add_argument(
    "--with-imatrix",
    action="store_true",
    help="plan as llama-quantize does when it is given an importance matrix (IQ3_XXS, IQ4_NL and IQ4_XS "
    "choose some tensors' types differently then)",
  )
  out = p.add_mutually_exclusive_group()
  out.add_argument("--json", action="store_true", help="machine-readable output")
  out.add_argument(
    "--llama-tensor-types",
    action="store_true",
    help="print llama-quantize --tensor-type-file contents that make the recipe's preset produce this plan",
  )
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from dq3jax.recipes import plan as planning
  from dq3jax.recipes.inventory import load_config

  plan = planning.plan_from_config(
    load_config(args.config),
    args.recipe,
    rules=args.rules,
    layout=args.layout,
    layers=args.layers,
    experts=args.experts,
    imatrix=args.with_imatrix,
  )
  if args.llama_tensor_types:
    from dq3jax.recipes.llama_args import tensor_type_file

    sys.stdout.write(tensor_type_file(plan))
    print(f"# llama-quantize --tensor-type-file FILE IN.gguf OUT.gguf {plan.recipe.ftype}", file=sys.stderr)
  elif args.json:
    json.dump(plan.to_json(), sys.stdout, indent=1)
    sys.stdout.write("\n")
  else:
    print(planning.format_table(plan))
  return 0
