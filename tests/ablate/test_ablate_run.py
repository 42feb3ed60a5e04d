"""The ablation's numbers: what llama-perplexity's statistics give on the same logits, sizes from the bytes,
sampled evaluation tokens, HF checkpoints and text input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dq3jax.ablate import run as ablate
from dq3jax.ablate.roundtrip import quantized_params
from dq3jax.compare.logit_stats import logit_stats
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import hf_writer
from dq3jax.model import runner
from dq3jax.recipes.plan import plan_from_config

SPEC = ablate.AblationSpec(checkpoint="builtin:v3-tiny", layers=2, recipes=("F32", "Q8_0", "Q4_K_M"), ctx=16,
                           sequences=3, seed=7)  # fmt: skip


@pytest.fixture(scope="module")
def result():
  return ablate.run(SPEC)


def test_f32_recipe_is_exactly_the_base_model(result):
  f32 = result.recipes[0]
  assert f32.recipe == "F32" and f32.bits_per_weight == 32.0 and f32.bytes == 4 * f32.params
  s = f32.stats
  assert s.kld_mean == 0 and s.kld["max"] == 0 and s.same_top_p == 1 and s.max_abs == 0
  assert s.ppl_ratio == 1 and s.dp_mean == 0


def test_stats_are_logit_stats_of_the_quantized_model(result, tiny):
  cfg, params = tiny
  assert result.tokens.kind == "sampled" and result.tokens.shape == (3, 16) and result.tokens.next_token_stats
  tokens = ablate.sample_tokens(params, cfg, sequences=3, length=16, seed=7)
  base = runner.logits(params, tokens, cfg)
  q_params, infos = quantized_params(ParamsSource(params, cfg), "Q4_K_M")
  q = runner.logits(q_params, tokens, cfg)
  want = logit_stats(base[:, :-1].reshape(-1, cfg.vocab_size), q[:, :-1].reshape(-1, cfg.vocab_size),
                     tokens[:, 1:].reshape(-1))  # fmt: skip
  got = result.recipes[2].stats
  assert got.n == 3 * 15
  assert got.to_dict() == want.to_dict()
  r = result.recipes[2]
  assert r.bytes == sum(i.bytes for i in infos) and r.bits_per_weight == 8 * r.bytes / r.params
  # Same numbers as `dq3jax plan` gives for the recipe on this (truncated) config.
  plan = plan_from_config(cfg.to_hf_config(), "Q4_K_M")
  assert r.bytes == plan.total_bytes and r.params == plan.total_params
  assert 0 < result.recipes[1].stats.kld_mean < r.stats.kld_mean  # Q8_0 closer than Q4_K_M's Q5_0/Q8_0/F16


def test_sampled_tokens_follow_the_model_and_the_seed(tiny):
  cfg, params = tiny
  a = ablate.sample_tokens(params, cfg, sequences=2, length=12, seed=1)
  assert a.dtype == np.int32 and a.shape == (2, 12) and a.min() >= 0 and a.max() < cfg.vocab_size
  assert np.array_equal(a, ablate.sample_tokens(params, cfg, sequences=2, length=12, seed=1))
  assert not np.array_equal(a, ablate.sample_tokens(params, cfg, sequences=2, length=12, seed=2))
  # The decode steps (latent cache, absorbed MLA) see the same distribution as the full forward pass.
  full = runner.logits(params, a, cfg)
  steps = runner.incremental_logits(params, a, cfg, prefill=1)
  np.testing.assert_allclose(steps, full, atol=1e-4 * np.abs(full).max())


def test_hf_checkpoint_with_text(tiny, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  cfg, params = tiny
  d = tmp_path / "hf"
  hf_writer.save(str(d), cfg, params)
  vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(d / "tokenizer.json"))
  text = tmp_path / "t.txt"
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 40)
  text.write_text(" ".join(f"w{i}" for i in ids))
  spec = ablate.AblationSpec(checkpoint=str(d), text=str(text), recipes=("F32", "Q8_0"), ctx=16, sequences=8)
  s = ablate.setup(spec)
  assert s.token_kind == "text" and np.array_equal(s.tokens, ids[:32].reshape(2, 16))
  res = ablate.run(s)
  assert res.model.name == str(d) and res.recipes[0].stats.kld_mean == 0 and res.recipes[1].stats.ppl_ratio
  assert res.tokens.next_token_stats


def test_random_token_file_without_next_token_stats(tmp_path):
  path = tmp_path / "t.npy"
  np.save(path, np.arange(40, dtype=np.int16) % 100)  # a stream: cut into windows of ctx
  spec = ablate.AblationSpec(checkpoint="builtin:v3-tiny", layers=1, tokens=str(path), tokens_are_text=False,
                             recipes=("Q8_0",), ctx=16)  # fmt: skip
  res = ablate.run(spec)
  assert res.tokens.shape == (2, 16) and res.tokens.kind == "tokens" and not res.tokens.next_token_stats
  s = res.recipes[0].stats
  assert s.ppl_ratio is None and s.dp_mean is None and s.kld_mean > 0


def test_report_json_uses_style_keys(result, tmp_path):
  from dq3jax.ablate import report

  out = tmp_path / "sub" / "r.json"
  report.write_json(result, out)
  assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left behind
  d = json.loads(out.read_text())
  st = d["recipes"][2]["stats"]
  for key in ("mean_kld", "mean_kld_unc", "kld_max", "kld_p99_9", "kld_p99", "kld_median", "kld_p0_1", "kld_min",
              "same_top_p", "same_top_p_unc", "mean_dp", "rms_dp", "mean_ln_ppl_ratio", "ppl_ratio_unc"):  # fmt: skip
    assert key in st, key
  assert st["mean_kld"] == result.recipes[2].stats.kld_mean
  assert d["recipes"][0]["bits_per_weight"] == 32 and d["tokens"]["shape"] == [3, 16]
  assert os.path.getsize(out) > 0 and d["sensitivity"] is None
  table = report.recipe_table(result)
  assert table.count("\n") == 2 + len(result.recipes) - 1 and "| F32 | 32.000 |" in table
