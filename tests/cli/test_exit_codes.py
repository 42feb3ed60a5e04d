"""The exit-code policy (dq3jax/cli/errors.py): 0 done, 1 judged failure, 2 bad input in every command and
never a traceback, 130 interrupted, Terminated (143) passed through."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from dq3jax import cli
from dq3jax.io import sigterm


def bad_inputs(tmp: str) -> dict[str, list[str]]:
  """One bad input per command, each refused before any real work."""
  return {
    "logits": ["logits", f"{tmp}/nope", "--tokens", f"{tmp}/missing.npy", "--out", f"{tmp}/o.npy"],
    "plan": ["plan", f"{tmp}/missing.json", "--recipe", "Q4_K_M"],
    "quantize": ["quantize", f"{tmp}/nope", f"{tmp}/m.gguf", "--recipe", "F16", "--no-progress"],
    "goldens": ["goldens", "--check", "--dir", f"{tmp}/nope"],
    "ablate": ["ablate", "--sensitivity-type", "Q4_K", "--no-progress"],
    "diff": ["diff", f"{tmp}/missing.safetensors", f"{tmp}/c.npz"],
  }


# What each message says, so that a test passing for the wrong reason (another error) shows.
MESSAGES = {
  "logits": "cannot read --tokens",
  "plan": "no config.json at",
  "quantize": "expected an HF checkpoint directory",
  "goldens": "nope: No such file or directory",
  "ablate": "needs --sensitivity",
  "diff": "missing.safetensors",
}


def test_every_command_has_a_bad_input_case():
  assert tuple(bad_inputs("/x")) == cli.COMMANDS


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_bad_input_exits_2_with_one_error_line(command, tmp_path, capsys):
  assert cli.main(bad_inputs(str(tmp_path))[command]) == 2
  cap = capsys.readouterr()
  assert cap.err.startswith(f"dq3jax {command}: error: ") and cap.err.count("\n") == 1, cap.err
  assert MESSAGES[command] in cap.err and "Traceback" not in cap.err
  assert list(tmp_path.iterdir()) == []  # nothing written


def test_quantize_of_a_missing_checkpoint_dir_is_bad_input(tmp_path, capsys):
  assert cli.main(["quantize", str(tmp_path / "nope"), str(tmp_path / "m.gguf"), "--recipe", "Q8_0"]) == 2
  assert capsys.readouterr().err.startswith("dq3jax quantize: error: ")


@pytest.mark.parametrize(
  "argv, message",
  [
    (["plan"], "the following arguments are required: CONFIG_OR_CHECKPOINT, --recipe"),
    (["quantize", "a", "b", "--recipe", "F32", "--layout", "kv"], "argument --layout: invalid choice: 'kv'"),
    (["plan", "c", "--recipe", "Q4_K_M", "--json", "--llama-tensor-types"], "not allowed with argument"),
  ],
)
def test_usage_errors_exit_2(argv, message, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("usage: dq3jax ") and f"dq3jax {argv[0]}: error: " in err and message in err


def test_oserror_on_an_input_path_is_bad_input(tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  assert cli.main(["goldens", "--check", "--dir", str(tmp_path / "file")]) == 2
  assert capsys.readouterr().err == f"dq3jax goldens: error: {tmp_path / 'file'}: Not a directory\n"
  assert cli.main(["logits", str(tmp_path), "--tokens", str(tmp_path), "--out", str(tmp_path / "o.npy")]) == 2
  assert capsys.readouterr().err == f"dq3jax logits: error: cannot read --tokens {tmp_path}: Is a directory\n"


def test_a_judged_failure_is_1_and_a_misused_flag_2(tmp_path, capsys):
  assert cli.main(["goldens", "--check", "--no-regenerate", "--dir", str(tmp_path)]) == 1
  cap = capsys.readouterr()
  assert cap.err == f"{tmp_path / 'manifest.json'}: missing\n" and cap.out == f"{tmp_path}: 1 problem(s)\n"
  assert cli.main(["goldens", "--no-regenerate", "--dir", str(tmp_path)]) == 2
  assert "--no-regenerate needs --check" in capsys.readouterr().err


# Arguments that parse; what they name is never read, since each test replaces the command's run.
PARSES = {
  "logits": ["logits", "m", "--tokens", "t.npy", "--out", "o.npy"],
  "plan": ["plan", "config.json", "--recipe", "Q4_K_M"],
  "quantize": ["quantize", "ckpt", "o.gguf", "--recipe", "Q8_0"],
  "goldens": ["goldens", "--check"],
  "ablate": ["ablate"],
  "diff": ["diff", "g.safetensors", "c.npz"],
}


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_keyboard_interrupt_exits_130_with_one_line(command, monkeypatch, capsys):
  def interrupted(args):
    raise KeyboardInterrupt

  monkeypatch.setattr(importlib.import_module(f"dq3jax.cli.{command}"), "run", interrupted)
  assert cli.main(PARSES[command]) == 130
  assert capsys.readouterr().err == f"dq3jax {command}: interrupted\n"


def test_keyboard_interrupt_inside_the_package(tmp_path, monkeypatch, capsys):
  inventory = importlib.import_module("dq3jax.recipes.inventory")  # the package's `inventory` is a function

  def interrupted(path):
    raise KeyboardInterrupt

  monkeypatch.setattr(inventory, "load_config", interrupted)
  assert cli.main(["plan", str(tmp_path), "--recipe", "Q4_K_M"]) == 130
  assert capsys.readouterr().err == "dq3jax plan: interrupted\n"


def test_terminated_passes_through(monkeypatch):
  def terminated(args):
    raise sigterm.Terminated()

  monkeypatch.setattr(importlib.import_module("dq3jax.cli.quantize"), "run", terminated)
  with pytest.raises(sigterm.Terminated) as e:
    cli.main(PARSES["quantize"])
  assert e.value.code == 143


# Through the console script's entry point in a fresh interpreter: the exit statuses and stderr as a shell
# sees them, every command's bad input in one process.
_CONSOLE = """
import json, sys
from dq3jax.cli import main
for argv in json.loads(sys.argv[1]):
  print(main(argv), flush=True)
  print("--", file=sys.stderr, flush=True)
sys.exit(main(["quantize", sys.argv[2] + "/nope", sys.argv[2] + "/m.gguf", "--recipe", "F16"]))
"""


def test_console_entry_bad_input_without_traceback(tmp_path):
  cases = bad_inputs(str(tmp_path))
  run = subprocess.run(
    [sys.executable, "-c", _CONSOLE, json.dumps(list(cases.values())), str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 2, run.stderr
  assert "Traceback" not in run.stderr
  assert run.stdout.split() == ["2"] * len(cases)
  errs = run.stderr.split("--\n")
  assert len(errs) == len(cases) + 1
  for command, err in zip([*cases, "quantize"], errs, strict=True):
    assert err.startswith(f"dq3jax {command}: error: ") and err.count("\n") == 1, err
