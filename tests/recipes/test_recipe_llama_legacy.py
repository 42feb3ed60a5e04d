"""Opt-in: the `legacy` rule set against a real early-2025 llama-quantize.

Set DQ3JAX_LEGACY_LLAMA_CPP to a directory holding an old llama-cpp-python (e.g. `pip install --target DIR
llama-cpp-python==0.3.8`, which vendors llama.cpp 7841fc723e059d1fd9640e5c0ef19050fcc7c698 of 2025-03-12, the
code generation that made the paper's files). The tiny deepseek2 model of test_recipe_llama_quantize is
quantized by that library in a subprocess (two llama_cpp packages cannot share a process) and each tensor's
type and size must equal dq3jax's plan with rules="legacy". No importance matrix can be passed, so the
presets that need one (Q2_K_S, IQ1_*, IQ2_*) must be refused, exactly where the plan says requires_imatrix.
"""

import json
import os
import subprocess
import sys

import pytest

from dq3jax.recipes.builtin import PRESETS
from dq3jax.recipes.plan import plan_from_config

OLD = os.environ.get("DQ3JAX_LEGACY_LLAMA_CPP")
pytestmark = [
  pytest.mark.crosscheck,
  pytest.mark.skipif(not OLD, reason="DQ3JAX_LEGACY_LLAMA_CPP not set (path of an old llama-cpp-python)"),
]

# Runs inside the subprocess: quantize with every preset, report {preset: {tensor: [type, bytes]}}.
_SCRIPT = r"""
import ctypes, json, sys
import gguf
import llama_cpp
from llama_cpp import llama_cpp as lc
src, out_dir, presets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
res = {"version": llama_cpp.__version__}
for name, ftype in presets.items():
  p = lc.llama_model_quantize_default_params()
  p.ftype = ftype
  p.nthread = 1
  dst = f"{out_dir}/{name}.gguf"
  rc = lc.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
  res[name] = None if rc else {t.name: [t.tensor_type.name, int(t.n_bytes)] for t in gguf.GGUFReader(dst).tensors}
print(json.dumps(res))
"""


@pytest.mark.parametrize("layout", ["kv_b", "split"])
@pytest.mark.parametrize("n_layer", [4, 61])
def test_legacy_rules_match_early_2025_llama_cpp(tmp_path, layout, n_layer):
  from tests.recipes.tiny_gguf import FTYPE, TINY, write_model

  # 61 layers with V3's dense prefix puts every layer-position rule (use_more_bits, n/8, n/16) where R1 has it.
  cfg = dict(TINY, num_hidden_layers=n_layer, first_k_dense_replace=1 if n_layer == 4 else 3)
  src = tmp_path / "tiny.gguf"
  write_model(src, layout, cfg)
  # The old library cannot be given an importance matrix (its params.imatrix points to a C++
  # std::unordered_map, which ctypes cannot build), so the presets whose legacy plan marks a tensor
  # requires_imatrix must be refused, and every other one must write the plan. Of the i-quants, IQ3_XXS,
  # IQ3_XS, IQ3_S, IQ3_M, IQ4_XS and IQ4_NL run without one (IQ3_XXS tensors needed none then).
  refused = {
    p
    for p in PRESETS
    if any(t.requires_imatrix for t in plan_from_config(cfg, p, rules="legacy", layout=layout).tensors)
  }
  assert "Q2_K_S" in refused and "IQ2_XXS" in refused and "IQ3_XXS" not in refused
  presets = {p: FTYPE[p] for p in PRESETS}
  # The old library must win over the installed one; gguf-py still comes from the normal site-packages.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([OLD, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT, str(src), str(tmp_path), json.dumps(presets)],
    capture_output=True, text=True, env=env, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["version"] != "0.3.36", "DQ3JAX_LEGACY_LLAMA_CPP did not take precedence"
  for preset in presets:
    got = res[preset]
    assert (got is None) == (preset in refused), f"{preset}: old llama-quantize refused: {got is None}"
    if got is None:
      continue
    plan = plan_from_config(cfg, preset, rules="legacy", layout=layout)
    want = {
      t.name: [t.type if t.quantized else "F32", t.bytes if t.quantized else 4 * t.params]
      for t in plan.tensors
    }
    assert got == want, preset
