"""The lattice i-quant dequantizers (dq3jax/quant/iq_dequant.py) and their codebooks (iq_grids.py).

Dequantized floats must equal, bit for bit (NaN payloads included), live ggml's `to_float`
(reference/ggml_ref.py), and gguf-py's numpy dequantizers up to the sign of a NaN (see
test_nan_sign_under_a_minus_sign), on random blocks (every fp16 scale finite,
subnormals and zeros included) and on edge blocks (all-0x00, all-0xFF, and +-Inf, NaN, +-0, the
smallest and largest scales under all-0x00, all-0xFF and random payloads). The codebooks are read
back from ggml itself: a block whose groups pick grid rows one by one, under a unit scale and plus
signs, dequantizes to exactly those rows.
"""

from __future__ import annotations

import functools
import zlib

import gguf
import jax
import numpy as np
import pytest

import dq3jax
from dq3jax.quant import iq_dequant, iq_grids
from tests.quant.compare import float_bits_report

pytestmark = pytest.mark.crosscheck

KERNELS = {
  "IQ2_XXS": iq_dequant.iq2_xxs,
  "IQ2_XS": iq_dequant.iq2_xs,
  "IQ2_S": iq_dequant.iq2_s,
  "IQ3_XXS": iq_dequant.iq3_xxs,
  "IQ3_S": iq_dequant.iq3_s,
  "IQ1_S": iq_dequant.iq1_s,
  "IQ1_M": iq_dequant.iq1_m,
}
TYPES = list(KERNELS)
N_RANDOM = 4096
Z = np.int32(0)


@functools.cache
def _jitted(name):
  return jax.jit(KERNELS[name])


def _ours(name: str, blocks: np.ndarray) -> np.ndarray:
  return np.asarray(_jitted(name)(blocks, Z)).reshape(-1)


def _ggml(name: str, blocks: np.ndarray) -> np.ndarray:
  from reference import ggml_ref  # noqa: PLC0415  (needs the `reference` extra)

  q = dq3jax.qtype_of(name)
  return ggml_ref.dequantize(blocks.reshape(-1), q.id, blocks.shape[0] * q.block_elems)


def _gguf_py(name: str, blocks: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", over="ignore"):
    return gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType[name]).reshape(-1)


# ---------------------------------------------------------------------------- the fp16 scale field
# IQ1_M has no whole fp16 field: its d is the top nibbles of the four 16-bit scale words (bytes 48..55).


def _set_scale(name: str, blocks: np.ndarray, bits: np.ndarray) -> None:
  bits = np.asarray(bits, np.uint32)
  if name == "IQ1_M":
    for k in range(4):
      hi = 49 + 2 * k  # the high byte of word k holds nibble k of d in its top four bits
      blocks[:, hi] = (blocks[:, hi] & 0x0F) | (((bits >> (4 * k)) & 0xF) << 4).astype(np.uint8)
  else:
    blocks[:, 0] = (bits & 0xFF).astype(np.uint8)
    blocks[:, 1] = (bits >> 8).astype(np.uint8)


def _seed(*parts: str) -> int:
  return zlib.crc32("/".join(parts).encode())


def _random_blocks(name: str, n: int) -> np.ndarray:
  q = dq3jax.qtype_of(name)
  rng = np.random.default_rng(_seed("iq-random", name))
  blocks = rng.integers(0, 256, size=(n, q.block_bytes), dtype=np.uint8)
  finite = rng.integers(0, 0x7C00, size=n) | (rng.integers(0, 2, size=n) << 15)  # any finite fp16
  _set_scale(name, blocks, finite)
  return blocks


EDGE_SCALES = {
  "+inf": 0x7C00,
  "-inf": 0xFC00,
  "nan": 0x7E01,
  "-snan": 0xFD55,
  "+0": 0x0000,
  "-0": 0x8000,
  "min-subnormal": 0x0001,
  "-max-subnormal": 0x83FF,
  "max": 0x7BFF,
  "-max": 0xFBFF,
}


def _edge_blocks(name: str) -> np.ndarray:
  q = dq3jax.qtype_of(name)
  rng = np.random.default_rng(_seed("iq-edge", name))
  payloads = [np.zeros(q.block_bytes, np.uint8), np.full(q.block_bytes, 0xFF, np.uint8)]
  payloads += [rng.integers(0, 256, q.block_bytes, dtype=np.uint8) for _ in range(2)]
  out = [np.stack(payloads[:2])]  # as they are: all 0x00 (d = +0), all 0xFF (d = NaN)
  for bits in EDGE_SCALES.values():
    b = np.stack(payloads)
    _set_scale(name, b, np.full(len(payloads), bits))
    out.append(b)
  return np.concatenate(out)


def _nan_sign_cleared(v: np.ndarray) -> np.ndarray:
  bits = np.ascontiguousarray(v, np.float32).view(np.uint32).copy()
  bits[np.isnan(v)] &= 0x7FFFFFFF
  return bits.view(np.float32)


