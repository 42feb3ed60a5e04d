"""Shared small models for the ablation tests: the v3-tiny preset cut to 2 layers (one dense, one MoE), whose
widths are multiples of 32 but not 256, so k-quant targets take llama.cpp's fallbacks (cheap kernels), and
v3-mini-256 cut to 2 layers and 2 experts for the k-quant kernels themselves."""

from __future__ import annotations

import pytest

from dq3jax.ablate.run import truncate_params
from dq3jax.model import presets


def small(name: str, layers: int, experts: int | None = None):
  cfg, params = presets.params_of(name)
  cut = cfg.truncate(layers=layers, experts=experts)
  return cut, truncate_params(params, cut)


@pytest.fixture(scope="session")
def tiny():
  return small("v3-tiny", 2)


@pytest.fixture(scope="session")
def mini():
  return small("v3-mini-256", 2, 2)
