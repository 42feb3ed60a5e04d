"""`dq3jax` command line: thin subcommands over the package's modules."""

from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
  # Subcommand modules are imported here, not at package import, so `import dq3jax` stays light.
  from dq3jax import goldens  # noqa: PLC0415
  from dq3jax.ablate import cli as ablate_cli  # noqa: PLC0415
  from dq3jax.compare import diff  # noqa: PLC0415
  from dq3jax.convert import cli as quantize_cli  # noqa: PLC0415
  from dq3jax.model import cli_logits  # noqa: PLC0415
  from dq3jax.recipes import plan  # noqa: PLC0415

  parser = argparse.ArgumentParser(
      prog="dq3jax",
      description="Reference implementation and test oracle for quantized DeepSeek-V3/R1.",
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for module in (cli_logits, plan, quantize_cli, goldens, ablate_cli, diff):
    module.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = _build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except (ValueError, FileNotFoundError) as e:
    print(f"dq3jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