def _check(name: str, blocks: np.ndarray, what: str) -> None:
  ours = _ours(name, blocks)
  msg = float_bits_report(ours, _ggml(name, blocks), 256, f"{name} {what} vs ggml")
  assert msg is None, msg
  # gguf-py negates by a numpy multiply by -1, which keeps a NaN's sign where ggml's compiled C flips it
  # (test_nan_sign_under_a_minus_sign): everything else, NaN payloads included, must agree bit for bit.
  theirs = _gguf_py(name, blocks)
  msg = float_bits_report(
    _nan_sign_cleared(ours), _nan_sign_cleared(theirs), 256, f"{name} {what} vs gguf-py"
  )
  assert msg is None, msg


@pytest.mark.parametrize("name", TYPES)
def test_random_blocks_match_ggml_and_gguf_py(name):
  blocks = _random_blocks(name, N_RANDOM)
  assert np.isfinite(_ours(name, blocks)).all()  # the scales were made finite
  _check(name, blocks, "random blocks")


@pytest.mark.parametrize("name", TYPES)
def test_edge_blocks_match_ggml_and_gguf_py(name):
  blocks = _edge_blocks(name)
  y = _ours(name, blocks)
  assert np.isnan(y).any() and np.isinf(y).any()  # the non-finite scales did reach the output
  _check(name, blocks, "edge blocks")


def test_nan_sign_under_a_minus_sign():
  # IQ2_XXS with a NaN scale, sign field 1 (ksigns 0b10000001: elements 0 and 7 negated): ggml flips the
  # sign bit of those NaNs (mulss, then xorps), a multiply by -1 (gguf-py) keeps it. We follow ggml.
  b = np.zeros((1, 66), np.uint8)
  b[0, 0:2] = _u16_bytes([0x7E01])
  b[0, 6:10] = np.asarray([1], "<u4").view(np.uint8)
  flipped = np.zeros(256, bool)
  flipped[[0, 7]] = True
  for y in (_ggml("IQ2_XXS", b), _ours("IQ2_XXS", b)):
    assert np.isnan(y).all()
    assert np.array_equal(np.signbit(y), flipped)
    assert len(set(y.view(np.uint32) & 0x7FFFFFFF)) == 1  # one payload: the scale's
  assert not np.signbit(_gguf_py("IQ2_XXS", b)).any()


@pytest.mark.parametrize("name", TYPES)
def test_kernel_is_vectorised_over_blocks(name):
  # Each block is dequantized on its own: a block's floats do not depend on its neighbours or the count.
  blocks = _random_blocks(name, 64)
  whole = _ours(name, blocks).reshape(64, 256)
  for i in (0, 17, 63):
    assert np.array_equal(_ours(name, blocks[i : i + 1]).view(np.uint32), whole[i].view(np.uint32))


# ---------------------------------------------------------------------------- the codebooks


GRIDS = {
  "IQ2_XXS": iq_grids.IQ2XXS_GRID,
  "IQ2_XS": iq_grids.IQ2XS_GRID,
  "IQ2_S": iq_grids.IQ2S_GRID,
  "IQ3_XXS": iq_grids.IQ3XXS_GRID,
  "IQ3_S": iq_grids.IQ3S_GRID,
  "IQ1_S": iq_grids.IQ1S_GRID,
}
GRID_SHAPES = {
  "IQ2_XXS": (256, 8),
  "IQ2_XS": (512, 8),
  "IQ2_S": (1024, 8),
  "IQ3_XXS": (256, 4),
  "IQ3_S": (512, 4),
  "IQ1_S": (2048, 8),
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_grid_equals_gguf_py_decoding(name):
  cls = getattr(gguf.quants, name)
  cls.init_grid()
  theirs = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)
  ours = GRIDS[name]
  assert ours.shape == GRID_SHAPES[name] == theirs.shape
  assert ours.dtype == (np.int8 if name == "IQ1_S" else np.uint8)
  assert np.array_equal(ours.astype(np.float32), theirs)


def test_sign_tables_and_delta_equal_gguf_py():
  assert np.array_equal(iq_grids.KSIGNS_IQ2XS, np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8))
  assert np.array_equal(iq_grids.KMASK_IQ2XS, [1, 2, 4, 8, 16, 32, 64, 128])
  assert iq_grids.IQ1S_DELTA == gguf.quants.IQ1_S.delta == gguf.quants.IQ1_M.delta
  # Even parity: every stored sign byte has an even number of minus signs.
  assert all(bin(int(s)).count("1") % 2 == 0 for s in iq_grids.KSIGNS_IQ2XS)


# One-hot blocks: each group of 8 picks grid row r; the scale bits below make the group's factor exactly
# 1 and every sign plus, so ggml's output for the group is row r itself (IQ1_S: row r + 1/8).
F16_ONE, F16_FOUR, F16_EIGHT = 0x3C00, 0x4400, 0x4800


