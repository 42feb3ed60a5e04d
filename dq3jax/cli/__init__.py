"""The `dq3jax` command line: one module per command, each holding only its argparse declaration and the glue
that calls the package (logits, plan, quantize, goldens, ablate, diff); the options several commands take are
declared once in options.py, and errors.py is the one exit-code policy: 0 done, 1 a judged failure, 2 bad
input (never a traceback), 130 interrupted."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dq3jax.cli import errors

COMMANDS = ("logits", "plan", "quantize", "goldens", "ablate", "diff")


def build_parser() -> argparse.ArgumentParser:
  import importlib

  parser = argparse.ArgumentParser(
    prog="dq3jax",
    description="Reference implementation and test oracle for quantized DeepSeek-V3/R1.",
    epilog=errors.EPILOG,
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMANDS:
    # Imported here, not with the package, so that `from dq3jax.cli import main` loads no command's imports.
    importlib.import_module(f"{__name__}.{name}").add_parser(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """The exit status of `dq3jax ARGV...` (the console script passes it to sys.exit)."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error (2), already printed: a status like any other
    return int(e.code or 0)
  return errors.run(args.command, args.func, args)
