"""dq3jax's GGUF writer, quantizer and reader against llama.cpp itself (llama-cpp-python 0.3.36, llama.cpp 0c1e570).

1. Bytes: a seeded mini model is written as an F32 GGUF; llama.cpp's llama_model_quantize quantizes that file
   with a preset (DQ3_K_M: Q3_K_M plus dq3jax's --tensor-type overrides), with and without an importance
   matrix; `dq3jax.convert.quantize_to_gguf` quantizes the same weights. Every tensor must have the same type
   and identical bytes.
2. Logits: llama.cpp evaluates dq3jax's file; dq3jax runs its forward pass on the same file's dequantized
   weights. For F32 files the two agree to float32 rounding (bound 1e-9 NMSE; measured ~1e-12). For quantized
   files they cannot agree exactly: llama.cpp's CPU matmuls quantize the *activations* too (to Q8_K for
   k-quant weights, Q8_0 for Q4_0/Q5_0/Q8_0 weights) before the integer dot products, and route experts on
   those perturbed activations, while the oracle multiplies float32 activations by the dequantized weights.
   Positions where the oracle's expert selection has a near-tie (gap < MARGIN) flip under that perturbation and
   are excluded (and counted); the bounds below hold for the rest (about 3x the measured worst case). The gap
   is 0.05 because the activation error reaching the router is ~2% relative (NMSE ~5e-4 per position), which
   moves sigmoid scores by up to ~0.01; 0.01 proved too small (one flip at a gap of ~0.02).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import dq3jax
from dq3jax.convert.quantize import get_recipe, plan_for, quantize_to_gguf
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import gguf_read
from dq3jax.io.imatrix import read_imatrix, write_gguf
from dq3jax.model import runner
from dq3jax.model.random_init import init_params
from dq3jax.recipes.llama_args import tensor_type_overrides
from tests.io.gguf_llama_ref import llama_logits, llama_quantize, logit_stats, mini_config, routing_margins

pytestmark = [
  pytest.mark.crosscheck,
]

SEED = 0
MARGIN = 0.05  # routing gap below which a position is a near-tie (see module doc)
# A random model's top-2 logits are often within rounding of each other, so top-1 agreement is asserted only
# where the oracle's lead exceeds LEAD logits; the overall agreement is printed and loosely bounded.
LEAD = 0.25
# (nmse, mean KL, max KL, min overall top-1 agreement) over positions without near-ties. Measured on this model
# (llama.cpp 0c1e570, x86-64 AVX-512 CPU; the k-quant files carry the imatrix): F32 nmse 8e-13; Q8_0 3.1e-4,
# KL mean 1.6e-4, max 2.6e-4; Q6_K 5.8e-4 / 2.9e-4 / 5.0e-4; Q4_K_M 6.7e-4 / 3.4e-4 / 5.7e-4; Q3_K_M, Q2_K,
# DQ3_K_M 5.9-6.2e-4 / 3.1-3.2e-4 / 5.1-5.5e-4; overall top-1 0.86-1.0. Bounds are ~3x the worst of these.
_Q = (2e-3, 1e-3, 2e-3, 0.7)
BOUNDS = {
  "F32": (1e-9, 1e-9, 1e-8, 1.0),
  "Q8_0": _Q,
  "Q6_K": _Q,
  "Q4_K_M": _Q,
  "Q3_K_M": _Q,
  "Q2_K": _Q,
  "DQ3_K_M": _Q,
}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
  cfg = mini_config()
  params = init_params(cfg, SEED)
  d = tmp_path_factory.mktemp("mini")
  paths = {}
  for layout in ("split", "kv_b"):
    paths[layout] = d / f"mini-f32-{layout}.gguf"
    quantize_to_gguf(ParamsSource(params, cfg), paths[layout], "F32", layout=layout)
  return cfg, params, paths


@pytest.fixture(scope="module")
def mini_imatrix(mini, tmp_path_factory):
  """Random column weights for every quantizable tensor (per expert / per head for 3-D), via a GGUF imatrix."""
  cfg, _, _ = mini
  rng = np.random.default_rng(7)
  ents = {}
  for layout in ("split", "kv_b"):
    for t in plan_for(cfg, get_recipe("Q4_K_M"), "current", layout).tensors:
      if t.quantized:
        n_mat = t.ne[2] if len(t.ne) > 2 else 1
        ents[t.name] = ((rng.random((n_mat, t.ne[0])) ** 4 * 20).astype(np.float32), np.full(n_mat, 9))
  path = tmp_path_factory.mktemp("imat") / "imatrix.gguf"
  write_gguf(path, ents, datasets=("random",), chunk_count=1, chunk_size=9)
  return read_imatrix(path)


def _tensors(path) -> dict[str, tuple[str, bytes]]:
  f = gguf_read.read_gguf(path)
  return {n: (t.type_name, bytes(f.raw(n))) for n, t in f.tensors.items()}


def _compare_bytes(mini, tmp_path, recipe, layout, imatrix):
  cfg, params, paths = mini
  r = get_recipe(recipe)
  overrides = []
  if r.name == "DQ3_K_M":
    overrides = tensor_type_overrides(plan_for(cfg, r, "current", layout))
    assert overrides
  flat = None
  if imatrix is not None:
    flat = {n: imatrix.weights(n).reshape(-1) for n in imatrix.entries}
  ref = tmp_path / "llama.gguf"
  llama_quantize(paths[layout], ref, r.ftype, imatrix=flat, overrides=overrides)
  ours = tmp_path / "dq3jax.gguf"
  res = quantize_to_gguf(ParamsSource(params, cfg), ours, r, imatrix=imatrix, layout=layout)
  want, got = _tensors(ref), _tensors(ours)
  assert list(got) == list(want)  # same tensors, same (llama-quantize) order
  bad = [(n, want[n][0], got[n][0]) for n in want if want[n] != got[n]]
  assert bad == [], f"{len(bad)} tensors differ (name, llama.cpp type, dq3jax type): {bad}"
  if imatrix is not None:
    assert any(t.imatrix for t in res.tensors)
  return ours


@pytest.mark.parametrize("layout", ["split", "kv_b"])
def test_q8_0_bytes_match_llama_quantize(mini, tmp_path, layout):
  _compare_bytes(mini, tmp_path, "Q8_0", layout, None)


# Without an imatrix, Q4_K_M, Q3_K_M, Q2_K and DQ3_K_M are proven on the golden v3-mini-256 files
# (tests/test_golden_models.py::test_golden_gguf_is_what_llama_quantize_makes); here Q6_K plain, all with one.
@pytest.mark.parametrize(
  ("recipe", "with_imatrix"),
  [("Q6_K", False)] + [(r, True) for r in ("Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "DQ3_K_M")],
  ids=lambda v: v if isinstance(v, str) else ("imatrix" if v else "plain"),
)
def test_kquant_bytes_match_llama_quantize(mini, mini_imatrix, tmp_path, recipe, with_imatrix):
  _compare_bytes(mini, tmp_path, recipe, "split", mini_imatrix if with_imatrix else None)


def test_kv_b_layout_bytes_match_llama_quantize(mini, mini_imatrix, tmp_path):
  _compare_bytes(mini, tmp_path, "Q3_K_M", "kv_b", mini_imatrix)


def _logit_check(path, name, tokens):
  cfg, params = gguf_read.load(path)
  ours = runner.logits(params, np.asarray(tokens)[None], cfg)[0]
  theirs = llama_logits(path, tokens)
  margins = routing_margins(params, cfg, tokens)
  ok = margins >= MARGIN
  stats = logit_stats(ours[ok], theirs[ok])
  print(f"{name}: {stats} ({int((~ok).sum())} of {len(tokens)} positions near a routing tie)")
  nmse, mean_kld, kld_max, top1 = BOUNDS[name]
  assert ok.sum() >= len(tokens) // 2
  assert stats["nmse"] < nmse, stats
  assert stats["mean_kld"] < mean_kld, stats
  assert stats["kld_max"] < kld_max, stats
  assert stats["same_top_p"] >= top1, stats
  top2 = np.sort(ours[ok], -1)[:, -2:]
  decided = top2[:, 1] - top2[:, 0] > LEAD
  assert (ours[ok].argmax(-1) == theirs[ok].argmax(-1))[decided].all()
  return stats


TOKENS = np.random.default_rng(1).integers(0, 256, 24)


@pytest.mark.parametrize("layout", ["split", "kv_b"])
def test_f32_logits_match_llama_cpp(mini, layout):
  _logit_check(mini[2][layout], "F32", TOKENS)


def test_q8_0_logits_match_llama_cpp(mini, tmp_path):
  cfg, params, _ = mini
  path = tmp_path / "q8.gguf"
  quantize_to_gguf(ParamsSource(params, cfg), path, "Q8_0")
  _logit_check(path, "Q8_0", TOKENS)


@pytest.mark.parametrize("recipe", ["Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "DQ3_K_M"])
def test_kquant_logits_match_llama_cpp(mini, mini_imatrix, tmp_path, recipe):
  cfg, params, _ = mini
  path = tmp_path / f"{recipe}.gguf"
  quantize_to_gguf(ParamsSource(params, cfg), path, recipe, imatrix=mini_imatrix)
  _logit_check(path, recipe, TOKENS)


def test_file_metadata_as_llama_cpp_reads_it(mini):
  # The keys llama.cpp's deepseek2 loader reads, with the values of the config (split file).
  cfg, _, paths = mini
  kv = gguf_read.read_gguf(paths["split"]).kv
  a = "deepseek2."
  assert kv["general.architecture"] == "deepseek2"
  assert kv[a + "expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
  assert kv[a + "expert_weights_norm"] is True
  assert kv[a + "leading_dense_block_count"] == cfg.first_k_dense_replace
  assert kv[a + "attention.head_count_kv"] == 1
  assert kv[a + "attention.key_length"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
  assert kv[a + "attention.key_length_mla"] == cfg.qk_head_dim
  assert kv[a + "attention.value_length_mla"] == cfg.v_head_dim
  assert kv[a + "rope.scaling.type"] == "yarn"
  assert kv[a + "expert_group_count"] == cfg.n_group
  assert kv[a + "expert_group_used_count"] == cfg.topk_group
  assert abs(kv[a + "expert_weights_scale"] - cfg.routed_scaling_factor) < 1e-6


def test_reads_files_written_by_llama_cpp(mini, tmp_path):
  # llama.cpp's own writer (gguf.cpp via llama_model_quantize) lays the header out independently of gguf-py.
  cfg, params, paths = mini
  ref = tmp_path / "llama-q8.gguf"
  llama_quantize(paths["split"], ref, "Q8_0")
  cfg2, p2 = gguf_read.load(ref)
  assert cfg2 == cfg
  w = params["layers"][1]["mlp"]["experts"]["w_up"]
  want = dq3jax.dequantize(dq3jax.quantize(w.reshape(-1, w.shape[-1]), "Q8_0"), "Q8_0", w.shape)
  np.testing.assert_array_equal(p2["layers"][1]["mlp"]["experts"]["w_up"], want)
