"""dq3jax's kernels against the real ggml (llama-cpp-python's libggml-base), byte for byte.

The default suite checks at least 50,000 blocks per type and mode; DQ3JAX_CROSSCHECK_SCALE=10
(what `nox -s crosscheck` sets) checks ten times more.
"""

from __future__ import annotations

import os

import pytest

import dq3jax
from dq3jax.qtypes import computable
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


@pytest.mark.parametrize("type_name", [q.name for q in computable() if q.name != "F32"])
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
