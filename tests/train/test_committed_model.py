"""The committed v3-pydoc checkpoint: it loads with dq3jax.io, reproduces the report's held-out perplexity
through dq3jax's forward, and `dq3jax ablate --text` runs on it."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from dq3jax import cli
from dq3jax.io import safetensors_ckpt
from dq3jax.train import evaluate, run, spec

MODEL = pathlib.Path(__file__).resolve().parents[2] / "goldens" / "models" / "v3-pydoc"
REPORT = json.loads((MODEL / "train" / "report.json").read_text())
HELD = json.loads((MODEL / "train" / "heldout_tokens.json").read_text())


def test_checkpoint_loads_as_the_spec_config():
  cfg, params = safetensors_ckpt.load(str(MODEL / "hf"))
  assert cfg == spec.CONFIG
  assert sum(np.asarray(a).size for a in _leaves(params)) == REPORT["parameters"]
  assert len(HELD["token_ids"]) == run.HELDOUT_TOKENS and HELD["token_ids"][0] == 0


def _leaves(tree):
  import jax  # noqa: PLC0415

  return jax.tree_util.tree_leaves(tree)


def test_heldout_prefix_perplexity_matches_the_report():
  cfg, params = safetensors_ckpt.load(str(MODEL / "hf"))
  n = 256
  tokens = evaluate.windows(np.asarray(HELD["token_ids"][:n], np.int32), run.EVAL_WINDOW)
  ppl = evaluate.perplexity(params, cfg, tokens)
  want = REPORT["final_bf16"]["heldout_prefix_perplexity"][str(n)]
  assert abs(ppl - want) <= 1e-3 * want, (ppl, want)
  # A trained model: far better than the uniform distribution over the 1024 tokens.
  assert ppl < 100


def test_ablate_runs_on_the_committed_model(tmp_path, capsys):
  text = tmp_path / "heldout.txt"
  text.write_text(HELD["text"].replace("<｜begin▁of▁sentence｜>", ""), encoding="utf-8")
  rc = cli.main([
    "ablate", str(MODEL / "hf"), "--text", str(text), "--recipes", "F32,Q4_K_M", "--layers", "3",
    "--ctx", "64", "--sequences", "2", "--no-progress",
  ])  # fmt: skip
  assert rc == 0
  out = capsys.readouterr().out
  assert "| F32 | 32.000 |" in out and "| Q4_K_M |" in out
