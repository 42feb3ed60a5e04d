"""dq3jax logits and expert choices against transformers' DeepseekV3ForCausalLM on seeded tiny checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dq3jax.io import hf_writer, safetensors_ckpt
from dq3jax.model import random_init, runner
from dq3jax.model.config import RopeConfig, RopeKind

pytestmark = pytest.mark.crosscheck

# Relative to max |logit|. Tiny float32 models; float64 runs transformers in true float64 (see hf_deepseek).
TOL = {"float32": 1e-5, "float64": 1e-10}
SEQ = 40  # > original_max_position_embeddings (16) of the YaRN configs

_YARN = random_init.tiny_config().rope
CASES = {
  "base": ({}, {}),
  "no_q_lora_one_group": (dict(q_lora_rank=None, n_group=1, topk_group=1), {}),
  # rms_norm_eps != 1e-6 also checks that the q_a/kv_a latent norms keep transformers' fixed 1e-6.
  "norm_topk_false_big_eps": (
    dict(norm_topk_prob=False, routed_scaling_factor=1.5, n_group=2, topk_group=1, rms_norm_eps=0.05),
    {},
  ),
  "no_yarn": (dict(rope=RopeConfig(kind=RopeKind.DEFAULT, theta=500.0)), {}),
  "yarn_mscale_differs_half_split": (
    dict(
      rope=dataclasses.replace(_YARN, mscale=0.707, mscale_all_dim=1.0, factor=8.0), rope_interleave=False
    ),
    {},
  ),
  "fp8_sharded_ragged": (
    dict(hidden_size=160, q_lora_rank=136, first_k_dense_replace=2),
    dict(fp8=True, shards=3),
  ),
  "bf16_storage_16_experts": (
    dict(n_routed_experts=16, n_group=4, topk_group=3, num_experts_per_tok=4, num_hidden_layers=2),
    dict(dtype="bfloat16", shards=2),
  ),
}


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
  # These models are tiny: torch's intra-op threads only spin against each other (and against xdist
  # workers), which made each forward ~50x slower on the 2-core CI box.
  import torch

  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  overrides, save_kw = CASES[request.param]
  cfg = random_init.tiny_config(**overrides)
  seed = sorted(CASES).index(request.param)
  directory = str(tmp_path_factory.mktemp(request.param))
  hf_writer.save(directory, cfg, random_init.init_params(cfg, seed), **save_kw)
  tokens = np.random.default_rng(100 + seed).integers(0, cfg.vocab_size, (2, SEQ))
  return directory, tokens


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_and_experts_match_transformers(case, dtype):
  # Imported here, not at module level, so `-m "not crosscheck"` collects without torch installed.
  from reference import hf_deepseek

  directory, tokens = case
  cfg, params = safetensors_ckpt.load(directory)
  ours, inter = runner.logits_and_intermediates(params, tokens, cfg, dtype=dtype)
  ref = hf_deepseek.run(directory, tokens, dtype)
  assert ours.dtype == ref["logits"].dtype == np.dtype(dtype)
  scale = np.abs(ref["logits"]).max()
  err = np.abs(ours - ref["logits"]).max() / scale
  assert err <= TOL[dtype], f"max |diff| / max |logit| = {err:.3e} > {TOL[dtype]:.0e}"
  moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
  assert sorted(ref["topk_ids"]) == moe_layers
  for i in moe_layers:
    np.testing.assert_array_equal(
      np.sort(inter[i]["topk_ids"], axis=-1), ref["topk_ids"][i], err_msg=f"layer {i}"
    )
