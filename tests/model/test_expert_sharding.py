"""Routed experts sharded over an 8-device host mesh give the single-device logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Runs in a fresh interpreter: the device count is fixed when JAX initialises, and it must not leak here.
_SCRIPT = r"""
import json
import jax
import numpy as np
from jax.sharding import Mesh
from dq3jax.model import random_init, runner

assert jax.device_count() == 8, jax.devices()
cfg = random_init.tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
params = random_init.init_params(cfg, 5)
tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 12))
mesh = Mesh(np.array(jax.devices()), ("expert",))
out = {}
for dtype in ("float32", "float64"):
  single = runner.logits(params, tokens, cfg, dtype=dtype)
  sharded, inter = runner.logits_and_intermediates(params, tokens, cfg, dtype=dtype, mesh=mesh)
  out[dtype] = float(np.abs(sharded - single).max() / np.abs(single).max())
from dq3jax.model.sharding import shard_params
w = shard_params(runner.cast_params(params, runner.Dtype.FLOAT32), cfg, mesh)["layers"][1]["mlp"]["experts"]["w_gate"]
out["expert_rows_per_device"] = sorted({s.data.shape[0] for s in w.addressable_shards})
out["devices"] = len({s.device for s in w.addressable_shards})
print(json.dumps(out))
"""


def test_expert_sharded_logits_equal_single_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["expert_rows_per_device"] == [2] and result["devices"] == 8, result
  # Only the summation order over experts may change.
  assert result["float64"] < 1e-13, result
  assert result["float32"] < 1e-6, result