def _u16_bytes(words) -> np.ndarray:
  return np.asarray(words, np.uint16).astype("<u2").view(np.uint8)


def _pick_rows_block(name: str, rows: np.ndarray) -> np.ndarray:
  """One block of `name` whose index fields select `rows` in order (32 rows, or 64 for the IQ3 grids)."""
  q = dq3jax.qtype_of(name)
  b = np.zeros(q.block_bytes, np.uint8)
  rows = np.asarray(rows, np.int64)
  if name == "IQ2_XXS":  # d * 0.5 * 0.25 = 1; per 32 values: four index bytes, then the sign/scale word (0)
    b[0:2] = _u16_bytes([F16_EIGHT])
    for ib in range(8):
      b[2 + 8 * ib : 6 + 8 * ib] = rows[4 * ib : 4 * ib + 4]
  elif name == "IQ2_XS":  # 9-bit index in each word, sign bits 0, scale nibbles 0
    b[0:2] = _u16_bytes([F16_EIGHT])
    b[2:66] = _u16_bytes(rows)
  elif name == "IQ2_S":  # low index bytes, then bits 8-9 two per group in qh
    b[0:2] = _u16_bytes([F16_EIGHT])
    b[2:34] = rows & 0xFF
    hi = (rows >> 8).reshape(8, 4)
    b[66:74] = (hi << (2 * np.arange(4))).sum(axis=1)
  elif name == "IQ3_XXS":  # d * 0.5 * 0.5 = 1; 64 index bytes; sign/scale words 0
    b[0:2] = _u16_bytes([F16_FOUR])
    b[2:66] = rows
  elif name == "IQ3_S":  # d * (1 + 0) = 1; low index bytes, ninth bits one per index in qh
    b[0:2] = _u16_bytes([F16_ONE])
    b[2:66] = rows & 0xFF
    hi = (rows >> 8).reshape(8, 8)
    b[66:74] = (hi << np.arange(8)).sum(axis=1)
  elif name == "IQ1_S":  # d * (2*0 + 1) = 1, delta +1/8; three high index bits per group in qh
    b[0:2] = _u16_bytes([F16_ONE])
    b[2:34] = rows & 0xFF
    hi = (rows >> 8).reshape(8, 4)
    b[34:50] = _u16_bytes((hi << (3 * np.arange(4))).sum(axis=1))
  else:
    raise AssertionError(name)
  return b


@pytest.mark.parametrize("name", list(GRIDS))
def test_grid_rows_read_back_from_ggml(name):
  n_rows, cols = GRID_SHAPES[name]
  per_block = 256 // cols
  blocks = np.stack(
    [_pick_rows_block(name, np.arange(s, s + per_block)) for s in range(0, n_rows, per_block)]
  )
  y = _ggml(name, blocks).reshape(n_rows, cols)
  rows = y - iq_grids.IQ1S_DELTA if name == "IQ1_S" else y  # exact: IQ1_S values are -7/8, 1/8, 9/8
  bad = np.flatnonzero((rows != GRIDS[name]).any(axis=1))
  assert bad.size == 0, f"{name}: {bad.size} grid rows differ from ggml's, first {bad[0]}"
  # Our kernel's index unpacking picks the same rows from the same bytes.
  msg = float_bits_report(_ours(name, blocks), y, 256, f"{name} one-hot blocks vs ggml")
  assert msg is None, msg


def test_sign_table_and_delta_read_back_from_ggml():
  # IQ2_XXS, grid row 0 (all 8s), unit scale: group outputs are 8 * (+-1), signs from 7-bit field s.
  blocks = np.zeros((4, 66), np.uint8)
  blocks[:, 0:2] = _u16_bytes([F16_EIGHT])
  for i, s in enumerate(range(0, 128, 4)):  # four 7-bit sign fields per word, eight words per block
    word = sum(t << (7 * k) for k, t in enumerate(range(s, s + 4)))
    blk, ib = divmod(i, 8)
    blocks[blk, 6 + 8 * ib : 10 + 8 * ib] = np.asarray([word], "<u4").view(np.uint8)
  y = _ggml("IQ2_XXS", blocks).reshape(128, 8)
  assert set(np.abs(y).ravel().tolist()) == {8.0}
  assert np.array_equal(((y < 0) << np.arange(8)).sum(axis=1), iq_grids.KSIGNS_IQ2XS)
  # IQ1_S: a grid value 0 dequantizes to the delta itself, +1/8, or -1/8 under the top bit of qh.
  r, j = (int(v[0]) for v in np.nonzero(iq_grids.IQ1S_GRID == 0))
  b = np.stack([_pick_rows_block("IQ1_S", np.full(32, r))] * 2)
  b[1, 35:50:2] |= 0x80  # the high byte of each qh word
  y = _ggml("IQ1_S", b).reshape(2, 32, 8)
  assert y[0, 0, j] == iq_grids.IQ1S_DELTA and y[1, 0, j] == -iq_grids.IQ1S_DELTA
