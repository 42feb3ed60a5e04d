"""`dq3jax quantize` end to end on small HF checkpoints (FP8, sharded), through dq3jax.cli.main."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dq3jax import cli
from dq3jax.io import gguf_meta, gguf_read, hf_writer, safetensors_ckpt
from dq3jax.io.imatrix import write_gguf as write_imatrix
from dq3jax.model import runner
from dq3jax.model.random_init import init_params, tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  cfg = tiny_config(vocab_size=96)
  d = tmp_path_factory.mktemp("ckpt") / "hf"
  hf_writer.save(str(d), cfg, init_params(cfg, 5), shards=2, fp8=True)
  return cfg, str(d)


def test_quantize_q8_0_truncated(ckpt, tmp_path, capsys):
  cfg, d = ckpt
  out = tmp_path / "m.gguf"
  rc = cli.main([
    "quantize", d, str(out), "--recipe", "Q8_0", "--layers", "2", "--experts", "4", "--no-progress"
  ])  # fmt: skip
  assert rc == 0
  text = capsys.readouterr().out
  assert "recipe Q8_0" in text and "Q8_0" in text and "F16" in text and "bits/weight" in text
  small, params = gguf_read.load(out)
  assert small == gguf_meta.as_written(cfg.truncate(layers=2, experts=4))
  # The file runs: finite logits of the right shape.
  logits = runner.logits(params, np.array([[1, 2, 3]]), small)
  assert logits.shape == (1, 3, cfg.vocab_size) and np.isfinite(logits).all()


def test_quantize_f32_equals_checkpoint(ckpt, tmp_path):
  cfg, d = ckpt
  out = tmp_path / "m.gguf"
  assert cli.main(["quantize", d, str(out), "--recipe", "F32", "--layout", "kv_b", "--no-progress"]) == 0
  _, want = safetensors_ckpt.load(d)
  _, got = gguf_read.load(out)
  np.testing.assert_array_equal(got["layers"][2]["attn"]["wkv_b"], want["layers"][2]["attn"]["wkv_b"])
  np.testing.assert_array_equal(
    got["layers"][2]["mlp"]["experts"]["w_up"], want["layers"][2]["mlp"]["experts"]["w_up"]
  )


def test_quantize_with_imatrix_file(ckpt, tmp_path):
  cfg, d = ckpt
  ents = {"blk.1.ffn_up_exps.weight": (np.full((8, cfg.hidden_size), 2.0, np.float32), np.full(8, 3))}
  im = tmp_path / "im.gguf"
  write_imatrix(im, ents, datasets=("x",), chunk_count=1, chunk_size=3)
  # tiny widths are not multiples of 256: Q4_K_M falls back to Q5_0 (which reads importance weights) or F16.
  a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
  assert cli.main(["quantize", d, str(a), "--recipe", "Q4_K_M", "--no-progress"]) == 0
  assert cli.main(["quantize", d, str(b), "--recipe", "Q4_K_M", "--imatrix", str(im), "--no-progress"]) == 0
  fa, fb = gguf_read.read_gguf(a), gguf_read.read_gguf(b)
  for name in fa.tensors:
    assert (bytes(fa.raw(name)) != bytes(fb.raw(name))) == (name == "blk.1.ffn_up_exps.weight"), name


@pytest.mark.parametrize(
  "args, msg",
  [
    (["--recipe", "Q9_K"], "unknown recipe"),
    (["--recipe", "Q8_0", "--layers", "9"], "layers=9"),
    (["--recipe", "Q8_0", "--imatrix", "/nonexistent/im.dat"], "/nonexistent/im.dat"),
  ],
)
def test_quantize_errors(ckpt, tmp_path, capsys, args, msg):
  _, d = ckpt
  out = tmp_path / "m.gguf"
  assert cli.main(["quantize", d, str(out), *args, "--no-progress"]) == 2  # bad input
  err = capsys.readouterr().err
  assert err.startswith("dq3jax quantize: error: ") and msg in err
  assert os.listdir(tmp_path) == []


def test_quantize_missing_checkpoint(tmp_path, capsys):
  assert cli.main(["quantize", str(tmp_path / "nope"), str(tmp_path / "m.gguf"), "--recipe", "F16"]) == 2
  assert "config.json" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_quantize_bf16(ckpt, tmp_path, capsys):
  out = tmp_path / "m.gguf"
  assert cli.main(["quantize", ckpt[1], str(out), "--recipe", "BF16", "--no-progress"]) == 0
  assert "recipe BF16" in capsys.readouterr().out and gguf_read.is_gguf(out)


# Run in a subprocess: `dq3jax quantize` through dq3jax.cli.main, with dq3jax.quantize slowed so that the
# signal reliably arrives while the output is being written (after the header, inside the first tensor).
_SLOW_QUANTIZE = """
import sys, time
import dq3jax
from dq3jax import cli

def slow(*args, **kwargs):
  print("quantizing", file=sys.stderr, flush=True)
  time.sleep(300)

dq3jax.quantize = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_while_writing_removes_the_temp_file(ckpt, tmp_path):
  _, d = ckpt
  out = tmp_path / "m.gguf"
  proc = subprocess.Popen(
    [sys.executable, "-c", _SLOW_QUANTIZE, "quantize", d, str(out), "--recipe", "Q8_0", "--no-progress"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    # The temp file is atomic_path's: ".m.gguf.<random>.tmp" beside the output.
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".m.gguf.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    first = proc.stderr.readline()  # printed by the first quantize call: the header is written by then
    assert first == "quantizing\n" and [p.name for p in tmp_path.glob(".m.gguf.*.tmp")], first
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert "Traceback" not in err
  assert os.listdir(tmp_path) == []
