"""Pure-function JAX DeepSeek-V3/R1 forward pass over nested-dict parameter pytrees.

The face (everything else in the package's modules is implementation):
  config:   DeepseekV3Config, RopeConfig, RopeKind (frozen dataclasses and enums; `DeepseekV3Config.from_hf_config`)
  running:  logits, logits_and_intermediates, incremental_logits (prefill + decode through the latent cache),
            evaluate / Evaluation (token log-probabilities), stagewise; Dtype (float32, float64 exact, bfloat16),
            AttnForm (expanded or absorbed MLA), ExpertCompute (dense or sparse routed experts)
  engines:  ActQuant (llama.cpp's activation quantization, emulated)
  weights:  init_params (seeded random weights), truncate_params, tiny_config
Names resolve on first use, so `import dq3jax.model` costs nothing until one is asked for.
"""

from __future__ import annotations

import importlib

_FACE = {
  "DeepseekV3Config": "config",
  "RopeConfig": "config",
  "RopeKind": "config",
  "Dtype": "runner",
  "Evaluation": "runner",
  "evaluate": "runner",
  "incremental_logits": "runner",
  "logits": "runner",
  "logits_and_intermediates": "runner",
  "stagewise": "runner",
  "AttnForm": "mla",
  "ExpertCompute": "moe",
  "ActQuant": "act_quant",
  "init_params": "random_init",
  "tiny_config": "random_init",
  "truncate_params": "random_init",
}

__all__ = sorted(_FACE)


def __getattr__(name: str):
  module = _FACE.get(name)
  if module is None:
    raise AttributeError(f"module 'dq3jax.model' has no attribute {name!r}")
  return getattr(importlib.import_module(f"dq3jax.model.{module}"), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_FACE))
