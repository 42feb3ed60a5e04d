"""`dq3jax logits CHECKPOINT_OR_GGUF --tokens T.npy --out L.npy`: the argparse declaration and the glue."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from dq3jax.cli import options
from dq3jax.io.atomic import atomic_path

log = logging.getLogger(__name__)

_WARN_LIST = 10  # non-finite tensors listed in the --allow-nonfinite warning; the rest are counted


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = options.command(
    subparsers,
    "logits",
    summary="full-sequence logits of an HF DeepSeek-V3 checkpoint or a deepseek2 GGUF",
    reads="a deepseek2 .gguf or an HF checkpoint directory (config.json + *.safetensors); --tokens .npy",
    writes="--out: logits [batch, seq, vocab] as .npy (float64 with --dtype float64, else float32)",
    about="Load an HF DeepSeek-V3/R1 checkpoint or a deepseek2 GGUF (optionally truncated) and run it on the "
    "tokens. Weights holding NaN or Inf (also from an Inf/NaN scale of a quantized block) are refused unless "
    "--allow-nonfinite.",
  )
  p.add_argument(
    "checkpoint",
    metavar="CHECKPOINT_OR_GGUF",
    help="HF checkpoint directory (config.json + safetensors, single or sharded) or a deepseek2 .gguf",
  )
  p.add_argument("--tokens", required=True, metavar="T.npy", help=".npy of integer token ids [batch, seq]")
  p.add_argument(
    "--out",
    required=True,
    metavar="L.npy",
    help="output .npy [batch, seq, vocab], float64 or float32 (see --dtype)",
  )
  options.layers(p)
  options.experts(p)
  p.add_argument(
    "--dtype",
    choices=["float32", "float64", "bfloat16"],
    default="float32",
    help="compute dtype; the output is float64 for float64, float32 otherwise (bfloat16 widened exactly)",
  )
  p.add_argument("--form", choices=["expanded", "absorbed"], default="expanded", help="MLA computation form")
  options.fp8_bf16(p)
  p.add_argument(
    "--allow-nonfinite",
    action="store_true",
    help="compute even if weights hold NaN/Inf (with a warning); the logits are then likely NaN",
  )
  options.no_progress(p)
  p.set_defaults(func=run)
  return p


def _tokens(path: str) -> np.ndarray:
  try:
    tokens = np.load(path, allow_pickle=False)
  except OSError as e:
    raise ValueError(f"cannot read --tokens {path}: {e.strerror or e}") from e
  except ValueError as e:  # not an .npy file, or one holding pickled objects
    raise ValueError(f"cannot read --tokens {path}: {e}") from e
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f"--tokens must be an integer array [batch, seq], got {tokens.dtype} {list(tokens.shape)}"
    )
  return tokens


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
  from dq3jax.io import checkpoint, finite
  from dq3jax.model import runner
  from dq3jax.model.mla import AttnForm

  tokens = _tokens(args.tokens)  # before the (long) load
  nonfinite: list[finite.NonFiniteError] = []
  try:
    cfg, params = checkpoint.load(
      args.checkpoint,
      layers=args.layers,
      experts=args.experts,
      progress=not args.no_progress,
      round_fp8_to_bf16=args.fp8_bf16,
      on_nonfinite=nonfinite.append if args.allow_nonfinite else None,
    )
  except finite.NonFiniteError as e:
    raise ValueError(f"{e} (--allow-nonfinite computes the logits anyway)") from e
  if nonfinite:
    _warn_nonfinite(nonfinite)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
    raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
  logits = runner.logits(params, tokens, cfg, dtype=args.dtype, form=AttnForm(args.form))
  # numpy has no bfloat16; float32 holds it exactly. float64 stays float64: narrowing it would lose its point.
  logits = np.asarray(logits, np.float64 if args.dtype == "float64" else np.float32)
  out = (
    args.out if str(args.out).endswith(".npy") else f"{args.out}.npy"
  )  # where np.save(args.out) would write
  with atomic_path(out) as tmp, open(tmp, "wb") as f:
    np.save(f, logits)
  bad = int(logits.size - np.count_nonzero(np.isfinite(logits)))
  if bad:
    print(f"dq3jax logits: WARNING: {bad} of {logits.size} logits are NaN or Inf", file=sys.stderr)
  log.info("wrote %s %s", out, logits.shape)
  return 0
