"""The `logits` subcommand, driven through its own argparse parser."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from dq3jax.io import hf_writer
from dq3jax.model import cli_logits, random_init, runner


def parse(argv):
  parser = argparse.ArgumentParser(prog="dq3jax")
  cli_logits.add_parser(parser.add_subparsers(dest="command", required=True))
  return parser.parse_args(argv)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg = random_init.tiny_config()
  params = random_init.init_params(cfg, 21)
  root = tmp_path_factory.mktemp("ckpt")
  hf_writer.save(str(root / "model"), cfg, params, shards=2)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
  np.save(root / "tokens.npy", tokens)
  return root, cfg, params, tokens


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_logits_command(checkpoint, dtype):
  root, cfg, params, tokens = checkpoint
  out = root / f"logits_{dtype}.npy"
  args = parse(
    ["logits", str(root / "model"), "--tokens", str(root / "tokens.npy"), "--out", str(out), "--dtype", dtype]
  )
  assert args.func(args) == 0
  got = np.load(out)
  assert got.dtype == np.float32 and got.shape == (2, 10, cfg.vocab_size)
  want = runner.logits(params, tokens, cfg, dtype=dtype).astype(np.float32)
  np.testing.assert_array_equal(got, want)


def test_truncated_logits_command(checkpoint):
  root, cfg, params, tokens = checkpoint
  out = root / "small.npy"
  args = parse(
    [
      "logits",
      str(root / "model"),
      "--tokens",
      str(root / "tokens.npy"),
      "--out",
      str(out),
      "--layers",
      "2",
      "--experts",
      "4",
    ]
  )
  assert cli_logits.run(args) == 0
  small = cfg.truncate(layers=2, experts=4)
  want = runner.logits(random_init.truncate_params(params, cfg, small), tokens, small)
  np.testing.assert_array_equal(np.load(out), want)


def test_bad_tokens(checkpoint, tmp_path, capsys):
  root, *_ = checkpoint
  np.save(tmp_path / "t.npy", np.zeros(5, np.int64))
  args = parse(
    ["logits", str(root / "model"), "--tokens", str(tmp_path / "t.npy"), "--out", str(tmp_path / "o.npy")]
  )
  assert cli_logits.run(args) == 2
  assert "[batch, seq]" in capsys.readouterr().err
  np.save(tmp_path / "t.npy", np.full((1, 3), 10_000, np.int64))
  assert cli_logits.run(args) == 2


def test_bad_checkpoint(tmp_path, capsys):
  np.save(tmp_path / "t.npy", np.zeros((1, 2), np.int64))
  args = parse(
    ["logits", str(tmp_path), "--tokens", str(tmp_path / "t.npy"), "--out", str(tmp_path / "o.npy")]
  )
  assert cli_logits.run(args) == 1
  assert "config.json" in capsys.readouterr().err


def test_fp8_bf16_rounding_flag(tmp_path):
  from dq3jax.io import safetensors_ckpt

  cfg = random_init.tiny_config(num_hidden_layers=2)
  hf_writer.save(str(tmp_path / "m"), cfg, random_init.init_params(cfg, 22), fp8=True)
  tokens = np.arange(8).reshape(1, 8)
  np.save(tmp_path / "t.npy", tokens)
  outs = {}
  for flag in ([], ["--fp8-bf16"]):
    out = tmp_path / f"o{len(flag)}.npy"
    args = parse(
      ["logits", str(tmp_path / "m"), "--tokens", str(tmp_path / "t.npy"), "--out", str(out), *flag]
    )
    assert cli_logits.run(args) == 0
    outs[len(flag)] = np.load(out)
  _, rounded = safetensors_ckpt.load(str(tmp_path / "m"), round_fp8_to_bf16=True)
  np.testing.assert_array_equal(outs[1], runner.logits(rounded, tokens, cfg))
  assert not np.array_equal(outs[0], outs[1])
