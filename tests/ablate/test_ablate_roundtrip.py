"""quantized_params builds, in memory, exactly the params a GGUF written by `dq3jax quantize` loads as."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dq3jax.ablate.roundtrip import TensorCache, quantized_params
from dq3jax.convert.quantize import quantize_to_gguf
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import gguf_read
from dq3jax.recipes.rules import Recipe


def _assert_bit_identical(got: dict, want: dict) -> None:
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
  ):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, jax.tree_util.keystr(path)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), jax.tree_util.keystr(path)


def _via_gguf(tmp_path, cfg, params, recipe, layout):
  res = quantize_to_gguf(ParamsSource(params, cfg), tmp_path / "m.gguf", recipe, layout=layout)
  _, loaded = gguf_read.load(tmp_path / "m.gguf")
  return res, loaded


@pytest.mark.parametrize("recipe, layout", [("Q4_K_M", "split"), ("DQ3_K_M", "kv_b"), ("Q8_0", "split")])
def test_equals_written_and_loaded_gguf_fallback_types(tiny, tmp_path, recipe, layout):
  cfg, params = tiny
  res, want = _via_gguf(tmp_path, cfg, params, recipe, layout)
  got, infos = quantized_params(ParamsSource(params, cfg), recipe, layout=layout)
  _assert_bit_identical(got, want)
  assert [(i.name, i.type, i.bytes) for i in infos] == [(t.name, t.type, t.bytes) for t in res.tensors]
  assert all(i.params == int(np.prod(t.ne)) for i, t in zip(infos, res.tensors, strict=True))
  # v3-tiny's rows are not multiples of 256: the k-quant targets really did fall back.
  assert {i.type for i in infos} & {"Q5_0", "Q4_0", "Q8_0", "F16"} and not any(
    i.type.endswith("_K") for i in infos
  )


def test_equals_written_and_loaded_gguf_k_quants(mini, tmp_path):
  cfg, params = mini
  # Q2_K everywhere (attn_k_b falls back to Q4_0): one k-quant kernel keeps the test's compile time small.
  recipe = Recipe(name="all-Q2_K", default_type="Q2_K", rules=())
  res, want = _via_gguf(tmp_path, cfg, params, recipe, "split")
  got, infos = quantized_params(ParamsSource(params, cfg), recipe)
  _assert_bit_identical(got, want)
  types = {i.name: i.type for i in infos}
  assert types["blk.1.ffn_down_exps.weight"] == "Q2_K" and types["blk.0.attn_k_b.weight"] == "Q4_0"
  assert types["blk.1.ffn_gate_inp.weight"] == "F32"
  assert sum(i.bytes for i in infos) == sum(t.bytes for t in res.tensors)


def test_f32_is_the_source_and_cache_changes_nothing(tiny):
  cfg, params = tiny
  src = ParamsSource(params, cfg)
  f32, infos = quantized_params(src, "F32")
  _assert_bit_identical(f32, params)
  assert 8 * sum(i.bytes for i in infos) / sum(i.params for i in infos) == 32
  cache = TensorCache()
  plain, _ = quantized_params(src, "Q4_K_M")
  quantized_params(src, "Q8_0", cache=cache)
  cached, _ = quantized_params(src, "Q4_K_M", cache=cache)
  assert cache.hits > 0  # norms, router (F32) and output (Q8_0) are shared with the Q8_0 run
  _assert_bit_identical(cached, plain)


def test_equals_gguf_with_importance_matrix(tiny, tmp_path):
  from dq3jax.io.imatrix import read_imatrix, write_gguf

  cfg, params = tiny
  rng = np.random.default_rng(3)
  n_exp = cfg.n_routed_experts
  ents = {
    "blk.1.ffn_up_exps.weight": (
      rng.gamma(1.0, size=(n_exp, cfg.hidden_size)).astype(np.float32),
      np.full(n_exp, 3),
    ),
    "blk.0.ffn_gate.weight": (rng.gamma(1.0, size=(1, cfg.hidden_size)).astype(np.float32), np.full(1, 3)),
  }
  write_gguf(tmp_path / "im.gguf", ents, datasets=("x",), chunk_count=1, chunk_size=3)
  im = read_imatrix(tmp_path / "im.gguf")
  quantize_to_gguf(ParamsSource(params, cfg), tmp_path / "m.gguf", "Q4_K_M", imatrix=im)
  _, want = gguf_read.load(tmp_path / "m.gguf")
  cache = TensorCache()
  got, _ = quantized_params(ParamsSource(params, cfg), "Q4_K_M", imatrix=im, cache=cache)
  _assert_bit_identical(got, want)
  plain, _ = quantized_params(ParamsSource(params, cfg), "Q4_K_M")
  # The importance weights reached the Q5_0 fallback of these two tensors, and only them.
  assert not np.array_equal(
    plain["layers"][1]["mlp"]["experts"]["w_up"], got["layers"][1]["mlp"]["experts"]["w_up"]
  )
  assert not np.array_equal(plain["layers"][0]["mlp"]["w_gate"], got["layers"][0]["mlp"]["w_gate"])
  assert np.array_equal(
    plain["layers"][1]["mlp"]["experts"]["w_gate"], got["layers"][1]["mlp"]["experts"]["w_gate"]
  )
