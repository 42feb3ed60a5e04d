"""End to end against the real llama-quantize (llama-cpp-python 0.3.36): a tiny random deepseek2 GGUF is
quantized with every preset, and the output file's per-tensor types and byte sizes must equal dq3jax's plan
(`current` rules). Its widths (160, 320, 128, 64, 32) are not multiples of 256, so most fallbacks are hit.
With an importance matrix (written and read back through dq3jax.io.imatrix), a tensor's bytes change exactly
where `imatrix_use` says llama-quantize applies it. The i-quant presets: llama-quantize refuses exactly those
whose plan marks a tensor requires_imatrix, and, given an imatrix, writes the plan made with imatrix=True (an
8-layer model, so the imatrix-dependent first-eighth rules of IQ3_XXS / IQ4_NL / IQ4_XS show)."""

import gguf
import numpy as np
import pytest

from dq3jax.io.imatrix import read_imatrix, write_gguf
from dq3jax.recipes.builtin import IQ_PRESETS, PRESETS
from dq3jax.recipes.imatrix_use import imatrix_use
from dq3jax.recipes.inventory import dims_from_config, inventory
from dq3jax.recipes.plan import plan_from_config
from dq3jax.recipes.recipe_file import resolve_recipe
from reference import llama_quantize as llama_quantize_ref
from tests.recipes.tiny_gguf import FTYPE, TINY, write_model

pytestmark = [
  pytest.mark.crosscheck,
]


def _quantize(src, dst, preset, imatrix=None, check=True):
  rc = llama_quantize_ref.quantize(src, dst, FTYPE[preset], imatrix=imatrix)
  if not check and rc != 0:
    return None
  assert rc == 0
  return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(dst).tensors}


@pytest.fixture(scope="module", params=["kv_b", "split"])
def tiny_model(request, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / f"tiny-{request.param}.gguf"
  inv = write_model(path, request.param)
  return request.param, path, inv


@pytest.fixture(scope="module")
def tiny_imatrix(tmp_path_factory):
  # Column weights for every 2-D/3-D weight, per expert for the stacked experts, via a GGUF imatrix file.
  d = dims_from_config(TINY)
  rng = np.random.default_rng(1)
  ents = {}
  for layout in ("kv_b", "split"):
    for t in inventory(d, layout):
      if len(t.ne) >= 2 and t.name.endswith("weight"):
        n_mat = t.ne[2] if len(t.ne) > 2 else 1
        ents[t.name] = ((rng.random((n_mat, t.ne[0])) ** 6 * 50).astype(np.float32), np.full(n_mat, 7))
  path = tmp_path_factory.mktemp("imat") / "imatrix.gguf"
  write_gguf(path, ents, datasets=("random",), chunk_count=1, chunk_size=7)
  return read_imatrix(path)


def _needs_imatrix(preset, cfg=TINY):
  return any(t.requires_imatrix for t in plan_from_config(cfg, preset, layout="split").tensors)


@pytest.mark.parametrize("preset", [p for p in PRESETS if not _needs_imatrix(p)])
def test_plan_matches_llama_quantize(tiny_model, tmp_path, preset):
  layout, path, _ = tiny_model
  got = _quantize(path, tmp_path / "out.gguf", preset)
  plan = plan_from_config(TINY, preset, rules="current", layout=layout)
  want = {t.name: (t.type if t.quantized else "F32", t.bytes) for t in plan.tensors}
  # Tensors the driver keeps are F32 in this synthetic file (the converter would write BF16 for 2-D ones).
  for t in plan.tensors:
    if not t.quantized:
      want[t.name] = ("F32", 4 * t.params)
  assert got == want


def test_imatrix_application_matches_llama_quantize(tiny_model, tiny_imatrix, tmp_path):
  layout, path, inv = tiny_model
  by_shape = {t.name: t for t in inv}
  imat = {t.name: tiny_imatrix.weights(t.name).reshape(-1) for t in inv if t.name in tiny_imatrix.entries}
  for preset in ("Q4_K_M", "Q2_K_S", "Q6_K"):
    plain = None if preset == "Q2_K_S" else _quantize(path, tmp_path / "a.gguf", preset)
    with_im = _quantize(path, tmp_path / "b.gguf", preset, imat)
    if plain is None:
      continue  # Q2_K_S cannot run without one; reaching here shows it accepted the weights
    assert with_im == plain  # an imatrix changes no k-quant preset's types or sizes
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    recipe = resolve_recipe(preset)
    for name, (ty, _) in plain.items():
      t = by_shape[name]
      entry = imat.get(name)
      use = imatrix_use(name, t.ne, "F32", ty, None if entry is None else entry.size, recipe)
      assert (a[name] != b[name]) == use.applies, (preset, name, ty, use.reason)


@pytest.mark.parametrize("recipe", ["DQ3_K_M", "Q4_K_M"])
def test_tensor_type_overrides_reproduce_plan(tiny_model, tmp_path, recipe):
  # The real llama-quantize, given the recipe's preset plus dq3jax's --tensor-type overrides, writes the plan.

  from dq3jax.recipes.llama_args import tensor_type_overrides

  layout, path, _ = tiny_model
  plan = plan_from_config(TINY, recipe, rules="current", layout=layout)
  overrides = tensor_type_overrides(plan)
  assert (overrides == []) == (recipe == "Q4_K_M")
  out = tmp_path / "out.gguf"
  assert llama_quantize_ref.quantize(path, out, FTYPE[plan.recipe.ftype], overrides=overrides) == 0
  got = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(out).tensors}
  want = {
    t.name: (t.type if t.quantized else "F32", t.bytes if t.quantized else 4 * t.params) for t in plan.tensors
  }
  assert got == want


@pytest.mark.parametrize("preset", [*IQ_PRESETS, "Q2_K_S"])
def test_imatrix_requirement_matches_llama_quantize(tiny_model, tmp_path, preset):
  layout, path, _ = tiny_model
  plan = plan_from_config(TINY, preset, rules="current", layout=layout)
  needed = [t.name for t in plan.tensors if t.requires_imatrix]
  got = _quantize(path, tmp_path / "out.gguf", preset, check=False)
  assert (got is None) == bool(needed), (preset, needed[:3])


TINY8 = dict(TINY, num_hidden_layers=8)


@pytest.fixture(scope="module", params=["kv_b", "split"])
def tiny8_model(request, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny8") / f"tiny8-{request.param}.gguf"
  inv = write_model(path, request.param, TINY8)
  rng = np.random.default_rng(2)
  imat = {}
  for t in inv:
    if len(t.ne) >= 2 and t.name.endswith("weight"):
      n_mat = t.ne[2] if len(t.ne) > 2 else 1
      imat[t.name] = (rng.random(n_mat * t.ne[0]) ** 4 * 20 + 0.01).astype(np.float32)
  return request.param, path, imat


@pytest.mark.parametrize("preset", IQ_PRESETS)
def test_iq_plan_with_imatrix_matches_llama_quantize(tiny8_model, tmp_path, preset):
  layout, path, imat = tiny8_model
  got = _quantize(path, tmp_path / "out.gguf", preset, imat)
  plan = plan_from_config(TINY8, preset, rules="current", layout=layout, imatrix=True)
  want = {
    t.name: (t.type if t.quantized else "F32", t.bytes if t.quantized else 4 * t.params) for t in plan.tensors
  }
  diff = {n: (got.get(n), want[n]) for n in want if got.get(n) != want[n]}
  assert diff == {} and set(got) == set(want), f"{preset}: llama.cpp vs dq3jax {dict(list(diff.items())[:5])}"
