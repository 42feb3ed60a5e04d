"""Each planted bug makes llama.cpp compute what the named engine bug computes: llama.cpp on the edited copy of
v3-tiny F32 (F32 KV cache) against dq3jax run on the clean file with that bug in its config. Both are float32
without activation quantization, so a faithful plant agrees to float32 noise. Measured worst NMSE over logits
and every layer's attn_latent / hidden_after_attn / hidden_after_mlp: 4.9e-13 (yarn_mscale_missing) ..
1.6e-12 (topk_norm_off); the clean file gives 6.3e-13, and every plant moves some tensor by 1.4e-7
(rope_base_+10pct: YaRN factor 40 over 32 positions leaves small angles) to 5.9 (topk_norm_off) against the
clean run.
Planted bugs without a dq3jax config knob are checked from llama.cpp's own graph tensors instead."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

from reference import llama_cpp_run as R
from reference import planted_bugs as B

pytestmark = pytest.mark.crosscheck

MODEL = pathlib.Path(__file__).resolve().parents[2] / "goldens" / "models" / "v3-tiny"
GGUF = MODEL / "gguf" / "F32.gguf"
BOUND = 1e-10  # measured <= 1.6e-12


@pytest.fixture(scope="module")
def model():
  from dq3jax.io import gguf_read

  tokens, prefill = R.golden_tokens(MODEL / "outputs" / "F32.safetensors")
  cfg, params = gguf_read.load(GGUF)
  return tokens, prefill, cfg, params


def _engine_bug(cfg, bug):
  """The DeepSeek-V3 config of an engine that has `bug` (the values a wrong engine would use)."""
  f32 = np.float32
  rope = cfg.rope
  return {
    "routed_scale_x2.5": dict(routed_scaling_factor=float(f32(cfg.routed_scaling_factor) * f32(2.5))),
    "routed_scale_+5pct": dict(routed_scaling_factor=float(f32(cfg.routed_scaling_factor) * f32(1.05))),
    "topk_norm_off": dict(norm_topk_prob=False),
    "selection_bias_ignored": dict(use_router_bias=False),
    "group_limit_ignored": dict(n_group=1, topk_group=1),
    "rope_base_+10pct": dict(rope=dataclasses.replace(rope, theta=float(f32(rope.theta) * f32(1.1)))),
    "rope_pairing_neox": dict(rope_interleave=False),
    # softmax scale without mscale^2, rotary magnitude unchanged (1)
    "yarn_mscale_missing": dict(rope=dataclasses.replace(rope, mscale_all_dim=None, attention_factor=1.0)),
    # softmax mscale^2 kept, and cos/sin multiplied by mscale as well
    "yarn_mscale_on_rope": dict(
      rope=dataclasses.replace(rope, attention_factor=1 + 0.1 * rope.mscale_all_dim * np.log(rope.factor))
    ),
  }[bug]


@pytest.mark.parametrize(
  "bug",
  [
    "routed_scale_x2.5",
    "routed_scale_+5pct",
    "topk_norm_off",
    "selection_bias_ignored",
    "group_limit_ignored",
    "rope_base_+10pct",
    "rope_pairing_neox",
    "yarn_mscale_missing",
    "yarn_mscale_on_rope",
  ],
)
def test_llama_cpp_on_the_plant_is_dq3jax_with_the_bug(bug, model, tmp_path):
  from dq3jax.compare.metrics import nmse
  from dq3jax.model import runner

  tokens, prefill, cfg, params = model
  B.apply(bug, GGUF, tmp_path / "bug.gguf")
  lc = R.run(tmp_path / "bug.gguf", tokens, prefill, R.Settings(kv_cache="f32"))
  logits, inter = runner.logits_and_intermediates(
    params, np.asarray(tokens)[None], dataclasses.replace(cfg, **_engine_bug(cfg, bug))
  )
  clean = R.run(GGUF, tokens, prefill, R.Settings(kv_cache="f32"))
  effect = max(nmse(clean[k], lc[k]) for k in lc if not k.startswith("meta.") and not k.endswith("topk_ids"))
  worst = nmse(logits[0], lc["logits"])
  for i, rec in enumerate(inter):
    for k in ("attn_latent", "hidden_after_attn", "hidden_after_mlp"):
      worst = max(worst, nmse(np.asarray(rec[k][0]), lc[f"blk.{i}.{k}"]))
    if f"blk.{i}.topk_ids" in lc:
      np.testing.assert_array_equal(
        np.sort(np.asarray(rec["topk_ids"][0]), -1), np.sort(lc[f"blk.{i}.topk_ids"], -1)
      )
  assert worst <= BOUND, worst
  # The plant changes the model by far more than the agreement (rope_base_+10pct is the mildest on this
  # short random context: NMSE 1.6e-7 on the logits).
  assert effect > 1e3 * max(worst, 1e-13), (effect, worst)


def test_gating_softmax_scores_are_softmax(tmp_path):
  """dq3jax has only sigmoid gating; the plant is checked on llama.cpp's graph: the first MoE layer's router
  input is unchanged by the bug, and its selection scores become softmax(router logits) + bias."""
  from gguf import GGUFReader

  tokens, prefill = R.golden_tokens(MODEL / "outputs" / "F32.safetensors")
  B.apply("gating_softmax", GGUF, tmp_path / "bug.gguf")
  clean = R.run(GGUF, tokens, prefill, R.Settings(kv_cache="f32"))
  bug = R.run(tmp_path / "bug.gguf", tokens, prefill, R.Settings(kv_cache="f32"))
  ts = {t.name: np.asarray(t.data, np.float64) for t in GGUFReader(str(GGUF)).tensors}
  il = 1  # first MoE layer
  np.testing.assert_array_equal(bug[f"blk.{il}.hidden_after_attn"], clean[f"blk.{il}.hidden_after_attn"])
  h = clean[f"blk.{il}.hidden_after_attn"].astype(np.float64)
  x = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * ts[f"blk.{il}.ffn_norm.weight"]
  z = x @ ts[f"blk.{il}.ffn_gate_inp.weight"].T
  p = np.exp(z - z.max(-1, keepdims=True))
  want = p / p.sum(-1, keepdims=True) + ts[f"blk.{il}.exp_probs_b.bias"]
  got = bug[f"blk.{il}.router_scores"]
  assert np.abs(got - want).max() < 1e-6
  assert np.abs(clean[f"blk.{il}.router_scores"] - want).max() > 0.1
