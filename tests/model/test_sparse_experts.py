"""Sparse routed experts (only the selected ones, grouped by expert) against the dense formulation."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from dq3jax.model import random_init, runner
from dq3jax.model.act_quant import ActQuant
from dq3jax.model.moe import ExpertCompute

# More experts than the tiny default, so most tokens skip most experts and some experts get no token at all.
CFG = random_init.tiny_config(n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2)
PARAMS = random_init.init_params(CFG, seed=11)
TOKENS = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 9))


def _nmse(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(((a - b) ** 2).mean() / (b**2).mean())


@pytest.mark.parametrize(("dtype", "bound"), [("float32", 1e-11), ("float64", 1e-26)])
def test_sparse_equals_dense_with_the_same_experts(dtype, bound):
  dense, d_inter = runner.logits_and_intermediates(PARAMS, TOKENS, CFG, dtype=dtype)
  sparse, s_inter = runner.logits_and_intermediates(PARAMS, TOKENS, CFG, dtype=dtype, experts="sparse")
  moe_layers = [i for i in range(CFG.num_hidden_layers) if CFG.is_moe_layer(i)]
  assert moe_layers != []
  for i in moe_layers:  # the same experts chosen, with the same weights, bit for bit
    assert np.array_equal(s_inter[i]["topk_ids"], d_inter[i]["topk_ids"]), i
    assert np.array_equal(s_inter[i]["topk_weights"], d_inter[i]["topk_weights"]), i
  # Only the order of summing K (sparse) or E (dense, zeros included) contributions may differ: agreement to
  # the dtype's rounding. Measured 2026-12-02 (Intel Xeon): identical logits in both dtypes (NMSE 0); the
  # bounds are a few ulps of each dtype, against 0.12 for a wrong expert count (next test).
  assert dense.dtype == sparse.dtype == np.dtype(dtype)
  assert _nmse(sparse, dense) < bound


def test_sparse_is_not_dense_by_accident():
  # A wrong combination of experts must be far outside the bounds: measured NMSE 0.12 for K=2 instead of 3.
  sparse = runner.logits(PARAMS, TOKENS, CFG, experts="sparse")
  wrong = dataclasses.replace(CFG, num_experts_per_tok=2)
  other = runner.logits(PARAMS, TOKENS, wrong, experts="sparse")
  assert _nmse(other, sparse) > 1e-6


def _every_weight(ty: str) -> ActQuant:
  """Every matmul weight of PARAMS stored as `ty` (split layout: wkv_b as its k_b / v_b halves)."""
  types = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(PARAMS)[0]:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    if np.ndim(leaf) >= 2 and keys != ("embed",):
      halves = [(*keys, "k_b"), (*keys, "v_b")] if keys[-1] == "wkv_b" else [keys]
      types.update(dict.fromkeys(halves, ty))
  return ActQuant.from_types(types, layout="split")


def test_sparse_with_the_llama_cpp_activation_emulation():
  # F16 weights: llama.cpp rounds each expert's input rows to F16, which the sparse gather must keep.
  aq = _every_weight("F16")
  dense = runner.logits(PARAMS, TOKENS, CFG, act_quant=aq)
  sparse = runner.logits(PARAMS, TOKENS, CFG, act_quant=aq, experts="sparse")
  # Measured: identical (NMSE 0); the emulation itself moves the logits by NMSE 0.02 against plain float32.
  assert _nmse(sparse, dense) < 1e-11


def test_sparse_with_a_mesh_is_refused():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("experts",))
  with pytest.raises(ValueError, match="not sharded yet"):
    runner.logits(PARAMS, TOKENS, CFG, mesh=mesh, experts=ExpertCompute.SPARSE)
