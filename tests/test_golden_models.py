"""goldens/models/: complete, reproducible from seeds, and agreeing with the independent references.

- Regeneration: the HF and GGUF files are bit-exact by construction and must regenerate to the same bytes
  anywhere. The outputs are float32 XLA results: on the CPU model that generated them (recorded in the
  manifest) they must regenerate to the same bytes; on another CPU, XLA may pick other vector widths and
  change the last bits, so there they must agree to float32 rounding (NMSE <= 1e-10, measured ~1e-14 for a
  reduction-order change) with identical expert choices.
- The golden GGUF files carry exactly llama.cpp's bytes: llama_model_quantize of the golden F32 GGUF gives
  the same tensors (type and bytes) as the golden quantized GGUF.
- ggml's own dequantization of every golden GGUF tensor equals dq3jax's, bit for bit.
- The F32 outputs match transformers' DeepseekV3 on the golden HF directory (1e-5 of the largest logit, the
  bound of tests/model/test_vs_transformers.py), with the same experts.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from dq3jax import golden_models, goldens
from dq3jax.io import gguf_read

ROOT = pathlib.Path(__file__).resolve().parents[1] / "goldens"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
FILES = MANIFEST["files"]


def _rel(model, kind, recipe=None):
  if kind == "hf":
    return f"models/{model}/hf/model.safetensors"
  ext = "gguf" if kind == "gguf" else "safetensors"
  return f"models/{model}/{kind}/{recipe}.{ext}"


def test_manifest_lists_every_model_file_with_its_provenance():
  for model in golden_models.MODELS:
    assert FILES[f"models/{model}/hf/config.json"]["kind"] == "model-hf"
    assert FILES[_rel(model, "hf")]["seed"] == FILES[f"models/{model}/hf/config.json"]["seed"]
    for recipe in golden_models.RECIPES:
      g = FILES[_rel(model, "gguf", recipe)]
      assert (g["kind"], g["recipe"], g["model"]) == ("model-gguf", recipe, model)
      o = FILES[_rel(model, "outputs", recipe)]
      assert (o["kind"], o["recipe"], o["gguf"]) == ("model-outputs", recipe, _rel(model, "gguf", recipe))
      t = o["tensors"]
      cfg = o["config"]
      assert t["logits"]["shape"] == [golden_models.TOKENS, cfg["vocab_size"]]
      assert t["decode_logits"]["shape"] == [golden_models.TOKENS - golden_models.PREFILL, cfg["vocab_size"]]
      for i in range(cfg["num_hidden_layers"]):
        assert t[f"blk.{i}.hidden_after_mlp"]["shape"] == [golden_models.TOKENS, cfg["hidden_size"]]
        assert (f"blk.{i}.topk_ids" in t) == (i >= cfg["first_k_dense_replace"])
  for v in ("jax", "jaxlib", "numpy", "gguf"):
    assert MANIFEST["versions"][v]
  assert MANIFEST["platform"]["cpu"]


def test_outputs_are_self_consistent():
  for model in golden_models.MODELS:
    for recipe in golden_models.RECIPES:
      o = load_file(str(ROOT / _rel(model, "outputs", recipe)))
      # Decoding through the latent cache (absorbed MLA) equals the prefill up to float32 rounding.
      prefill_part = o["logits"][golden_models.PREFILL :]
      scale = np.abs(prefill_part).max()
      assert np.abs(o["decode_logits"] - prefill_part).max() <= 1e-5 * scale, (model, recipe)
      assert np.array_equal(o["tokens"], golden_models.tokens_for(model, o["logits"].shape[1]))


def _assert_outputs_reproduce(rel, blob):
  want_hash = FILES[rel]["sha256"]
  if hashlib.sha256(blob).hexdigest() == want_hash:
    return
  assert MANIFEST["platform"]["cpu"] != goldens.cpu_model(), (
    f"{rel}: regenerated on the CPU that generated it ({goldens.cpu_model()}) but bytes differ"
  )
  fresh, old = load(blob), load_file(str(ROOT / rel))
  assert sorted(fresh) == sorted(old)
  for k, a in old.items():
    if a.dtype == np.int32:
      assert np.array_equal(fresh[k], a), f"{rel}: {k}"
    else:
      d = fresh[k].astype(np.float64) - a
      assert (d**2).sum() <= 1e-10 * (a.astype(np.float64) ** 2).sum(), f"{rel}: {k}"


def test_regeneration_reproduces_the_committed_model_goldens():
  # The smaller model with two recipes (F32, and Q4_K_M, which on v3-tiny's widths takes the Q5_0/Q8_0/F16
  # fallbacks); the other files are the same code with other types, and `dq3jax goldens --check` covers them.
  recipes = ("F32", "Q4_K_M")
  seen = set()
  for rel, blob, entry in golden_models.model_goldens("v3-tiny", recipes=recipes):
    seen.add(rel)
    assert entry["kind"] == FILES[rel]["kind"]
    if entry["kind"] == "model-outputs":
      _assert_outputs_reproduce(rel, blob)
    else:
      assert hashlib.sha256(blob).hexdigest() == FILES[rel]["sha256"], f"{rel} differs from a fresh regeneration"
  want = {r for r in FILES if r.startswith("models/v3-tiny/")}
  want = {r for r in want if "/hf/" in r or any(r.endswith(f"/{x}.gguf") or r.endswith(f"/{x}.safetensors")
                                                for x in recipes)}
  assert seen == want


def _tensors(path):
  f = gguf_read.read_gguf(path)
  return {n: (t.type_name, bytes(f.raw(n))) for n, t in f.tensors.items()}


@pytest.mark.crosscheck
@pytest.mark.parametrize("recipe", ["Q8_0", "Q4_K_M", "Q3_K_M", "DQ3_K_M", "Q2_K"])
def test_golden_gguf_is_what_llama_quantize_makes(recipe, tmp_path):
  from dq3jax.convert.quantize import get_recipe, plan_for
  from dq3jax.model import presets
  from dq3jax.recipes.llama_args import tensor_type_overrides
  from tests.io.gguf_llama_ref import llama_quantize

  model = presets.DEFAULT
  r = get_recipe(recipe)
  overrides = []
  if r.name == "DQ3_K_M":
    overrides = tensor_type_overrides(plan_for(presets.preset(model).config, r, "current", "split"))
  ref = tmp_path / "llama.gguf"
  llama_quantize(ROOT / _rel(model, "gguf", "F32"), ref, r.ftype, overrides=overrides)
  want, got = _tensors(ref), _tensors(ROOT / _rel(model, "gguf", recipe))
  assert list(got) == list(want)
  bad = [n for n in want if want[n] != got[n]]
  assert not bad, f"{len(bad)} tensors differ from llama_model_quantize: {bad[:5]}"


@pytest.mark.crosscheck
@pytest.mark.parametrize("recipe", golden_models.RECIPES)
def test_ggml_dequantizes_golden_gguf_as_dq3jax_does(recipe):
  import dq3jax
  from reference import ggml_ref

  f = gguf_read.read_gguf(ROOT / _rel("v3-mini-256", "gguf", recipe))
  for name, t in f.tensors.items():
    raw = f.raw(name)
    n = int(np.prod(t.ne))
    theirs = ggml_ref.dequantize(np.asarray(raw), t.type_id, n)
    ours = dq3jax.dequantize(np.asarray(raw), t.type_id, (n // t.ne[0], t.ne[0])).reshape(-1)
    assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)), f"{recipe}: {name} ({t.type_name})"


@pytest.mark.crosscheck
@pytest.mark.parametrize("model", golden_models.MODELS)
def test_f32_outputs_match_transformers_on_the_golden_hf_directory(model):
  from reference import hf_deepseek

  o = load_file(str(ROOT / _rel(model, "outputs", "F32")))
  ref = hf_deepseek.run(str(ROOT / f"models/{model}/hf"), o["tokens"][None], "float32")
  scale = np.abs(ref["logits"]).max()
  assert np.abs(o["logits"] - ref["logits"][0]).max() <= 1e-5 * scale
  for i, ids in ref["topk_ids"].items():
    assert np.array_equal(np.sort(o[f"blk.{i}.topk_ids"], -1), ids[0]), f"layer {i}"
