"""The numerics hazards of XLA that the kernels are built around, and proof that they are avoided.

Each hazard test first shows the hazard is real on this machine (so the guard test cannot pass
vacuously), then shows dq3jax's primitive gives IEEE float32 results bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dq3jax.quant import _arith
from dq3jax.quant._arith import ExactArith, FastArith

Z = np.int32(0)


def _has_fma() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      return " fma " in f.read()
  except OSError:
    return False


@pytest.fixture(scope="module")
def abc():
  rng = np.random.default_rng(0)
  return tuple(rng.standard_normal(1 << 18).astype(np.float32) for _ in range(3))


@pytest.mark.skipif(not _has_fma(), reason="the CPU has no FMA instruction, so XLA cannot contract")
def test_xla_contracts_multiply_add_and_mul_barrier_prevents_it(abc):
  a, b, c = abc
  separate = a * b + c  # numpy: two roundings
  fused = np.asarray(jax.jit(lambda a, b, c: a * b + c)(a, b, c))
  assert not np.array_equal(fused, separate), "expected XLA to fuse a*b+c on an FMA machine"
  guarded = np.asarray(jax.jit(lambda a, b, c, z: FastArith(z, 1).mul(a, b) + c)(a, b, c, Z))
  assert np.array_equal(guarded.view(np.uint32), separate.view(np.uint32))


def test_double_barrier_does_not_cancel(abc):
  # XOR-based barriers cancel (xor(xor(a, z), z) folds to a); the OR barrier must not.
  a, b, c = abc
  separate = a * b + c

  def f(a, b, c, z):
    A = FastArith(z, 1)
    return A.hide(A.mul(a, b)) + c

  assert np.array_equal(np.asarray(jax.jit(f)(a, b, c, Z)).view(np.uint32), separate.view(np.uint32))


def test_xla_rewrites_division_by_broadcast_and_div_keeps_it_true(abc):
  a, b, _ = abc
  x = a.reshape(-1, 64)
  d = b[: x.shape[0]].reshape(-1, 1)
  rewritten = np.asarray(jax.jit(lambda x, d: x / d)(x, d))
  assert not np.array_equal(rewritten, x / d), "expected XLA to turn x / broadcast(d) into x * (1/d)"
  ours = np.asarray(jax.jit(lambda x, d, z: FastArith(z, 64).div(x, d))(x, d, Z))
  assert np.array_equal(ours.view(np.uint32), (x / d).view(np.uint32))
  const = np.asarray(jax.jit(lambda x, z: FastArith(z, 64).div(x, np.float32(63)))(x, Z))
  assert np.array_equal(const.view(np.uint32), (x / np.float32(63)).view(np.uint32))


def test_cpu_flushes_subnormals_and_fast_arith_flags_it():
  tiny = np.array([1e-40, -3e-39, 1e-20, 2.0], np.float32)
  flushed = np.asarray(jax.jit(lambda v: v * np.float32(1.5))(tiny))
  if jax.default_backend() == "cpu":
    assert flushed[0] == 0.0, "expected XLA:CPU to flush subnormals (FTZ/DAZ)"

  # Normal inputs whose squares are subnormal (or below) come out as 0 and must be flagged.
  # (Subnormal *inputs* read as 0 even in comparisons, so the driver screens them on the host.)
  v = np.array([1e-20, -3e-30, 1e-19, 2.0], np.float32)

  def f(v, z):
    A = FastArith(z, 4)
    return A.mul(v, v), A.flag

  sq, flag = jax.jit(f)(v, Z)
  assert np.asarray(flag).tolist() == [True, True, True, False]
  assert np.asarray(sq)[3] == 4.0


def _exact(fn, *args):
  """Runs fn(A, *float32 args) in ExactArith and returns float32 results."""
  with jax.enable_x64(True):

    def g(z, *bits):
      A = ExactArith(z, 1)
      return A.to_f32_bits(fn(A, *[A.from_f32_bits(b) for b in bits]))

    out = jax.jit(g)(Z, *[np.ascontiguousarray(a, np.float32).view(np.uint32) for a in args])
  return np.asarray(out).view(np.float32)


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e-40])
def test_exact_arith_is_ieee_float32_including_subnormals(scale):
  rng = np.random.default_rng(1)
  a = (rng.standard_normal(1 << 16) * scale).astype(np.float32)
  b = (rng.standard_normal(1 << 16) * 0.7).astype(np.float32)
  c = (rng.standard_normal(1 << 16) * scale * 1e-3).astype(np.float32)
  with np.errstate(all="ignore"):
    cases = {
      "mul": (lambda A, a, b, c: A.mul(a, b), a * b),
      "mul_add": (lambda A, a, b, c: A.add(A.mul(a, b), c), a * b + c),
      "sub": (lambda A, a, b, c: A.sub(c, a), c - a),
      "div": (lambda A, a, b, c: A.div(a, b), a / b),
      "sqrt": (lambda A, a, b, c: A.sqrt(A.mul(a, a)), np.sqrt(a * a)),
    }
  for name, (fn, want) in cases.items():
    got = _exact(fn, a, b, c)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


def test_nearest_int_matches_ggml_trick_on_ties():
  v = np.array([-7.5, -6.5, -0.5, 0.5, 1.5, 2.5, -2.5, 3.4999998, 4194303.0, -4194303.0], np.float32)
  want = ((v + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000
  fast = np.asarray(jax.jit(lambda v, z: FastArith(z, v.shape[0]).nearest_int(v))(v, Z))
  assert np.array_equal(fast, want)
  with jax.enable_x64(True):
    exact = np.asarray(
      jax.jit(lambda v, z: ExactArith(z, 1).nearest_int(ExactArith(z, 1).from_f32_bits(v)))(
        v.view(np.uint32), Z
      )
    )
  assert np.array_equal(exact, want)


def test_seqsum_is_sequential():
  # Values chosen so that pairwise/tree summation differs from left-to-right summation.
  rng = np.random.default_rng(2)
  t = (rng.standard_normal((32, 4096)) * np.exp2(rng.integers(-20, 20, size=(32, 4096)))).astype(np.float32)
  want = np.zeros(4096, np.float32)
  for i in range(32):
    want = want + t[i]
  got = np.asarray(jax.jit(lambda t, z: _arith.seqsum(FastArith(z, 4096), t, axis=0))(t, Z))
  assert np.array_equal(got, want)
  assert not np.array_equal(np.asarray(jax.jit(lambda t: t.sum(0))(t)), want), "tree sum should differ here"


def test_fp16_conversion_matches_ieee_round_to_nearest_even():
  rng = np.random.default_rng(3)
  # Every float32 exponent with random mantissas, plus boundary patterns around the fp16 range.
  expo = np.arange(256, dtype=np.uint32)
  bits = (expo[:, None] << 23) | rng.integers(0, 1 << 23, size=(256, 4096), dtype=np.uint32)
  edges = np.array(
    [
      0x477FEFFF,
      0x477FF000,
      0x477FF001,
      0x387FC000,
      0x38800000,
      0x33000000,
      0x33000001,
      0x32FFFFFF,
      0x7F800000,
      0x00000001,
    ],
    np.uint32,
  )
  bits = np.concatenate([bits.ravel(), edges])
  bits = np.concatenate([bits, bits | 0x80000000])
  x = bits.view(np.float32)
  finite = ~np.isnan(x)
  got = np.asarray(jax.jit(_arith.f32_bits_to_f16_bits)(bits))
  assert np.array_equal(got[finite], x[finite].astype(np.float16).view(np.uint16))
  nan_bits = got[~finite]
  assert np.all((nan_bits & 0x7FFF) == 0x7E00)


def test_fp16_to_fp32_is_exact_for_all_patterns():
  h = np.arange(1 << 16, dtype=np.uint32)
  got = np.asarray(jax.jit(_arith.f16_bits_to_f32_bits)(h))
  want = h.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
  nan = np.isnan(h.astype(np.uint16).view(np.float16))
  assert np.array_equal(got[~nan], want[~nan])
  # NaNs keep sign and payload and come out quiet, as ggml's (hardware) conversion returns them.
  assert np.array_equal(got[nan], want[nan] | 0x400000)
