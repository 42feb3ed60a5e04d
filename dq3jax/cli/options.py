"""What the commands declare alike: the subparser itself (what it reads and writes, the exit statuses) and
the options more than one command takes, each declared once with one help text.

An option name two commands use with different meanings is listed in DIFFERENT_MEANINGS instead, with the
reason; tests/cli checks that every other option name shared by two commands is declared here.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable

from dq3jax.cli import errors

# flag -> its builder; filled by @_shared below.
SHARED: dict[str, Callable[[argparse.ArgumentParser], argparse.Action]] = {}

DIFFERENT_MEANINGS = {
  "--tokens": "logits takes one [batch, seq] batch; ablate also takes a [T] stream, cut into --ctx windows",
  "--recipe": "quantize also takes the plain F32/F16/BF16, which plan has no table for",
}


class _Formatter(argparse.HelpFormatter):
  """Wraps each line of a description or epilog on its own at the terminal's width: the default formatter
  would run the reads:/writes: lines and the paragraphs together, the raw one would not wrap them."""

  def _fill_text(self, text: str, width: int, indent: str) -> str:
    def fill(line: str) -> str:
      hang = " " * 8 if line.startswith(("reads:", "writes:")) else ""
      return textwrap.fill(
        line, width, initial_indent=indent, subsequent_indent=indent + hang, break_on_hyphens=False
      )

    return "\n".join(fill(line) if line else "" for line in text.splitlines())


def command(
  subparsers, name: str, *, summary: str, reads: str, writes: str, about: str
) -> argparse.ArgumentParser:
  """A subcommand whose --help starts with what it reads and what it writes and ends with the exit statuses.
  summary: its line in `dq3jax --help`; about: paragraphs separated by blank lines."""
  paragraphs = [" ".join(par.split()) for par in about.strip().split("\n\n")]
  return subparsers.add_parser(
    name,
    help=summary,
    description="\n\n".join([f"reads: {reads}\nwrites: {writes}", *paragraphs]),
    epilog=errors.EPILOG,
    formatter_class=_Formatter,
  )


def _shared(flag: str):
  def register(build):
    SHARED[flag] = build
    return build

  return register


@_shared("--layers")
def layers(p: argparse.ArgumentParser) -> argparse.Action:
  return p.add_argument(
    "--layers", type=int, default=None, metavar="N", help="keep only the first N decoder layers"
  )


@_shared("--experts")
def experts(p: argparse.ArgumentParser) -> argparse.Action:
  return p.add_argument(
    "--experts",
    type=int,
    default=None,
    metavar="E",
    help="keep only the first E routed experts per MoE layer",
  )


@_shared("--rules")
def rules(p: argparse.ArgumentParser) -> argparse.Action:
  from dq3jax.recipes.rules import RULE_SETS

  return p.add_argument(
    "--rules",
    choices=tuple(RULE_SETS),
    default="current",
    help="llama.cpp rule set: current (bundled with llama-cpp-python 0.3.36) or legacy (early 2025)",
  )


@_shared("--layout")
def layout(p: argparse.ArgumentParser) -> argparse.Action:
  from dq3jax.layouts import LAYOUTS

  return p.add_argument(
    "--layout",
    choices=LAYOUTS,
    default="split",
    help="attention tensors as current converters write them (split: attn_k_b, attn_v_b) or as pre-2025 "
    "files do (kv_b: attn_kv_b)",
  )


@_shared("--imatrix")
def imatrix(p: argparse.ArgumentParser) -> argparse.Action:
  return p.add_argument(
    "--imatrix", default=None, metavar="FILE", help="llama.cpp importance matrix (.dat or .gguf)"
  )


@_shared("--fp8-bf16")
def fp8_bf16(p: argparse.ArgumentParser) -> argparse.Action:
  return p.add_argument(
    "--fp8-bf16",
    action="store_true",
    help="round dequantised FP8 weights to bfloat16, as DeepSeek's weight_dequant does (default: exact "
    "float32)",
  )


@_shared("--report")
def report(p: argparse.ArgumentParser) -> argparse.Action:
  return p.add_argument(
    "--report", default=None, metavar="R.json", help="also write the full result as JSON (atomically)"
  )


@_shared("--no-progress")
def no_progress(p: argparse.ArgumentParser) -> argparse.Action:
  return p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
