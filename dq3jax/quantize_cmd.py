"""`dq3jax quantize`: the subcommand module dq3jax/cli.py looks for (implementation in dq3jax.convert.cli)."""

from dq3jax.convert.cli import add_parser, run

__all__ = ["add_parser", "run"]
