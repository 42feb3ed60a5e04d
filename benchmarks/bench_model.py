"""Forward-pass timing of dq3jax next to transformers (same CPU, same run) and truncated-load peak memory.

`run()` returns a flat dict; `python -m benchmarks.bench_model` (from the repository root) prints it as JSON.
The dq3jax times include casting the float32 params to the compute dtype, as every `runner.logits` call does.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import tracemalloc

import numpy as np

from dq3jax.io import hf_writer, safetensors_ckpt
from dq3jax.model import random_init, runner


def _best_of(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def bench_config():
  return random_init.tiny_config(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
  )


def run(batch: int = 1, seq: int = 128, repeats: int = 5) -> dict:
  import torch

  from reference import hf_deepseek

  cfg = bench_config()
  params = random_init.init_params(cfg, 0)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq))
  out: dict = {
    "config": f"d={cfg.hidden_size} L={cfg.num_hidden_layers} E={cfg.n_routed_experts} K={cfg.num_experts_per_tok}",
    "batch": batch,
    "seq": seq,
    "cpu": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "torch_threads": torch.get_num_threads(),
  }
  with tempfile.TemporaryDirectory() as d:
    hf_writer.save(d, cfg, params, shards=3)
    for dtype in ("float32", "float64"):
      t = time.perf_counter()
      runner.logits(params, tokens, cfg, dtype=dtype)  # compile
      out[f"dq3jax_{dtype}_first_call_s"] = time.perf_counter() - t
      out[f"dq3jax_{dtype}_forward_s"] = _best_of(
        lambda dtype=dtype: runner.logits(params, tokens, cfg, dtype=dtype), repeats
      )
    model = hf_deepseek.load_model(d, "float32")
    ids = torch.as_tensor(tokens)
    with torch.no_grad():
      model(input_ids=ids, use_cache=False)
      out["transformers_float32_forward_s"] = _best_of(lambda: model(input_ids=ids, use_cache=False), repeats)
    out["ratio_dq3jax_over_transformers_float32"] = (
      out["dq3jax_float32_forward_s"] / out["transformers_float32_forward_s"]
    )

    tracemalloc.start()
    small_cfg, small = safetensors_ckpt.load(d, layers=2, experts=4)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
  out["truncated_load"] = "layers=2 experts=4"
  out["truncated_load_kept_bytes"] = int(sum(x.nbytes for x in _leaves(small)))
  out["truncated_load_peak_traced_bytes"] = int(peak)
  out["checkpoint_bytes"] = int(full_bytes)
  return out


def _leaves(tree):
  import jax

  return jax.tree_util.tree_leaves(tree)


if __name__ == "__main__":
  print(json.dumps(run(), indent=2))
