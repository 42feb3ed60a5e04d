"""One face for every command: --help says what it reads and writes; a shared option means the same in all."""

from __future__ import annotations

import argparse
from collections import defaultdict

import pytest

from dq3jax import cli
from dq3jax.cli import errors, options


def _commands() -> dict[str, argparse.ArgumentParser]:
  parser = cli.build_parser()
  sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return dict(sub.choices)


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
  return {s: a for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_the_commands_are_the_listed_ones():
  assert tuple(_commands()) == cli.COMMANDS


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_help_exits_0_and_says_what_the_command_reads_and_writes(command, capsys):
  assert cli.main([command, "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: dq3jax {command} ")
  assert "\nreads: " in out and "\nwrites: " in out and "exit status: 0 done" in out
  description = _commands()[command].description
  assert description.startswith("reads: ") and "\nwrites: " in description


def test_top_level_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(f"    {c} " in out for c in cli.COMMANDS)


def _signature(a: argparse.Action) -> tuple:
  return type(a), a.help, a.default, a.type, a.metavar, tuple(a.choices or ()), a.required


def test_shared_options_are_declared_alike_in_every_command():
  by_flag: dict[str, dict[str, argparse.Action]] = defaultdict(dict)
  for name, p in _commands().items():
    for flag, action in _options(p).items():
      by_flag[flag][name] = action
  for flag in options.SHARED:
    taken = by_flag[flag]
    assert len(taken) >= 2, f"{flag} is declared as shared but only {sorted(taken)} take it"
    signatures = {name: _signature(a) for name, a in taken.items()}
    assert len(set(signatures.values())) == 1, f"{flag} differs between commands: {signatures}"
  # Any other name two commands share is an option with another meaning in each, said so with the reason.
  shared_names = {flag for flag, taken in by_flag.items() if len(taken) > 1}
  assert shared_names - set(options.SHARED) == set(options.DIFFERENT_MEANINGS)


@pytest.mark.parametrize(
  "flag, commands",
  [
    ("--layers", {"logits", "plan", "quantize", "ablate"}),
    ("--experts", {"logits", "plan", "quantize", "ablate"}),
    ("--rules", {"plan", "quantize", "ablate"}),
    ("--layout", {"plan", "quantize", "ablate"}),
    ("--imatrix", {"quantize", "ablate"}),
    ("--no-progress", {"logits", "quantize", "goldens", "ablate"}),
  ],
)
def test_who_takes_the_shared_options(flag, commands):
  assert {name for name, p in _commands().items() if flag in _options(p)} == commands


def test_describe_oserror_names_the_path():
  assert errors.describe(FileNotFoundError(2, "No such file or directory", "x.npy")) == (
    "x.npy: No such file or directory"
  )
  assert errors.describe(OSError("a message of its own")) == "a message of its own"
  assert errors.describe(ValueError("bad --layers")) == "bad --layers"
