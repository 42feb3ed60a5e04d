"""`dq3jax ablate [CHECKPOINT] --recipes ...`: the argparse declaration and the glue."""

from __future__ import annotations

import argparse
import os
import sys

from dq3jax.cli import options


def add_parser(subparsers) -> argparse.ArgumentParser:
  from dq3jax.ablate.run import DEFAULT_RECIPES

  p = options.command(
    subparsers,
    "ablate",
    summary="KLD / top-1 / perplexity of quantization recipes on a (truncated) model, and a sensitivity map",
    reads="an HF checkpoint directory or builtin:NAME (default: the embedded random-weight v3-mini-256); "
    "--tokens .npy or --text (with the checkpoint's tokenizer.json); --imatrix; recipe .json files if given",
    writes="a Markdown table on stdout; --report JSON (atomically); --plot PNGs (P.png, P-sensitivity.png); "
    "no GGUF files",
    about="Quantize a (truncated) DeepSeek-V3 model with each recipe exactly as `dq3jax quantize` / "
    "llama-quantize would, dequantize it in memory, run it on the same tokens and compare its logits with "
    "the unquantized model's: KL divergence, same top token, Δp and the perplexity ratio "
    "(llama-perplexity's definitions), plus the recipe's bits per weight and size. With --sensitivity, also "
    "quantize one tensor class (and layer group) at a time to a low type and rank the classes by the KL "
    "divergence each adds."
    "\n\n"
    "Without --tokens/--text the evaluation tokens are sampled from the unquantized model (see "
    "docs/ablate.md). All input errors are reported (exit status 2) before any quantization starts.",
  )
  p.add_argument("checkpoint", nargs="?", default=None, help="HF checkpoint directory or builtin:NAME")
  p.add_argument(
    "--recipes",
    default=",".join(DEFAULT_RECIPES),
    help="comma-separated: F32, F16, BF16, llama.cpp presets, DQ3_K_M or recipe .json files "
    f"(default {','.join(DEFAULT_RECIPES)})",
  )
  options.layers(p)
  options.experts(p)
  src = p.add_mutually_exclusive_group()
  src.add_argument(
    "--tokens", default=None, metavar="T.npy", help=".npy of integer token ids, [T] (a stream) or [B, T]"
  )
  src.add_argument(
    "--text", default=None, metavar="FILE", help="text file, tokenized with CHECKPOINT/tokenizer.json"
  )
  p.add_argument(
    "--tokens-are-text",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="whether --tokens are a real token sequence; --no-tokens-are-text (e.g. random ids) omits Δp and "
    "perplexity, which need a meaningful next token",
  )
  p.add_argument("--ctx", type=int, default=128, help="tokens per sequence (sampled) or window (streams)")
  p.add_argument(
    "--sequences", type=int, default=8, help="sampled sequences; at most this many windows of a stream"
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the sampled tokens")
  options.report(p)
  p.add_argument(
    "--plot",
    default=None,
    metavar="P.png",
    help="PNG: mean KLD against bits per weight (+ P-sensitivity.png)",
  )
  p.add_argument("--sensitivity", action="store_true", help="also rank tensor classes by the KLD each adds")
  # No default here: None tells "not given" from "given as Q2_K", which without --sensitivity is an error too.
  p.add_argument(
    "--sensitivity-type", default=None, metavar="TYPE", help="type for --sensitivity (default Q2_K)"
  )
  options.rules(p)
  options.layout(p)
  options.imatrix(p)
  p.add_argument("--verbose", action="store_true", help="also print llama-perplexity's full block per recipe")
  options.no_progress(p)
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from dq3jax.ablate import report
  from dq3jax.ablate.run import AblationSpec, setup
  from dq3jax.ablate.run import run as run_ablation

  if args.sensitivity_type is not None and not args.sensitivity:
    raise ValueError(
      f"--sensitivity-type {args.sensitivity_type} needs --sensitivity (it sets that map's type)"
    )
  spec = AblationSpec(
    checkpoint=args.checkpoint,
    recipes=tuple(r.strip() for r in args.recipes.split(",") if r.strip()),
    layers=args.layers,
    experts=args.experts,
    tokens=args.tokens,
    text=args.text,
    tokens_are_text=args.tokens_are_text,
    ctx=args.ctx,
    sequences=args.sequences,
    seed=args.seed,
    rules=args.rules,
    layout=args.layout,
    imatrix=args.imatrix,
    sensitivity=args.sensitivity,
    sensitivity_type="Q2_K" if args.sensitivity_type is None else args.sensitivity_type,
  )
  for opt, path in (("--report", args.report), ("--plot", args.plot)):
    _check_writable(opt, path)
  checked = setup(spec)  # every input error, before any work
  result = run_ablation(checked, progress=not args.no_progress)
  print(report.markdown(result, verbose=args.verbose))
  if args.report:
    report.write_json(result, args.report)
    print(f"wrote {args.report}", file=sys.stderr)
  if args.plot:
    for path in report.write_plots(result, args.plot):
      print(f"wrote {path}", file=sys.stderr)
  return 0


def _check_writable(opt: str, path: str | None) -> None:
  """Fail now rather than after the work: the output's folder must be (creatable and) writable."""
  if path is None:
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise ValueError(f"{opt} {path}: cannot write in {parent}")
  if os.path.isdir(path):
    raise ValueError(f"{opt} {path}: is a directory")
