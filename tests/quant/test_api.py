"""The public quantize/dequantize API: argument handling, bad input, and the exact fallback path."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import dq3jax
from dq3jax.qtypes import Family, computable
from dq3jax.quant import api
from reference import ggml_ref


def test_registry_sizes_agree_with_gguf_py():
  for q in dq3jax.REGISTRY.values():
    ref = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(q.id)]
    if q.name == "Q8_1":  # gguf-py still has Q8_1's old layout (two float32); ggml's is two fp16
      assert ref == (32, 40) and (q.block_elems, q.block_bytes) == (32, 36)
    else:
      assert ref == (q.block_elems, q.block_bytes), q.name
    assert q.row_bytes(q.block_elems * 3) == 3 * q.block_bytes


@pytest.mark.crosscheck
def test_registry_sizes_are_ggmls():
  for q in dq3jax.REGISTRY.values():
    assert ggml_ref.row_size(q.id, 3 * q.block_elems) == 3 * q.block_bytes, q.name


def test_types_without_kernels_are_refused():
  with pytest.raises(ValueError, match="dq3jax has no quantizer for TQ1_0"):
    dq3jax.quantize(np.zeros(256, np.float32), "TQ1_0")
  with pytest.raises(ValueError, match="dq3jax has no dequantizer for Q8_1"):
    dq3jax.dequantize(np.zeros(36, np.uint8), "Q8_1", (32,))


@pytest.mark.parametrize("spec", ["q4_k", "Q4_K", 12, gguf.GGMLQuantizationType.Q4_K, dq3jax.GGMLType.Q4_K])
def test_type_can_be_named_several_ways(spec):
  assert dq3jax.qtype_of(spec).name == "Q4_K"


def test_one_dimensional_input_is_one_row():
  x = np.linspace(-1, 1, 512, dtype=np.float32)
  assert dq3jax.quantize(x, "Q8_0").shape == (1, 512 // 32 * 34)
  assert np.array_equal(dq3jax.quantize(x, "Q8_0"), dq3jax.quantize(x[None], "Q8_0"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_row_and_block(bad):
  x = np.zeros((4, 512), np.float32)
  x[2, 300] = bad
  with pytest.raises(ValueError, match=r"row 2, column 300 \(block 1 of that row\)"):
    dq3jax.quantize(x, "Q4_K")
  with pytest.raises(ValueError, match=r"row 2, column 300 \(block 9 of that row\)"):
    dq3jax.quantize(x, "Q4_0")


def test_width_not_multiple_of_block_names_values():
  with pytest.raises(ValueError, match=r"Q4_K: row width 300 is not a multiple of the block size 256"):
    dq3jax.quantize(np.zeros((2, 300), np.float32), "Q4_K")


def test_unknown_type():
  with pytest.raises(ValueError, match="unknown ggml type 'Q7_K'"):
    dq3jax.quantize(np.zeros(256, np.float32), "Q7_K")
  with pytest.raises(ValueError, match="IQ2_XXS"):
    dq3jax.quantize(np.zeros(256, np.float32), gguf.GGMLQuantizationType.IQ2_XXS)


@pytest.mark.parametrize(
  ("imatrix", "message"),
  [
    (np.ones(128, np.float32), r"imatrix must have shape \(256,\)"),
    (-np.ones(256, np.float32), r"column 0 is -1\.0"),
    (np.full(256, np.nan, np.float32), r"column 0 is nan"),
  ],
)
def test_bad_imatrix(imatrix, message):
  with pytest.raises(ValueError, match=message):
    dq3jax.quantize(np.ones((1, 256), np.float32), "Q4_K", imatrix=imatrix)


def test_wrong_input_rank_and_dtype():
  with pytest.raises(ValueError, match=r"\[rows, n\]"):
    dq3jax.quantize(np.zeros((2, 2, 256), np.float32), "Q4_K")
  with pytest.raises(TypeError, match="float array"):
    dq3jax.quantize(np.zeros((2, 256), np.int32), "Q4_K")


def test_dequantize_checks_byte_count_and_shape():
  data = np.zeros(144 * 2, np.uint8)
  assert dq3jax.dequantize(data, "Q4_K", (2, 256)).shape == (2, 256)
  with pytest.raises(ValueError, match=r"must be 288 bytes \(2 blocks of 144\), got 287"):
    dq3jax.dequantize(data[:-1], "Q4_K", (2, 256))
  with pytest.raises(ValueError, match="not a multiple of the block size 256"):
    dq3jax.dequantize(data, "Q4_K", (512, 1))
  assert dq3jax.dequantize(bytes(data), "Q4_K", 512).shape == (512,)


# Every type and mode: compiling the 20 exact kernels of the types before IQ4_NL/IQ4_XS took about 85 s on 2
# cores (benchmarks/bench_compile.py; it was 7 CPU-minutes before the kernels' loops became scans, when the
# default suite ran only four of them); the four IQ4 cases add about 9 s (test durations, empty cache).
_EXACT_CASES = [
  pytest.param(q.name, with_im, id=f"{q.name}-{'imatrix' if with_im else 'ref'}")
  for q in computable()
  if q.kernels.family is not Family.FLOAT
  for with_im in ((False, True) if q.uses_imatrix else (False,))
]


@pytest.mark.crosscheck
@pytest.mark.parametrize(("type_name", "with_imatrix"), _EXACT_CASES)
def test_exact_arithmetic_path_agrees_with_ggml_on_ordinary_blocks(type_name, with_imatrix):
  """The float64-emulated path (used for blocks that underflow) is checked on ordinary blocks too."""
  q = dq3jax.qtype_of(type_name)
  rng = np.random.default_rng(11)
  x = (rng.standard_t(3, size=(4, 2048)) * 0.02).astype(np.float32)
  im = (rng.standard_normal(2048) ** 2).astype(np.float32) if with_imatrix else None
  want = ggml_ref.quantize(x, q.id, im).reshape(-1, q.block_bytes)
  xb = np.ascontiguousarray(x.reshape(-1, q.block_elems).T)
  qwb = np.ascontiguousarray(np.tile(im.reshape(-1, q.block_elems), (4, 1)).T) if with_imatrix else None
  s2 = None
  if with_imatrix and q.kernels.family is Family.LEGACY:
    s2 = np.repeat(api._row_sigma2(x), 2048 // q.block_elems)
  got = api._run_exact(q.id, with_imatrix, s2 is not None, xb, qwb, s2).T
  assert np.array_equal(got, want)
