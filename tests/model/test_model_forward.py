"""Forward pass self-consistency: attention forms, prefill vs decode, precision modes, intermediates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq3jax.model import random_init, runner
from dq3jax.model.mla import AttnForm

# Relative to max |logit|.
F64_TOL = 1e-12
F32_TOL = 1e-5


def rel(a, b):
  return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def model():
  cfg = random_init.tiny_config()
  tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 24))
  return cfg, random_init.init_params(cfg, 11), tokens


@pytest.fixture(scope="module")
def f64_logits(model):
  cfg, params, tokens = model
  return runner.logits(params, tokens, cfg, dtype="float64")


def test_absorbed_equals_expanded(model, f64_logits):
  cfg, params, tokens = model
  assert (
    rel(runner.logits(params, tokens, cfg, dtype="float64", form=AttnForm.ABSORBED), f64_logits) < F64_TOL
  )
  f32 = runner.logits(params, tokens, cfg, form=AttnForm.ABSORBED)
  assert rel(f32, runner.logits(params, tokens, cfg)) < F32_TOL


@pytest.mark.parametrize("form", list(AttnForm), ids=lambda f: f.value)
@pytest.mark.parametrize("prefill", [0, 1, 9])
def test_decode_token_by_token_equals_prefill(model, f64_logits, form, prefill):
  cfg, params, tokens = model
  inc = runner.incremental_logits(params, tokens, cfg, prefill=prefill, dtype="float64", form=form)
  assert inc.shape == f64_logits.shape
  assert rel(inc, f64_logits) < F64_TOL


def test_decode_float32(model):
  cfg, params, tokens = model
  inc = runner.incremental_logits(params, tokens, cfg, prefill=5)
  assert inc.dtype == np.float32
  assert rel(inc, runner.logits(params, tokens, cfg)) < F32_TOL


def test_float32_close_to_float64(model, f64_logits):
  cfg, params, tokens = model
  out = runner.logits(params, tokens, cfg)
  assert out.dtype == np.float32 and f64_logits.dtype == np.float64
  assert rel(out, f64_logits) < F32_TOL


def test_float64_does_not_leak_x64(model):
  cfg, params, tokens = model
  runner.logits(params, tokens[:, :3], cfg, dtype="float64")
  assert not jax.config.jax_enable_x64
  assert jnp.zeros(1).dtype == jnp.float32


def test_bfloat16_runs_and_tracks_float32(model, f64_logits):
  cfg, params, tokens = model
  out = runner.logits(params, tokens, cfg, dtype="bfloat16")
  assert out.dtype == jnp.bfloat16
  out = out.astype(np.float32)
  # bf16 weights and activations (8-bit mantissa) and possible expert flips: a coarse sanity bound, plus
  # agreement of the arg-max token on most positions.
  assert rel(out, f64_logits) < 0.3
  assert (out.argmax(-1) == f64_logits.argmax(-1)).mean() > 0.8


def test_intermediates(model, f64_logits):
  cfg, params, tokens = model
  logits, inter = runner.logits_and_intermediates(params, tokens, cfg, dtype="float64")
  np.testing.assert_array_equal(logits, f64_logits)
  assert len(inter) == cfg.num_hidden_layers
  b, t = tokens.shape
  for i, rec in enumerate(inter):
    assert rec["hidden_after_attn"].shape == rec["hidden_after_mlp"].shape == (b, t, cfg.hidden_size)
    assert rec["attn_latent"].shape == (b, t, cfg.kv_lora_rank)
    if cfg.is_moe_layer(i):
      k = cfg.num_experts_per_tok
      assert rec["topk_ids"].shape == rec["topk_weights"].shape == (b, t, k)
      assert np.all((rec["topk_ids"] >= 0) & (rec["topk_ids"] < cfg.n_routed_experts))
      assert np.all(np.diff(np.sort(rec["topk_ids"], -1), axis=-1) > 0)  # distinct experts
      np.testing.assert_allclose(rec["topk_weights"].sum(-1), cfg.routed_scaling_factor, rtol=1e-12)
    else:
      assert "topk_ids" not in rec


def test_truncated_params_run(model):
  cfg, params, tokens = model
  small = cfg.truncate(layers=2, experts=4)
  assert (small.n_group, small.topk_group) == (2, 2)
  out = runner.logits(random_init.truncate_params(params, cfg, small), tokens, small)
  assert out.shape == (*tokens.shape, cfg.vocab_size) and np.isfinite(out).all()
