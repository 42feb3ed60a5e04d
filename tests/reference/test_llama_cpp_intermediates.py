"""llama.cpp's own intermediates (reference/llama_cpp_run.py, eval callback) against the golden's.

On the F32 recipe nothing is quantized, so llama.cpp with an F32 KV cache and no flash attention is float32
arithmetic in another summation order: every captured tensor matches dq3jax's golden to NMSE ~1e-12. Measured
on x86-64 (AMD EPYC, AVX2), v3-tiny F32, Settings(kv_cache="f32"): attn_latent <= 3.9e-13, hidden_after_attn
<= 4.5e-13, hidden_after_mlp <= 5.6e-13, topk_weights <= 5.3e-14, logits 6.3e-13, decode_logits 7.1e-13 (NMSE as
test-backend-ops); 1 and 2 threads, one batch and ubatch 8 give identical bits. The bound 1e-11 keeps a 15x
margin and is 1e5 below the float32 profile's 1e-6. The other calibration settings round the KV cache (F16, or
flash attention, which casts K and V to F16 even for an F32 cache): NMSE 1e-7 .. 1.1e-6 there.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from reference import llama_cpp_run as R

pytestmark = pytest.mark.crosscheck

MODEL = pathlib.Path(__file__).resolve().parents[2] / "goldens" / "models" / "v3-tiny"
GGUF = MODEL / "gguf" / "F32.gguf"
OUTPUTS = MODEL / "outputs" / "F32.safetensors"
F32_NMSE = 1e-11  # measured <= 7.1e-13 (module doc)
ROUNDED_KV_NMSE = 1e-5  # F16 KV / flash attention: measured <= 2.1e-6 (decode_logits, flash attention)


def _golden():
  from safetensors import safe_open

  with safe_open(str(OUTPUTS), "np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, json.loads(json.dumps(f.metadata()))


def _nmse(a, b):
  from dq3jax.compare.metrics import nmse

  return nmse(a, b)


@pytest.fixture(scope="module")
def golden():
  return _golden()


@pytest.fixture(scope="module")
def f32_run(golden):
  g, meta = golden
  return R.run(GGUF, g["tokens"], int(meta["prefill"]), R.Settings(kv_cache="f32"))


def _expected_shapes(golden_tensors, cfg):
  t = golden_tensors["tokens"].shape[0]
  p = cfg["prefill"]
  want = {"tokens": (t,), "logits": (t, cfg["vocab"]), "decode_logits": (t - p, cfg["vocab"])}
  for i in range(cfg["layers"]):
    want[f"blk.{i}.attn_latent"] = (t, cfg["r"])
    want[f"blk.{i}.hidden_after_attn"] = want[f"blk.{i}.hidden_after_mlp"] = (t, cfg["d"])
    if i >= cfg["dense"]:
      want[f"blk.{i}.topk_ids"] = want[f"blk.{i}.topk_weights"] = (t, cfg["k"])
      want[f"blk.{i}.router_scores"] = (t, cfg["e"])
  return want


@pytest.fixture(scope="module")
def shapes(golden):
  hf = json.loads((MODEL / "hf" / "config.json").read_text())
  cfg = {
    "prefill": int(golden[1]["prefill"]),
    "vocab": hf["vocab_size"],
    "layers": hf["num_hidden_layers"],
    "r": hf["kv_lora_rank"],
    "d": hf["hidden_size"],
    "dense": hf["first_k_dense_replace"],
    "k": hf["num_experts_per_tok"],
    "e": hf["n_routed_experts"],
  }
  return _expected_shapes(golden[0], cfg)


def test_every_golden_tensor_matches_with_f32_kv(golden, f32_run, shapes):
  g, _ = golden
  assert {k: v.shape for k, v in f32_run.items() if not k.startswith("meta.")} == shapes
  compared = 0
  for name, a in f32_run.items():
    if name.startswith("meta.") or name not in g:
      continue
    compared += 1
    if name == "tokens":
      np.testing.assert_array_equal(a, g[name])
    elif name.endswith("topk_ids"):
      # Same experts in the same (descending biased score) order as the golden.
      np.testing.assert_array_equal(a, g[name], err_msg=name)
      assert a.dtype == np.int32
    else:
      assert _nmse(g[name], a) <= F32_NMSE, (name, _nmse(g[name], a))
  assert compared == len([n for n in g if n in shapes])  # every golden tensor llama.cpp has a graph name for


def _router_scores_from_golden(g, layer):
  """sigmoid(router x) + e_score_correction_bias in float64 from the golden's hidden_after_attn and the GGUF's
  F32 weights: what router_scores means, computed without llama.cpp (the old goldens do not store it)."""
  from gguf import GGUFReader

  ts = {t.name: np.asarray(t.data, np.float64) for t in GGUFReader(str(GGUF)).tensors}
  h = g[f"blk.{layer}.hidden_after_attn"].astype(np.float64)  # [T, d]
  x = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * ts[f"blk.{layer}.ffn_norm.weight"]
  w = ts[f"blk.{layer}.ffn_gate_inp.weight"]  # [E, d]
  return 1 / (1 + np.exp(-(x @ w.T))) + ts[f"blk.{layer}.exp_probs_b.bias"]


def test_router_scores_are_biased_sigmoid_scores(golden, f32_run):
  g, _ = golden
  layers = [k.split(".")[1] for k in f32_run if k.endswith("router_scores")]
  assert layers
  for il in layers:
    s = f32_run[f"blk.{il}.router_scores"]
    want = g.get(f"blk.{il}.router_scores")
    if want is None:
      want = _router_scores_from_golden(g, int(il)).astype(np.float32)
    assert _nmse(want, s) <= F32_NMSE, (il, _nmse(want, s))
    # top-k ids are the K best of these scores once groups are masked: the first id is the global best
    # within its group-limited set, so its score is at least every other selected one.
    ids = f32_run[f"blk.{il}.topk_ids"]
    picked = np.take_along_axis(s, ids, -1)
    assert (np.diff(picked, axis=-1) <= 0).all()


def test_graph_names_exist_per_layer():
  """The mapping is read from the graph itself: each layer has exactly one post-norm kv_cmpr (a MUL beside the
  pre-norm VIEW), one ffn_inp and l_out, and MoE layers the routing nodes the runner reads."""
  g, meta = _golden()
  nodes = R.graph_nodes(GGUF, g["tokens"][:8], R.Settings(kv_cache="f32"))
  by = {}
  for n in nodes:
    by.setdefault(n["name"], []).append(n["op"])
  hf = json.loads((MODEL / "hf" / "config.json").read_text())
  for i in range(hf["num_hidden_layers"]):
    assert sorted(by[f"kv_cmpr-{i}"]) == ["MUL", "VIEW"]
    assert by[f"ffn_inp-{i}"] == ["ADD"] and by[f"l_out-{i}"] == ["ADD"]
    if i >= hf["first_k_dense_replace"]:
      assert by[f"ffn_moe_probs-{i}"] == ["UNARY"]  # sigmoid
      assert by[f"ffn_moe_probs_biased-{i}"] == ["ADD"]
      assert (
        f"ffn_moe_probs_masked-{i}" in by
      )  # group-limited routing is in the graph (n_group 4, topk_group 2)
      assert by[f"ffn_moe_topk-{i}"] == ["VIEW"]  # of the argsort: strided read
      assert by[f"ffn_moe_weights_scaled-{i}"] == ["SCALE"]  # routed_scaling_factor 2.5 after the norm


@pytest.mark.parametrize("settings", R.CALIBRATION_SETTINGS, ids=lambda s: s.label)
def test_every_calibration_setting_produces_every_tensor(settings, golden, shapes, f32_run):
  g, meta = golden
  d = R.run(GGUF, g["tokens"], int(meta["prefill"]), settings)
  assert {k: v.shape for k, v in d.items() if not k.startswith("meta.")} == shapes
  info = json.loads(str(d["meta.llama_cpp"]))
  assert info["kv_cache"] == settings.kv_cache and info["threads"] == settings.threads
  assert info["llama_cpp_commit"].startswith("0c1e570") and info["use_extra_bufts"] is False
  exact = settings.kv_cache == "f32" and not settings.flash_attn
  for name, a in d.items():
    if name.startswith("meta."):
      continue
    assert np.isfinite(a).all(), name
    if name.endswith("topk_ids"):
      np.testing.assert_array_equal(a, g[name], err_msg=name)
    elif exact:  # threads and batching: bit-identical to the 1-thread run on the machine measured
      assert _nmse(f32_run[name], a) <= F32_NMSE, (name, _nmse(f32_run[name], a))
    else:
      assert _nmse(f32_run[name], a) <= ROUNDED_KV_NMSE, (name, _nmse(f32_run[name], a))


def test_dump_writes_what_diff_reads(tmp_path, golden):
  from dq3jax.compare import dumps

  out = tmp_path / "cand.npz"
  R.dump(GGUF, OUTPUTS, out, R.Settings(kv_cache="f32"), intermediates=False)
  d = dumps.load(out)
  assert set(d.tensors) == {"tokens", "logits", "decode_logits"}
  assert json.loads(d.metadata["llama_cpp"])["kv_cache"] == "f32"
  z = np.load(out)
  assert z["meta.llama_cpp"].dtype.kind == "U" and z["meta.llama_cpp"].shape == ()


def test_no_weights_in_extra_buffer_types():
  """use_extra_bufts is off in the struct llama.cpp receives, and llama.cpp's load log shows the weights in the
  plain CPU buffer only. (With it on, this AVX2 machine repacks Q4_K weights into CPU_REPACK; on AMX CPUs the
  AMX buffer type joins the same list and llama.cpp 0c1e570 aborts in ggml_backend_sched_split_graph.)"""
  p = R.model_params()
  off = type(p).use_extra_bufts.offset
  assert bytes(p)[off] == 0 and p.use_extra_bufts is False
  m = R.load_model(MODEL.parent / "v3-pydoc" / "gguf" / "Q4_K_M.gguf")
  try:
    assert m.buffer_lines and all("CPU_Mapped" in ln or "CPU model" in ln for ln in m.buffer_lines), (
      m.buffer_lines
    )
  finally:
    m.close()
