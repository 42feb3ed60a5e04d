"""dq3jax's kernels against the real ggml (llama-cpp-python's libggml-base), byte for byte.

The default suite checks at least 50,000 blocks per type and mode; DQ3JAX_CROSSCHECK_SCALE=10
(what `nox -s crosscheck` sets) checks ten times more.
"""

from __future__ import annotations

import os

import pytest

import dq3jax
from dq3jax.qtypes import REGISTRY, computable
from tests.quant import crosscheck

SCALE = int(os.environ.get("DQ3JAX_CROSSCHECK_SCALE", "1"))
MIN_BLOCKS = 50_000 * SCALE

pytestmark = pytest.mark.crosscheck


@pytest.mark.parametrize(
  ("type_name", "mode"), crosscheck.PARAMS, ids=[f"{t}-{m}" for t, m in crosscheck.PARAMS]
)
def test_quantize_and_dequantize_match_ggml(type_name, mode):
  n = crosscheck.check_type(type_name, mode, MIN_BLOCKS)
  assert n >= MIN_BLOCKS


# Every type dq3jax reads, through the public dequantize: also the i-quants it cannot write yet.
@pytest.mark.parametrize(
  "type_name", [q.name for q in REGISTRY.values() if q.dequantizable and q.name != "F32"]
)
def test_dequantize_random_bytes_matches_ggml(type_name):
  crosscheck.check_random_bytes(type_name, 4096)


GGUF_PY_TYPES = [
  "F16",
  "BF16",
  "Q4_0",
  "Q4_1",
  "Q5_0",
  "Q5_1",
  "Q8_0",
  "Q2_K",
  "Q3_K",
  "Q4_K",
  "Q5_K",
  "Q6_K",
  "IQ4_NL",
  "IQ4_XS",
]


@pytest.mark.parametrize("type_name", GGUF_PY_TYPES)
def test_dequantize_matches_gguf_py(type_name):
  crosscheck.check_against_gguf_py(type_name, 4096)


@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q8_0"])
def test_imatrix_is_ignored_where_ggml_ignores_it(type_name):
  import numpy as np

  from reference import ggml_ref

  rng = np.random.default_rng(5)
  x = rng.standard_normal((8, 512)).astype(np.float32)
  im = rng.random(512).astype(np.float32)
  q = dq3jax.qtype_of(type_name)
  assert np.array_equal(dq3jax.quantize(x, q, imatrix=im), ggml_ref.quantize(x, q.id, im))


def test_types_crosschecked_without_imatrix_do_not_require_one_in_ggml():
  # The "ref" mode calls ggml_quantize_chunk without weights; ggml asserts on that for the types of
  # ggml_quantize_requires_imatrix (IQ2_XXS, IQ2_XS, IQ1_S). IQ4_NL and IQ4_XS are not among them.
  import ctypes

  from reference import ggml_ref

  fn = ggml_ref._lib().ggml_quantize_requires_imatrix
  fn.restype, fn.argtypes = ctypes.c_bool, [ctypes.c_int]
  assert fn(dq3jax.qtype_of("IQ2_XXS").id)  # the query itself works
  assert [q.name for q in computable() if q.storable and fn(q.id)] == []


def test_iq4_grid_inputs_hit_exact_ties_and_exact_fits():
  # What stress_inputs' iq4_grid kind promises, in numpy float32 (IEEE, one rounding per operation) and in
  # ggml's bytes: without it no cross-check input would decide best_index_int8 at an exact tie.
  import numpy as np

  from dq3jax.quant import stress_inputs
  from reference import ggml_ref

  x = stress_inputs.CROSSCHECK_KINDS["iq4_grid"](np.random.default_rng(0), 8, 1024).astype(np.float32)
  g = x.reshape(-1, 32)
  m = g[:, :1]  # each group's first absolute maximum
  assert np.all(np.abs(g) <= np.abs(m))
  levels = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
  mids = (levels[:-1] + levels[1:]) / np.float32(2)
  # ggml's first trial: id = 1/(-m/-127); its trial itry = 0: id = (0 + values[0])/m = -127/m.
  first = g * (np.float32(1) / (-m / np.float32(-127)))
  other = g * (np.float32(-127) / m)
  at_tie = np.isin(first, mids) | np.isin(other, mids)
  assert at_tie.mean() > 0.1, at_tie.mean()
  d = ggml_ref.quantize(x, dq3jax.qtype_of("IQ4_NL").id).reshape(-1, 18)[:, :2].copy().view(np.float16)[:, 0]
  exact_fit = d.astype(np.float32) == -m[:, 0] / np.float32(127)
  assert exact_fit.mean() > 0.1, exact_fit.mean()
