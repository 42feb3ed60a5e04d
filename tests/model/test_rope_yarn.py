"""YaRN frequencies and the pairwise rotation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dq3jax.model import rope
from dq3jax.model.config import RopeConfig, RopeKind

V3_ROPE = RopeConfig(
  kind=RopeKind.YARN,
  theta=10000.0,
  factor=40.0,
  original_max_position_embeddings=4096,
  beta_fast=32.0,
  beta_slow=1.0,
  mscale=1.0,
  mscale_all_dim=1.0,
)


def test_v3_yarn_ramp_bounds():
  # Spec 2.2: low = floor(10.47) = 10, high = ceil(22.51) = 23 for V3; below low unchanged, above high / 40.
  base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
  f = rope.inv_freq(V3_ROPE, 64)
  np.testing.assert_array_equal(f[:11], base[:11])
  np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-15)
  assert np.all((f[11:23] < base[11:23]) & (f[11:23] > base[11:23] / 40))
  ramp = (16 - 10) / (23 - 10)
  assert f[16] == pytest.approx(base[16] / 40 * ramp + base[16] * (1 - ramp), rel=1e-15)


@pytest.mark.parametrize("interleave", [True, False])
def test_rotation_is_complex_multiplication(interleave):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 8))
  angles = rng.uniform(-3, 3, (5, 4))
  out = np.asarray(
    rope.apply(jnp.asarray(x, jnp.float32), jnp.cos(angles), jnp.sin(angles), interleave=interleave)
  )
  if interleave:
    z = x[:, 0::2] + 1j * x[:, 1::2]
  else:
    z = x[:, :4] + 1j * x[:, 4:]
  rotated = z * np.exp(1j * angles)
  np.testing.assert_allclose(out, np.concatenate([rotated.real, rotated.imag], -1), atol=1e-6)


def test_cos_sin_factor_used_when_mscales_differ():
  r = RopeConfig(kind=RopeKind.YARN, factor=4.0, mscale=0.5, mscale_all_dim=1.0)
  assert r.cos_sin_factor == pytest.approx((1 + 0.05 * math.log(4)) / (1 + 0.1 * math.log(4)))
  cos, _ = rope.cos_sin(r, 8, jnp.zeros((1,), jnp.int32), jnp.float32)
  np.testing.assert_allclose(np.asarray(cos), r.cos_sin_factor, rtol=1e-7)


@pytest.mark.crosscheck
@pytest.mark.parametrize(
  "rope_cfg", [V3_ROPE, RopeConfig(kind=RopeKind.DEFAULT, theta=500.0)], ids=["yarn", "default"]
)
def test_inv_freq_matches_transformers(rope_cfg):
  import transformers
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

  from dq3jax.model.config import DeepseekV3Config
  from tests.model.hub_configs import V3_HUB

  hf = {**V3_HUB}
  if rope_cfg.kind is RopeKind.DEFAULT:
    hf.update(rope_scaling=None, rope_theta=rope_cfg.theta)
  ours = DeepseekV3Config.from_hf_config(hf)
  t = transformers.DeepseekV3Config(
    **{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
  )
  emb = DeepseekV3RotaryEmbedding(t)
  # transformers computes in float32; ours is float64: they agree to float32 rounding.
  np.testing.assert_allclose(rope.inv_freq(ours.rope, 64), emb.inv_freq.numpy(), rtol=3e-7)
  assert emb.attention_scaling == ours.rope.cos_sin_factor
