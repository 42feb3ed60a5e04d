"""noaux_tc routing against a plain per-token numpy implementation of spec 2.4."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dq3jax.model import moe, random_init


def route_reference(x, router, bias, cfg):
  """Per-token loops in float64: group score = sum of top-2 biased scores, keep topk_group groups, top-K."""
  ids, weights = [], []
  for row in x.astype(np.float64):
    s = 1 / (1 + np.exp(-(router.astype(np.float64) @ row)))
    b = s + bias
    size = cfg.n_routed_experts // cfg.n_group
    group_scores = [
      np.sort(b[g * size : (g + 1) * size])[-2:].sum() if size > 1 else b[g] for g in range(cfg.n_group)
    ]
    kept = np.argsort(group_scores)[::-1][: cfg.topk_group]
    allowed = np.full_like(b, -np.inf)
    for g in kept:
      allowed[g * size : (g + 1) * size] = b[g * size : (g + 1) * size]
    top = np.argsort(allowed)[::-1][: cfg.num_experts_per_tok]
    w = s[top]
    if cfg.norm_topk_prob:
      w = w / w.sum()
    ids.append(np.sort(top))
    weights.append(w[np.argsort(top)] * cfg.routed_scaling_factor)
  return np.array(ids), np.array(weights)


@pytest.mark.parametrize(
  "overrides",
  [
    dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=5, norm_topk_prob=False),
    dict(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3, routed_scaling_factor=1.0),
  ],
  ids=["4groups", "8groups_unnormalised", "no_groups"],
)
def test_route_matches_reference(overrides):
  cfg = random_init.tiny_config(**overrides)
  p = random_init.init_params(cfg, 3)["layers"][1]["mlp"]
  x = np.random.default_rng(4).standard_normal((50, cfg.hidden_size)).astype(np.float32)
  ids, weights = moe.route({k: jnp.asarray(p[k]) for k in ("router", "router_bias")}, jnp.asarray(x), cfg)
  ids, weights = np.asarray(ids), np.asarray(weights)
  order = np.argsort(ids, axis=-1)
  ref_ids, ref_w = route_reference(x, p["router"], p["router_bias"], cfg)
  np.testing.assert_array_equal(np.take_along_axis(ids, order, -1), ref_ids)
  np.testing.assert_allclose(np.take_along_axis(weights, order, -1), ref_w, rtol=2e-6)


def test_bias_steers_selection_but_not_weights():
  cfg = random_init.tiny_config(
    n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=1.0
  )
  d, e = cfg.hidden_size, cfg.n_routed_experts
  x = jnp.ones((1, d), jnp.float32)
  router = jnp.zeros((e, d), jnp.float32).at[0].set(0.1)  # expert 0 has the best unbiased score
  bias = jnp.zeros(e).at[5].set(1.0).at[6].set(0.5)
  ids, w = moe.route({"router": router, "router_bias": bias}, x, cfg)
  assert sorted(np.asarray(ids)[0].tolist()) == [5, 6]
  np.testing.assert_allclose(np.asarray(w)[0], [0.5, 0.5])  # sigmoid(0), the unbiased scores
