"""The training step on a tiny config: loss goes down, the selection bias moves only by the sign rule."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq3jax.model.random_init import tiny_config
from dq3jax.train import optim, train
from dq3jax.train.spec import TrainSpec

CFG = tiny_config()
SPEC = TrainSpec(seed=3, steps=2, batch=4, seq_len=16, lr=1e-2, warmup=1, bias_gamma=1e-3, eval_every=1)


# jit: eager op-by-op evaluation of the model and its gradient costs tens of seconds.
loss = jax.jit(lambda p, b: train.loss_fn(p, b, CFG, SPEC))


@pytest.fixture(scope="module")
def setup():
  stream = np.random.default_rng(0).integers(0, CFG.vocab_size, 400).astype(np.int32)
  return stream, train.make_step(CFG, SPEC)


def _moe_biases(params):
  return [
    np.asarray(lp["mlp"]["router_bias"]) for i, lp in enumerate(params["layers"]) if CFG.is_moe_layer(i)
  ]


def test_two_steps_lower_the_loss_and_move_the_bias_by_gamma(setup):
  stream, step = setup
  params = train.initial_params(CFG, SPEC.seed)
  state = optim.init(params)
  batch = jnp.asarray(next(train.batches(stream, SPEC)))
  loss0 = float(loss(params, batch)[0])
  for i in range(2):
    before = _moe_biases(params)
    params, state, m = step(params, state, batch, jnp.asarray(i, jnp.int32))
    for load, b0, b1 in zip(np.asarray(m["loads"]), before, _moe_biases(params), strict=True):
      want = -SPEC.bias_gamma * np.sign(load - load.mean())
      np.testing.assert_allclose(b1 - b0, want, rtol=0, atol=1e-9)
      assert np.count_nonzero(want) > 0
  loss2 = float(loss(params, batch)[0])
  assert loss2 < loss0 - 0.05, (loss0, loss2)


def test_adamw_leaves_the_router_bias_alone_whatever_its_gradient():
  params = {"layers": [{"mlp": {"router": jnp.ones((4, 3)), "router_bias": jnp.full((4,), 0.5)}}]}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)  # a bias gradient the step must ignore
  new, state, _ = optim.update(SPEC, params, grads, optim.init(params), jnp.asarray(0))
  assert np.array_equal(new["layers"][0]["mlp"]["router_bias"], params["layers"][0]["mlp"]["router_bias"])
  assert not np.any(state["m"]["layers"][0]["mlp"]["router_bias"])
  assert np.all(new["layers"][0]["mlp"]["router"] < 1)  # while the router itself moves


def test_training_is_deterministic(setup):
  stream, _ = setup
  spec = dataclasses.replace(SPEC, steps=2)
  a, ha = train.train(CFG, spec, stream, log=lambda s: None)
  b, hb = train.train(CFG, spec, stream, log=lambda s: None)
  assert [r["train_ce"] for r in ha] == [r["train_ce"] for r in hb]
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert np.array_equal(x, y)
