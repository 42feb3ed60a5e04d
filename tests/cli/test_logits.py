"""`dq3jax logits` end to end through dq3jax.cli.main: dtypes, truncation, FP8 rounding, bad input."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from dq3jax import cli
from dq3jax.convert.quantize import quantize_to_gguf
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import gguf_read, hf_writer
from dq3jax.io.safetensors_format import read_header
from dq3jax.model import random_init, runner


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
  argv = [str(root / "model"), "--tokens", str(root / "tokens.npy"), "--out", str(out), "--dtype", dtype]
  assert cli.main(["logits", *argv, "--no-progress"]) == 0
  got = np.load(out)
  # float64 is written as computed; numpy has no bfloat16, which float32 holds exactly.
  stored = np.float64 if dtype == "float64" else np.float32
  assert got.dtype == stored and got.shape == (2, 10, cfg.vocab_size)
  want = runner.logits(params, tokens, cfg, dtype=dtype)
  assert want.dtype.name == dtype
  np.testing.assert_array_equal(got, want.astype(stored))


def test_logits_file_is_written_atomically_with_numpys_suffix(checkpoint, tmp_path):
  root, cfg, params, tokens = checkpoint
  argv = [str(root / "model"), "--tokens", str(root / "tokens.npy"), "--out", str(tmp_path / "logits")]
  assert cli.main(["logits", *argv, "--no-progress"]) == 0
  assert sorted(os.listdir(tmp_path)) == ["logits.npy"]  # the .npy np.save adds; no temp file left
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), runner.logits(params, tokens, cfg))


def test_failed_logits_write_leaves_no_file(checkpoint, tmp_path, monkeypatch):
  root, *_ = checkpoint

  def half_then_fail(file, arr):
    (open(file, "wb") if isinstance(file, (str, os.PathLike)) else file).write(b"\x93NUMPY partial")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(np, "save", half_then_fail)
  argv = [str(root / "model"), "--tokens", str(root / "tokens.npy"), "--out", str(tmp_path / "o.npy")]
  assert cli.main(["logits", *argv, "--no-progress"]) == 2
  assert os.listdir(tmp_path) == []


def test_truncated_logits_command(checkpoint):
  root, cfg, params, tokens = checkpoint
  out = root / "small.npy"
  argv = [str(root / "model"), "--tokens", str(root / "tokens.npy"), "--out", str(out)]
  assert cli.main(["logits", *argv, "--layers", "2", "--experts", "4", "--no-progress"]) == 0
  small = cfg.truncate(layers=2, experts=4)
  want = runner.logits(random_init.truncate_params(params, cfg, small), tokens, small)
  np.testing.assert_array_equal(np.load(out), want)


def test_bad_tokens(checkpoint, tmp_path, capsys):
  root, *_ = checkpoint
  np.save(tmp_path / "t.npy", np.zeros(5, np.int64))
  argv = [str(root / "model"), "--tokens", str(tmp_path / "t.npy"), "--out", str(tmp_path / "o.npy")]
  assert cli.main(["logits", *argv, "--no-progress"]) == 2
  assert "[batch, seq]" in capsys.readouterr().err
  np.save(tmp_path / "t.npy", np.full((1, 3), 10_000, np.int64))
  assert cli.main(["logits", *argv, "--no-progress"]) == 2
  assert "token ids must be in [0, " in capsys.readouterr().err
  assert not (tmp_path / "o.npy").exists()


def test_bad_checkpoint(tmp_path, capsys):
  np.save(tmp_path / "t.npy", np.zeros((1, 2), np.int64))
  argv = ["logits", str(tmp_path), "--tokens", str(tmp_path / "t.npy"), "--out", str(tmp_path / "o.npy")]
  assert cli.main([*argv, "--no-progress"]) == 2
  assert capsys.readouterr().err == f"dq3jax logits: error: {tmp_path / 'config.json'}: file not found\n"
  assert not (tmp_path / "o.npy").exists()


def test_fp8_bf16_rounding_flag(tmp_path):
  from dq3jax.io import safetensors_ckpt

  cfg = random_init.tiny_config(num_hidden_layers=2)
  hf_writer.save(str(tmp_path / "m"), cfg, random_init.init_params(cfg, 22), fp8=True)
  tokens = np.arange(8).reshape(1, 8)
  np.save(tmp_path / "t.npy", tokens)
  outs = {}
  for flag in ([], ["--fp8-bf16"]):
    out = tmp_path / f"o{len(flag)}.npy"
    argv = ["logits", str(tmp_path / "m"), "--tokens", str(tmp_path / "t.npy"), "--out", str(out), *flag]
    assert cli.main([*argv, "--no-progress"]) == 0
    outs[len(flag)] = np.load(out)
  _, rounded = safetensors_ckpt.load(str(tmp_path / "m"), round_fp8_to_bf16=True)
  np.testing.assert_array_equal(outs[1], runner.logits(rounded, tokens, cfg))
  assert not np.array_equal(outs[0], outs[1])


EXPECTED = "expected a deepseek2 .gguf file or an HF checkpoint directory (config.json + *.safetensors)"


def _logits(argv):
  """(exit code, stderr without the loaders' progress bars) of `dq3jax logits ...` through cli.main."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = cli.main(["logits", *argv])
  lines = [line.split("\r")[-1] for line in err.getvalue().split("\n")]
  return rc, "".join(f"{line}\n" for line in lines if line and not line.startswith(("loading:", "reading:")))


@pytest.mark.parametrize("kind", ["text", "other-magic", "empty", "safetensors-file", "missing"])
def test_path_that_is_neither_gguf_nor_checkpoint_dir(checkpoint, tmp_path, kind):
  root, *_ = checkpoint
  path = tmp_path / {"safetensors-file": "model.safetensors"}.get(kind, "model.bin")
  found = {
    "text": (b"hello, world\n", "a 13-byte file starting with b'hello, w' (no b'GGUF' magic)"),
    "other-magic": (
      b"GGML" + bytes(12),
      "a 16-byte file starting with b'GGML\\x00\\x00\\x00\\x00' (no b'GGUF' magic)",
    ),
    "empty": (b"", "an empty file"),
  }
  if kind == "safetensors-file":
    data = (root / "model" / "model-00001-of-00002.safetensors").read_bytes()
    path.write_bytes(data)
    want = (
      f"checkpoint {path}: {EXPECTED}, found a {len(data)}-byte file starting with {data[:8]!r} (no b'GGUF' "
      f"magic); for an HF checkpoint give the directory that holds it ({tmp_path})"
    )
  elif kind == "missing":
    want = f"checkpoint {path}: no such file or directory; {EXPECTED}"
  else:
    path.write_bytes(found[kind][0])
    want = f"checkpoint {path}: {EXPECTED}, found {found[kind][1]}"
  out = tmp_path / "o.npy"
  rc, err = _logits([str(path), "--tokens", str(root / "tokens.npy"), "--out", str(out)])
  assert (rc, err) == (2, f"dq3jax logits: error: {want}\n")
  assert not out.exists()


def test_bad_paths_exit_2_without_traceback_in_a_subprocess(checkpoint, tmp_path):
  root, *_ = checkpoint
  text = tmp_path / "notes.txt"
  text.write_text("not a model\n")
  for path in (text, tmp_path):  # a text file; a directory without config.json
    run = subprocess.run(
      [sys.executable, "-m", "dq3jax.cli", "logits", str(path), "--tokens", str(root / "tokens.npy"),
       "--out", str(tmp_path / "o.npy")],
      capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("dq3jax logits: error: "), run.stderr
  assert not (tmp_path / "o.npy").exists()


@pytest.fixture(scope="module")
def nan_checkpoint(checkpoint, tmp_path_factory):
  root, cfg, params, tokens = checkpoint
  bad = jax.tree_util.tree_map(np.array, params)
  bad["layers"][1]["attn"]["wq_b"][5, 7] = np.nan
  d = tmp_path_factory.mktemp("nan") / "model"
  hf_writer.save(str(d), cfg, bad)
  return d


def test_nan_weight_is_refused_naming_file_tensor_element_offset(checkpoint, nan_checkpoint, tmp_path):
  root, cfg, *_ = checkpoint
  shard = nan_checkpoint / "model.safetensors"
  name = "model.layers.1.self_attn.q_b_proj.weight"
  info = read_header(str(shard))[name]
  flat = 5 * cfg.q_lora_rank + 7
  out = tmp_path / "o.npy"
  rc, err = _logits([str(nan_checkpoint), "--tokens", str(root / "tokens.npy"), "--out", str(out)])
  assert rc == 2 and not out.exists()
  assert err == (
    f"dq3jax logits: error: {shard}: tensor {name!r} (F32, shape {list(info.shape)}): 1 non-finite value(s); "
    f"the first is element [5, 7] (flat {flat}) = nan, at byte offset {info.begin + 4 * flat} "
    "(--allow-nonfinite computes the logits anyway)\n"
  )


def test_allow_nonfinite_computes_with_a_loud_warning(checkpoint, nan_checkpoint, tmp_path):
  root, cfg, *_ = checkpoint
  out = tmp_path / "o.npy"
  rc, err = _logits(
    [str(nan_checkpoint), "--tokens", str(root / "tokens.npy"), "--out", str(out), "--allow-nonfinite"]
  )
  assert rc == 0
  got = np.load(out)
  # Row 5 of wq_b feeds head 0's queries at every position: every logit after layer 1 is NaN.
  assert got.shape == (2, 10, cfg.vocab_size) and np.isnan(got).all()
  lines = err.splitlines()
  assert lines[0] == (
    "dq3jax logits: WARNING: --allow-nonfinite: 1 weight tensor(s) hold NaN or Inf; the logits computed from "
    "them are likely NaN or meaningless:"
  )
  shard = nan_checkpoint / "model.safetensors"
  assert lines[1].startswith(f"  {shard}: tensor 'model.layers.1.self_attn.q_b_proj.weight' (F32, ")
  assert lines[-1] == f"dq3jax logits: WARNING: {got.size} of {got.size} logits are NaN or Inf"


def test_gguf_inf_block_scale_is_refused_naming_block_and_bytes(checkpoint, tmp_path):
  root, cfg, params, _ = checkpoint
  path = tmp_path / "q8.gguf"
  quantize_to_gguf(ParamsSource(params, cfg), path, "Q8_0")
  t = gguf_read.read_gguf(path).tensors["blk.2.attn_output.weight"]  # Q8_0 [32, 32]: 32 blocks
  assert t.type_name == "Q8_0"
  with open(path, "r+b") as f:
    f.seek(t.offset + 34 * 9)
    f.write(struct.pack("<H", 0x7C00))  # block 9's d = +Inf
  start = t.offset + 34 * 9
  out = tmp_path / "o.npy"
  rc, err = _logits([str(path), "--tokens", str(root / "tokens.npy"), "--out", str(out)])
  assert rc == 2 and not out.exists()
  name = "blk.2.attn_output.weight"
  assert err.startswith(f"dq3jax logits: error: {path}: tensor {name!r} (Q8_0, ne [32, 32]): ")
  assert f"is in block 9 (bytes [{start}, {start + 34}) of the file)" in err
  rc, err = _logits([str(path), "--tokens", str(root / "tokens.npy"), "--out", str(out), "--allow-nonfinite"])
  assert rc == 0 and os.path.exists(out)
  assert "WARNING: --allow-nonfinite: 1 weight tensor(s)" in err and "block 9" in err


def test_logits_of_a_gguf_are_the_models_on_its_dequantized_weights(checkpoint, tmp_path):
  """The GGUF branch: `dq3jax logits model.gguf` runs the weights ggml would read (Q4_K_M here), not the source's."""
  root, cfg, params, tokens = checkpoint
  path = tmp_path / "q4km.gguf"
  quantize_to_gguf(ParamsSource(params, cfg), path, "Q4_K_M")
  out = tmp_path / "o.npy"
  rc, err = _logits([str(path), "--tokens", str(root / "tokens.npy"), "--out", str(out), "--no-progress"])
  assert rc == 0, err
  g_cfg, g_params = gguf_read.load(path)
  want = runner.logits(g_params, tokens, g_cfg)
  got = np.load(out)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, runner.logits(params, tokens, cfg))  # quantization moved them
