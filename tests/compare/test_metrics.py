"""dq3jax.compare.metrics against answers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dq3jax.compare import metrics

F = np.float32
TINY = np.array([1], np.uint32).view(F)[0]  # smallest positive subnormal, 2^-149


def test_ulp_distance_known_answers():
  a = np.array([0.0, -0.0, TINY, -TINY, 1.0, -1.0, np.finfo(F).max, np.inf, 1.0], F)
  b = np.array([-0.0, 0.0, -TINY, 0.0, np.nextafter(F(1), F(2)), 1.0, np.inf, np.inf, 1.5], F)
  d = metrics.ulp_distance(a, b)
  # +0/-0 are one point; across zero the subnormals are 2 apart (one step each side); -1 to 1 is twice the
  # bit pattern of 1.0 (0x3f800000); max finite is one step below Inf; 1.0 to 1.5 is 2^22 steps.
  assert d.tolist() == [0, 0, 2, 1, 1, 2 * 0x3F800000, 1, 0, 2**22]


def test_ulp_distance_nan_handling():
  nan2 = np.array([0x7FC00001], np.uint32).view(F)[0]  # another NaN payload
  a = np.array([np.nan, np.nan, 1.0], F)
  b = np.array([nan2, 1.0, np.nan], F)
  assert metrics.ulp_distance(a, b).tolist() == [0, math.inf, math.inf]
  assert metrics.bits_differ(a, b) == 3  # payloads and NaN-vs-number all differ in bits
  assert metrics.bits_differ(np.array([0.0], F), np.array([-0.0], F)) == 1


def test_abs_and_rel_error_special_values():
  a = np.array([2.0, 0.0, 0.0, np.inf, np.inf, np.nan, 4.0], F)
  b = np.array([3.0, 0.0, 1.0, np.inf, -np.inf, np.nan, np.nan], F)
  assert metrics.abs_error(a, b).tolist() == [1.0, 0.0, 1.0, 0.0, math.inf, 0.0, math.inf]
  assert metrics.rel_error(a, b).tolist() == [0.5, 0.0, math.inf, 0.0, math.inf, 0.0, math.inf]


def test_nmse_formula():
  # (0^2 + 1^2) / (1^2 + 2^2) = 1/5
  assert metrics.nmse(np.array([1, 2], F), np.array([1, 3], F)) == pytest.approx(0.2, rel=1e-15)
  assert metrics.nmse(np.zeros(3, F), np.zeros(3, F)) == 0.0  # 0/0: identical, not NaN
  assert metrics.nmse(np.zeros(3, F), np.ones(3, F)) == math.inf


def test_nmse_non_finite_values_are_explicit():
  inf, nan = np.inf, np.nan
  # Matched infinities and NaN-vs-NaN agree and are left out: (1 - 2)^2 / 1^2 = 1.
  assert metrics.nmse(np.array([1, inf, -inf, nan], F), np.array([2, inf, -inf, nan], F)) == 1.0
  for b in (
    [1, 1, -inf, nan],
    [1, inf, inf, nan],
    [1, inf, -inf, 0],
  ):  # NaN or infinity against anything else
    assert metrics.nmse(np.array([1, inf, -inf, nan], F), np.array(b, F)) == math.inf
  rows = metrics.nmse_rows(np.array([[1, 2], [inf, 1]], F), np.array([[1, 2], [1, 1]], F))
  assert rows.tolist() == [0.0, math.inf]


def test_nmse_squares_in_float32_as_test_backend_ops():
  # a - b = 4097 * 2^-23 exactly; its square 16785409 * 2^-46 needs 25 bits, and float32 rounds the tie
  # to even: 16785408 * 2^-46. llama.cpp squares `float`s, so that is the numerator it accumulates.
  a = np.array([1.0], F)
  b = np.array([1.0 + 4097 * 2.0**-23], F)
  assert metrics.nmse(a, b) == 16785408 * 2.0**-46


def test_nmse_sums_left_to_right_in_double():
  # Denominator terms 1, then sixteen 2^-54: added one at a time each vanishes (below half an ulp of 1),
  # so C's loop gives exactly 1; an exact or pairwise sum would give 1 + 2^-50.
  a = np.array([1.0] + [2.0**-27] * 16, F)
  b = np.array([0.0] + [2.0**-27] * 16, F)
  assert metrics.nmse(a, b) == 1.0
  assert math.fsum([1.0] + [2.0**-54] * 16) == 1 + 2.0**-50


def test_nmse_rows_is_per_row_nmse():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 7)).astype(F)
  b = (a + 1e-3 * rng.standard_normal((5, 7))).astype(F)
  per = metrics.nmse_rows(a, b)
  assert per.tolist() == [metrics.nmse(a[i], b[i]) for i in range(5)]


def test_float_errors_summary():
  a = np.array([[1.0, 2.0], [4.0, -0.0]], F)
  b = np.array([[1.0, 2.0], [np.nextafter(F(4), F(8)), 0.0]], F)
  fe = metrics.float_errors(a, b)
  assert fe.max_ulp == 1 and fe.max_ulp_index == (1, 0)
  assert fe.max_abs == 2.0**-21 and fe.max_rel == 2.0**-23
  assert fe.bits_differ == 2 and fe.nan_mismatch == 0


def test_byte_diff_names_block_row_and_bits():
  a = np.zeros((3, 4 * 18), np.uint8)  # 3 rows of 4 Q4_0 blocks (18 bytes each)
  b = a.copy()
  b[2, 18 + 5] = 0b1001  # row 2, block 1, byte 5 of the block: bits 0 and 3
  b[2, 3 * 18] = 1  # another block
  d = metrics.byte_diff(a, b, 18)
  assert (d.n_blocks, d.n_blocks_differ, d.n_bytes_differ) == (12, 2, 2)
  f = d.first
  assert (f.row, f.block, f.byte_offset) == (2, 1, 2 * 72 + 18)
  assert f.deltas[0].offset_in_block == 5 and f.deltas[0].xor == 9 and f.deltas[0].bits == (0, 3)
  assert (f.n_bytes_differ, f.n_bits_differ) == (1, 2)
  assert metrics.byte_diff(a, a, 18).first is None


def test_router_sets_and_weights_by_expert():
  g = np.array([[3, 1], [0, 2], [1, 2]])
  c = np.array([[1, 3], [0, 3], [2, 1]])
  assert metrics.topk_set_differs(g, c).tolist() == [False, True, False]
  gw = np.array([[0.7, 0.3], [0.5, 0.5], [0.6, 0.4]])
  cw = np.array([[0.3, 0.7], [0.5, 0.5], [0.4, 0.6]])
  np.testing.assert_array_equal(
    metrics.weights_by_expert(g, gw)[[0, 2]], metrics.weights_by_expert(c, cw)[[0, 2]]
  )
