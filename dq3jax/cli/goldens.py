"""`dq3jax goldens [--check]`: the argparse declaration and the glue."""

from __future__ import annotations

import argparse
import errno
import os
import pathlib
import sys

from dq3jax.cli import errors, options


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = options.command(
    subparsers,
    "goldens",
    summary="regenerate goldens/ from seeds, or verify it (--check)",
    reads="the goldens directory: v3-pydoc's committed inputs (weights, tokenizer, training record); with "
    "--check its manifest.json and every file it lists",
    writes="the goldens directory, replaced atomically (a failed run leaves the previous goldens intact); "
    "with --check nothing: the problems on stderr, OK or their count on stdout",
    about="Kernel goldens (one safetensors file per type and mode) and model goldens (HF directory, GGUF per "
    "recipe, float64-evaluated outputs), bit-exact on every machine. --check verifies every file against "
    "the manifest's sha256 and against a fresh regeneration, and names any file that differs (exit 1).",
  )
  p.add_argument("--dir", default="goldens", help="goldens directory (default: goldens)")
  p.add_argument("--check", action="store_true", help="verify against the manifest and a fresh regeneration")
  p.add_argument("--no-regenerate", action="store_true", help="with --check: hashes only")
  options.no_progress(p)
  p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2; 1: none)")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from dq3jax import goldens

  root = pathlib.Path(args.dir)
  if args.no_regenerate and not args.check:
    raise ValueError("--no-regenerate needs --check (it skips --check's regeneration)")
  if args.jobs < 1:
    raise ValueError(f"--jobs {args.jobs}: need at least 1")
  # Checked now rather than after minutes of regeneration; a missing --dir is created when regenerating.
  if args.check and not root.exists():
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(root))
  if root.exists() and not root.is_dir():
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
  if args.check:
    problems = goldens.check(
      root, regenerate=not args.no_regenerate, progress=not args.no_progress, jobs=args.jobs
    )
    for line in problems:
      print(line, file=sys.stderr)
    print(f"{root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return errors.FAILED if problems else errors.OK
  goldens.write(root, progress=not args.no_progress, jobs=args.jobs)
  print(f"wrote {root} (computed on {goldens.machine()})")
  return errors.OK
