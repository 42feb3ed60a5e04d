"""Bad input is reported with exit code 2, naming what is wrong, before any tensor is quantized."""

from __future__ import annotations

import numpy as np
import pytest

import dq3jax
from dq3jax import cli
from dq3jax.ablate import roundtrip
from dq3jax.io import hf_writer


@pytest.fixture(autouse=True)
def no_quantization(monkeypatch):
  def boom(*a, **k):
    raise AssertionError("quantization started before the input was validated")

  monkeypatch.setattr(dq3jax, "quantize", boom)
  monkeypatch.setattr(roundtrip, "build_params", boom)


def _npy(tmp_path, a, name="t.npy"):
  path = tmp_path / name
  np.save(path, a)
  return str(path)


def _fails(capsys, argv, *needles):
  assert cli.main(["ablate", *argv, "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dq3jax ablate: error: ")
  for n in needles:
    assert n in err, err


TINY = ["builtin:v3-tiny"]


def test_unknown_recipe(capsys):
  _fails(capsys, [*TINY, "--recipes", "F32,Q9_K"], "unknown recipe 'Q9_K'")


def test_unknown_builtin(capsys):
  _fails(capsys, ["builtin:v9"], "unknown built-in model 'v9'", "v3-mini-256")


def test_token_outside_vocabulary_names_file_position_and_id(capsys, tmp_path):
  path = _npy(tmp_path, np.array([[1, 2, 3], [4, 999, 5]], np.int64))
  _fails(capsys, [*TINY, "--tokens", path], path, "token id 999", "position [1, 1]", "[0, 128)")


def test_negative_token_in_stream(capsys, tmp_path):
  path = _npy(tmp_path, np.array([1, 2, -3, 4], np.int32))
  _fails(capsys, [*TINY, "--tokens", path], "token id -3", "position 2")


@pytest.mark.parametrize(
  "arr, msg",
  [
    (np.zeros((2, 8), np.float32), "dtype float32"),
    (np.zeros((2, 8), np.bool_), "dtype bool"),
    (np.zeros((1, 2, 8), np.int32), "shape [1, 2, 8]"),
    (np.zeros((3, 1), np.int32), "at least 2 tokens"),
    (np.zeros((1,), np.int32), "1 token(s)"),
  ],
)
def test_bad_token_files(capsys, tmp_path, arr, msg):
  path = _npy(tmp_path, arr)
  _fails(capsys, [*TINY, "--tokens", path], path, msg)


def test_layers_and_experts_beyond_the_model(capsys):
  _fails(capsys, [*TINY, "--layers", "9"], "--layers 9", "4 layers")
  _fails(capsys, [*TINY, "--experts", "32"], "--experts 32", "16 routed experts")


def test_text_without_tokenizer(capsys, tmp_path, tiny):
  text = tmp_path / "t.txt"
  text.write_text("hello world")
  _fails(capsys, [*TINY, "--text", str(text)], "no tokenizer")
  cfg, params = tiny
  d = tmp_path / "hf"
  hf_writer.save(str(d), cfg, params)
  _fails(capsys, [str(d), "--text", str(text)], "tokenizer.json not found")


def test_sensitivity_type(capsys):
  _fails(capsys, [*TINY, "--sensitivity", "--sensitivity-type", "Q9_X"], "--sensitivity-type", "Q9_X")
  _fails(capsys, [*TINY, "--sensitivity-type", "Q4_K"], "needs --sensitivity")


@pytest.mark.parametrize("value", ["Q2_K", "q2_k", "Q8_0"])
def test_sensitivity_type_without_sensitivity_even_the_default(capsys, value):
  # Q2_K is the default type: giving it explicitly without --sensitivity used to pass unnoticed.
  assert cli.main(["ablate", *TINY, "--sensitivity-type", value, "--no-progress"]) == 2
  assert capsys.readouterr().err == (
    f"dq3jax ablate: error: --sensitivity-type {value} needs --sensitivity (it sets that map's type)\n"
  )


def test_missing_checkpoint(capsys, tmp_path):
  _fails(capsys, [str(tmp_path / "nope")], "not a directory")
