"""route_override: forcing expert ids per MoE layer and token (moe.routing, runner.route_overrides).

- Forcing the model's own choice (in any order) reproduces every output bit for bit, in float32 and float64.
- Forcing another set changes only that token's output of that layer (MoE is per token; later layers see it
  through attention), and the new output is what an independent numpy computation of the layer gives.
- The router_scores intermediate is the biased selection score top-k is taken over.
- Malformed overrides are rejected with a message naming the layer and row.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dq3jax.model import random_init, runner

CFG = random_init.tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
PARAMS = random_init.init_params(CFG, 21)
TOKENS = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 10))
MOE = [i for i in range(CFG.num_hidden_layers) if CFG.is_moe_layer(i)]


def _leaves(out):
  return jax.tree_util.tree_leaves(out)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forcing_the_models_own_choice_changes_nothing(dtype):
  logits, inter = runner.logits_and_intermediates(PARAMS, TOKENS, CFG, dtype=dtype)
  own = {i: inter[i]["topk_ids"] for i in MOE}
  reversed_order = {i: ids[..., ::-1].copy() for i, ids in own.items()}  # order does not matter
  for ov in (own, reversed_order):
    got = runner.logits_and_intermediates(PARAMS, TOKENS, CFG, dtype=dtype, route_override=ov)
    for a, b in zip(_leaves((logits, inter)), _leaves(got), strict=True):
      np.testing.assert_array_equal(a, b)
  inc = runner.incremental_logits(PARAMS, TOKENS, CFG, prefill=4, dtype=dtype)
  np.testing.assert_array_equal(
    runner.incremental_logits(PARAMS, TOKENS, CFG, prefill=4, dtype=dtype, route_override=own), inc
  )


def _rms(x, w, eps):
  return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _silu(v):
  return v / (1 + np.exp(-v))


def _moe_numpy(p, x, ids, cfg):
  """One token's MoE output (float64) with experts `ids`: unbiased sigmoid weights of those ids, normalised,
  times the scaling factor, plus the shared expert."""
  s = 1 / (1 + np.exp(-(p["router"].astype(np.float64) @ x)))
  w = s[ids]
  if cfg.norm_topk_prob:
    w = w / w.sum()
  w = w * cfg.routed_scaling_factor
  ex = p["experts"]
  y = sum(
    wk * (ex["w_down"][e] @ (_silu(ex["w_gate"][e] @ x) * (ex["w_up"][e] @ x)))
    for wk, e in zip(w, ids, strict=True)
  )
  sh = p["shared"]
  return y + sh["w_down"] @ (_silu(sh["w_gate"] @ x) * (sh["w_up"] @ x)), w


def test_forcing_other_experts_changes_that_token_as_numpy_computes_it():
  layer, b, t = MOE[0], 1, 6
  _, base = runner.logits_and_intermediates(PARAMS, TOKENS, CFG, dtype="float64")
  own = base[layer]["topk_ids"][b, t]
  other = np.array([e for e in range(CFG.n_routed_experts) if e not in own][: CFG.num_experts_per_tok])
  ov = np.full((*TOKENS.shape, CFG.num_experts_per_tok), -1)
  ov[b, t] = other
  _, got = runner.logits_and_intermediates(PARAMS, TOKENS, CFG, dtype="float64", route_override={layer: ov})

  rec, ref = got[layer], base[layer]
  np.testing.assert_array_equal(rec["hidden_after_attn"], ref["hidden_after_attn"])  # attention comes first
  changed = np.abs(rec["hidden_after_mlp"] - ref["hidden_after_mlp"]).max(-1)  # [B, T]
  assert changed[b, t] > 1e-3 and np.delete(changed.reshape(-1), b * TOKENS.shape[1] + t).max() == 0

  p = PARAMS["layers"][layer]
  h = rec["hidden_after_attn"][b, t]
  y, w = _moe_numpy(p["mlp"], _rms(h, p["ffn_norm"], CFG.rms_norm_eps), rec["topk_ids"][b, t], CFG)
  assert set(rec["topk_ids"][b, t]) == set(other)
  np.testing.assert_allclose(rec["topk_weights"][b, t], w, rtol=1e-12)
  np.testing.assert_allclose(rec["hidden_after_mlp"][b, t], h + y, rtol=1e-10, atol=1e-12)
  # Ordered as the model orders its own: descending biased score.
  scores = rec["router_scores"][b, t][rec["topk_ids"][b, t]]
  assert np.all(np.diff(scores) <= 0)
  # Later layers see the change only at that token and after it (causal attention).
  later = np.abs(got[-1]["hidden_after_mlp"] - base[-1]["hidden_after_mlp"]).max(-1)
  assert later[b, :t].max() == 0 and later[b, t] > 0 and later[1 - b].max() == 0


def test_router_scores_are_the_biased_selection_scores():
  _, inter = runner.logits_and_intermediates(PARAMS, TOKENS, CFG, dtype="float64")
  for i in MOE:
    p = PARAMS["layers"][i]
    x = _rms(inter[i]["hidden_after_attn"], p["ffn_norm"], CFG.rms_norm_eps)
    want = 1 / (1 + np.exp(-(x @ p["mlp"]["router"].T))) + p["mlp"]["router_bias"]
    np.testing.assert_allclose(inter[i]["router_scores"], want, rtol=1e-12)
    picked = np.take_along_axis(inter[i]["router_scores"], inter[i]["topk_ids"], -1)
    assert np.all(np.diff(picked, axis=-1) <= 0)


def test_incremental_decoding_takes_the_override_per_position():
  layer = MOE[-1]
  ov = np.full((*TOKENS.shape, CFG.num_experts_per_tok), -1)
  ov[:, 7] = [0, 5, 9, 13]
  full = runner.logits(PARAMS, TOKENS, CFG, dtype="float64", route_override={layer: ov})
  inc = runner.incremental_logits(PARAMS, TOKENS, CFG, prefill=4, dtype="float64", route_override={layer: ov})
  np.testing.assert_allclose(inc, full, rtol=0, atol=1e-12 * np.abs(full).max())
  assert np.abs(full - runner.logits(PARAMS, TOKENS, CFG, dtype="float64")).max() > 1e-6


@pytest.mark.parametrize(
  "row,match",
  [
    ([0, 1, 2, -1], "neither all -1"),
    ([0, 1, 1, 2], "neither all -1"),
    ([0, 1, 2, 16], "neither all -1"),
  ],
)
def test_malformed_overrides_are_rejected(row, match):
  ov = np.full((*TOKENS.shape, CFG.num_experts_per_tok), -1)
  ov[0, 3] = row
  with pytest.raises(ValueError, match=match):
    runner.logits(PARAMS, TOKENS, CFG, route_override={MOE[0]: ov})


def test_override_shape_and_layer_are_checked():
  k = CFG.num_experts_per_tok
  with pytest.raises(ValueError, match="dense"):
    runner.logits(PARAMS, TOKENS, CFG, route_override={0: np.zeros((*TOKENS.shape, k), int)})
  with pytest.raises(ValueError, match=r"want integer \[2, 10, 4\]"):
    runner.logits(PARAMS, TOKENS, CFG, route_override={MOE[0]: np.zeros((2, 9, k), int)})
  with pytest.raises(ValueError, match="layers"):
    runner.logits(PARAMS, TOKENS, CFG, route_override=[None])
