"""goldens/models/: complete, the same bytes on every machine, and agreeing with the independent references.

- Layout: every model (v3-pydoc, v3-tiny) has its HF files, a GGUF per recipe and three outputs files per
  recipe (emulation none; llama-cpu with F32 KV; llama-cpu with F16 KV) with the layout's tensors and
  metadata; v3-pydoc's weights, tokenizer and training record are committed inputs whose sha256 the manifest
  lists, and its golden tokens are the first T held-out ids.
- Undecided points (dq3jax.model.undecided): no internal one anywhere (an activation code, fp16 cache entry
  or expert choice that another evaluation order could decide differently); output elements are listed.
- Identical on every machine: in a subprocess under XLA_FLAGS=--xla_cpu_max_isa=AVX2, regeneration reproduces v3-tiny entirely and v3-pydoc's F32 and Q4_K_M outputs (all three emulations) byte
  for byte. (Measured while developing: AVX-512, AVX2, AVX and SSE4_2 code give the same float32 bytes;
  the float64 values themselves differ by up to 2^-47.4 of a row's scale under AVX and SSE4_2, which the
  undecided margin covers 32 times over.)
- Self-consistency: decoding through the cache gives the prefill logits as float32, except at listed
  undecided elements; F32 files are their own llama-cpu emulation; the emulations differ where they should.
- The golden GGUF files carry exactly llama.cpp's bytes: llama_model_quantize of the golden F32 GGUF gives
  the same tensors (type and bytes) as each golden quantized GGUF; ggml's dequantization of every golden
  GGUF tensor equals dq3jax's, bit for bit.
- The F32 outputs (emulation none) are transformers' DeepseekV3 on each golden HF directory evaluated in
  float64, to float32 rounding, with the same experts.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from dq3jax import golden_models
from dq3jax.golden_models import RECIPES, SIZES, VARIANTS
from dq3jax.io import gguf_read

ROOT = pathlib.Path(__file__).resolve().parents[1] / "goldens"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
FILES = MANIFEST["files"]
LAYER_KEYS = ("attn_latent", "hidden_after_attn", "hidden_after_mlp")
MOE_KEYS = ("topk_ids", "topk_weights", "router_scores")


def _gguf(model, recipe):
  return f"models/{model}/gguf/{recipe}.gguf"


def _outputs(model, recipe, variant=VARIANTS[0]):
  return golden_models.outputs_rel(model, recipe, variant)


def _load(rel):
  return load_file(str(ROOT / rel))


def test_manifest_lists_every_model_file_with_its_provenance():
  assert {r.split("/")[1] for r in FILES if r.startswith("models/")} == set(golden_models.MODELS)
  for model in golden_models.MODELS:
    hf_kind = "model-hf-trained" if model == golden_models.TRAINED else "model-hf"
    for name in ("config.json", "model.safetensors"):
      assert FILES[f"models/{model}/hf/{name}"]["kind"] == hf_kind
    t, p = SIZES[model].tokens, SIZES[model].prefill
    for recipe in RECIPES:
      g = FILES[_gguf(model, recipe)]
      assert (g["kind"], g["recipe"], g["model"], g["layout"]) == ("model-gguf", recipe, model, "split")
      for v in VARIANTS:
        rel = _outputs(model, recipe, v)
        o = FILES[rel]
        assert (o["kind"], o["recipe"], o["gguf"]) == ("model-outputs", recipe, _gguf(model, recipe))
        assert (o["emulation"], o["kv_cache"], o["prefill"]) == (v.emulation, v.kv_cache, p)
        with safe_open(str(ROOT / rel), "np") as f:
          meta = f.metadata()
          names = set(f.keys())
        assert meta == {"kind": "model-outputs", "model": model, "recipe": recipe, "prefill": str(p),
                        "emulation": v.emulation, "kv_cache": v.kv_cache}  # fmt: skip
        cfg = o["config"]
        want = {"tokens", "logits", "decode_logits"}
        for i in range(cfg["num_hidden_layers"]):
          want |= {f"blk.{i}.{k}" for k in LAYER_KEYS}
          if i >= cfg["first_k_dense_replace"]:
            want |= {f"blk.{i}.{k}" for k in MOE_KEYS}
        assert names == want, rel
        ts = o["tensors"]
        assert ts["logits"]["shape"] == [t, cfg["vocab_size"]]
        assert ts["decode_logits"]["shape"] == [t - p, cfg["vocab_size"]]
        i = cfg["num_hidden_layers"] - 1
        assert ts[f"blk.{i}.router_scores"]["shape"] == [t, cfg["n_routed_experts"]]
        assert ts[f"blk.{i}.topk_ids"]["dtype"] == "int32" and ts["logits"]["dtype"] == "float32"
  # Only what pyproject.toml pins exactly: another machine's regeneration must leave the manifest unchanged.
  import jax  # noqa: PLC0415

  assert (
    set(MANIFEST["versions"]) == {"jax", "jaxlib", "gguf"} and MANIFEST["versions"]["jax"] == jax.__version__
  )
  assert not {"platform", "xla_flags"} & set(MANIFEST)


def test_committed_training_outputs_are_listed_with_their_hashes():
  model = golden_models.TRAINED
  base = ROOT / "models" / model
  committed = [p for sub in ("hf", "train") for p in sorted((base / sub).iterdir()) if p.is_file()]
  names = {p.name for p in committed}
  assert {"config.json", "model.safetensors", "tokenizer.json", "heldout_tokens.json"} <= names
  for p in committed:
    e = FILES[p.relative_to(ROOT).as_posix()]
    assert e["kind"] in ("model-hf-trained", "model-train")
    assert hashlib.sha256(p.read_bytes()).hexdigest() == e["sha256"], p
  held = json.loads((base / "train" / "heldout_tokens.json").read_text())["token_ids"]
  for recipe in RECIPES:
    o = _load(_outputs(model, recipe))
    assert np.array_equal(o["tokens"], np.asarray(held[: SIZES[model].tokens], np.int32))
  from dq3jax.model.config import DeepseekV3Config

  hf = DeepseekV3Config.from_hf_config(json.loads((base / "hf" / "config.json").read_text()))
  assert FILES[_outputs(model, "F32")]["config"] == hf.to_hf_config()  # the model the goldens ran


def test_no_internal_point_is_undecided_and_output_points_are_listed():
  from dq3jax.model import undecided

  total = 0
  for rel, e in FILES.items():
    if e["kind"] != "model-outputs":
      continue
    u = e["undecided"]
    assert u["internal_count"] == 0, f"{rel}: {golden_models.describe(u)}"
    listed = sum(len(golden_models.undecided_elements(u, name)) for name in u["outputs"])
    assert listed == u["output_count"], rel
    assert u["margin"] == f"2^{int(np.log2(undecided.REL_MARGIN))} of the row's largest magnitude"
    total += listed
  assert MANIFEST["undecided"]["internal"] == 0 and MANIFEST["undecided"]["outputs"] == total


def _bits_differ(a, b):
  return np.argwhere(a.view(np.uint32) != b.view(np.uint32))


@pytest.mark.parametrize("model", golden_models.MODELS)
def test_outputs_are_self_consistent(model):
  p = SIZES[model].prefill
  for recipe in RECIPES:
    files = {v.suffix: _load(_outputs(model, recipe, v)) for v in VARIANTS}
    for v in VARIANTS:
      o, u = files[v.suffix], FILES[_outputs(model, recipe, v)]["undecided"]
      # Decoding through the latent cache is another float64 evaluation order: as float32 it is the prefill,
      # except where one of the two is listed as undecided (it can only differ by crossing a midpoint).
      differ = {(int(t) + p, int(e)) for t, e in _bits_differ(o["decode_logits"], o["logits"][p:])}
      listed = {tuple(x) for n in ("logits", "decode_logits") for x in golden_models.undecided_elements(u, n)}
      assert differ <= listed, (recipe, v.suffix, sorted(differ - listed)[:5])
      assert np.array_equal(o["tokens"], golden_models.tokens_for(model, ROOT))
    plain, emu, f16 = (files[v.suffix]["logits"] for v in VARIANTS)
    scale = np.abs(plain).max()
    if recipe == "F32":  # nothing to round in the activations: the emulation is the model itself
      for k, a in files[""].items():
        assert np.array_equal(a, files[".llama-cpu"][k]), k
    else:  # llama.cpp's Q8 activations move the logits by far more than float32 rounding
      assert np.abs(emu - plain).max() > 1e-3 * scale, recipe
    # The fp16 cache moves logits by its rounding (2^-11 per cached value) at most positions; a code or expert
    # flip it causes can move a few positions by more.
    per_pos = np.abs(f16 - emu).max(-1)
    assert per_pos.max() > 1e-6 * scale and np.median(per_pos) < 0.05 * scale, recipe


def _regenerate(plan, xla_flags):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return subprocess.Popen(
    [sys.executable, "-m", "dq3jax.golden_models", json.dumps(plan), str(ROOT)],
    cwd=ROOT.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip


def test_regeneration_under_another_isa_reproduces_the_committed_bytes():
  # v3-tiny entirely (HF, GGUF, outputs), and v3-pydoc's F32 and Q4_K_M outputs in all three emulations
  # computed from the committed GGUFs, under AVX2 (no AVX-512), against the committed bytes (made under
  # default flags on an AMD EPYC; a full regeneration on an Intel Xeon matched them too). The same under this
  # machine's default flags is what `nox -s goldens` and `dq3jax goldens --check` show; it is not repeated
  # here (2 minutes of CPU, of a suite that is compile-bound).
  plan = {"v3-tiny": [list(RECIPES), False], "v3-pydoc": [["F32", "Q4_K_M"], True]}
  runs = {flags: _regenerate(plan, flags) for flags in ("--xla_cpu_max_isa=AVX2",)}
  want = {r for r in FILES if r.startswith("models/v3-tiny/")}
  want |= {_outputs("v3-pydoc", r, v) for r in ("F32", "Q4_K_M") for v in VARIANTS}
  for flags, proc in runs.items():
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"XLA_FLAGS={flags!r}: {err[-3000:]}"
    hashes = json.loads(out.strip().splitlines()[-1])
    assert set(hashes) == want
    bad = [rel for rel, h in hashes.items() if h != FILES[rel]["sha256"]]
    assert bad == [], f"XLA_FLAGS={flags!r}: {bad} differ from the committed goldens"


def _tensors(path):
  f = gguf_read.read_gguf(path)
  return {n: (t.type_name, bytes(f.raw(n))) for n, t in f.tensors.items()}


def _config(model):
  from dq3jax.model.config import DeepseekV3Config

  return DeepseekV3Config.from_hf_config(FILES[_gguf(model, "F32")]["config"])


@pytest.mark.crosscheck
@pytest.mark.parametrize("recipe", ["Q8_0", "Q4_K_M", "Q3_K_M", "DQ3_K_M", "Q2_K"])
def test_golden_gguf_is_what_llama_quantize_makes(recipe, tmp_path):
  # On v3-pydoc, whose row lengths are multiples of 256: every k-quant applies as on V3.
  from dq3jax.convert.quantize import get_recipe, plan_for
  from dq3jax.recipes.llama_args import tensor_type_overrides
  from tests.io.gguf_llama_ref import llama_quantize

  model = golden_models.TRAINED
  r = get_recipe(recipe)
  overrides = []
  if r.name == "DQ3_K_M":
    overrides = tensor_type_overrides(plan_for(_config(model), r, "current", "split"))
  ref = tmp_path / "llama.gguf"
  llama_quantize(ROOT / _gguf(model, "F32"), ref, r.ftype, overrides=overrides)
  want, got = _tensors(ref), _tensors(ROOT / _gguf(model, recipe))
  assert list(got) == list(want)
  bad = [n for n in want if want[n] != got[n]]
  assert bad == [], f"{len(bad)} tensors differ from llama_model_quantize: {bad[:5]}"


@pytest.mark.crosscheck
@pytest.mark.parametrize("recipe", RECIPES)
def test_ggml_dequantizes_golden_gguf_as_dq3jax_does(recipe):
  import dq3jax
  from reference import ggml_ref

  f = gguf_read.read_gguf(ROOT / _gguf(golden_models.TRAINED, recipe))
  for name, t in f.tensors.items():
    raw = f.raw(name)
    n = int(np.prod(t.ne))
    theirs = ggml_ref.dequantize(np.asarray(raw), t.type_id, n)
    ours = dq3jax.dequantize(np.asarray(raw), t.type_id, (n // t.ne[0], t.ne[0])).reshape(-1)
    assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)), f"{recipe}: {name} ({t.type_name})"


@pytest.mark.crosscheck
@pytest.mark.parametrize("model", golden_models.MODELS)
def test_f32_outputs_are_transformers_in_float64_on_the_golden_hf_directory(model):
  from reference import hf_deepseek

  o = _load(_outputs(model, "F32"))
  ref = hf_deepseek.run(str(ROOT / f"models/{model}/hf"), o["tokens"][None], "float64")
  scale = np.abs(ref["logits"]).max()
  assert np.abs(o["logits"] - ref["logits"][0]).max() <= 1e-6 * scale  # float32 rounding of the golden
  for i, ids in ref["topk_ids"].items():
    assert np.array_equal(np.sort(o[f"blk.{i}.topk_ids"], -1), ids[0]), f"layer {i}"
