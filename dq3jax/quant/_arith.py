"""Float32 arithmetic that reproduces ggml's reference C exactly, whatever XLA does.

ggml's quantizers run as plain IEEE binary32 code: one rounding per operation (no FMA on the
x86-64 baseline), sequential sums, and gradual underflow (subnormals kept). XLA breaks two of
these on its own:

* it contracts `a*b + c` into a fused multiply-add (CPU and GPU), which rounds once instead of
  twice; casts, `optimization_barrier` and `reduce_precision` do not stop it;
* on CPU it runs with the processor's flush-to-zero / denormals-are-zero modes, so a subnormal
  input reads as 0 and a subnormal result becomes 0.

The kernels are therefore written once against an `Arith` object and run in two arithmetics:

`FastArith` (float32): every product passes through an integer OR with a zero the compiler
cannot see (a runtime argument), so no product can be fused into a following add. Underflow is
watched at products and quotients only: each records, per block, whether its result is below
SAFE_MAGNITUDE (2**-102) in magnitude (a flushed result reads as 0) while the exact result is not
zero. Why adds need no check: if every product, quotient and input is 0 or at least 2**-102 in
magnitude, all of them are multiples of 2**-125, sums and differences of multiples of 2**-125
stay multiples of 2**-125 (exactly representable below 2**-102), so no add or subtract can
produce a subnormal; and sqrt only grows small values. A block with no event (and no input
below 2**-102, which the driver screens) therefore ran with normal numbers only, where FTZ/DAZ
change nothing, and its bytes are C's.

Where a check cannot fire, a kernel may skip it (`mul_unchecked`, `nearest_int_of_product`), stating
the proof at the call site: a value already screened or checked (0 or at least SAFE_MAGNITUDE) times an
integer code (0 or at least 1 in magnitude) is 0 or at least that value; a product that only feeds
nearest_int yields code 0 whether or not it flushed. In the searches' inner loops the checks cost more
than the arithmetic, so this is where most of the fast path's speed comes from.

`ExactArith` (float64 holding float32 values): each op is done in float64 and rounded to
float32 precision by hand (hardware conversion in the normal range, a fixed-quantum rounding in
the subnormal range), so subnormals are exact and FTZ never triggers. Products of two float32
values are exact in float64, so a fused multiply-add there gives the same answer as an unfused
one; and +, -, *, /, sqrt evaluated in binary64 then rounded to binary32 are correctly rounded
(53 >= 2*24 + 2). Blocks flagged by the fast run are recomputed here.

All arrays inside the kernels keep the block axis last (`[..., nb]`) so that flags reduce to
one boolean per block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32_MIN_NORMAL = np.float32(2.0**-126)
SAFE_MAGNITUDE = np.float32(2.0**-102)  # see FastArith: values at least this large are multiples of 2**-125
MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: ggml's nearest_int adds this and reads the bits
GROUP_MAX_EPS = np.float32(1e-15)


def _opaque_divisor(a, b, z, int_type):
  """Broadcasts a and b to one shape and makes b an elementwise value XLA cannot see through.

  XLA rewrites `A / broadcast(B)` as `A * broadcast(1/B)` (two roundings, not one). A divisor
  built as `bits(b) | (bits(a) & z)` is b at run time but depends on every element of a, so it
  is no broadcast and the division stays a true division.
  """
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
  float_type = a.dtype
  tie = lax.bitcast_convert_type(a, int_type) & z.astype(int_type)
  b = lax.bitcast_convert_type(lax.bitcast_convert_type(b, int_type) | tie, float_type)
  return a, b


def _block_any(cond: jax.Array, nb: int) -> jax.Array:
  cond = jnp.broadcast_to(cond, jnp.broadcast_shapes(cond.shape, (nb,)))
  return cond.reshape(-1, nb).any(axis=0)


class FastArith:
  """float32 arithmetic with contraction barriers and per-block underflow flags."""

  dtype = jnp.float32

  def __init__(self, z: jax.Array, nb: int, flag: jax.Array | None = None):
    self.z = z  # int32 scalar, 0 at run time, unknown at compile time
    self.nb = nb
    self._flag = jnp.zeros((nb,), jnp.bool_) if flag is None else flag
    # Underflow events are OR-ed elementwise per result shape and reduced to [nb] only when the
    # flag is read: a reduction after every op would split XLA's fusions into thousands of kernels.
    self._pending: dict[tuple[int, ...], jax.Array] = {}

  @property
  def flag(self) -> jax.Array:
    for cond in self._pending.values():
      # Into memory first: fused with the kernel's outputs, the per-block reduction imposed its loop
      # order on them (Q3_K ran 10x slower; see materialize).
      self._flag = self._flag | _block_any(materialize(self.z, cond), self.nb)
    self._pending = {}
    return self._flag

  @flag.setter
  def flag(self, value: jax.Array) -> None:
    self._pending = {}
    self._flag = value

  def fork(self, flag: jax.Array) -> FastArith:
    return FastArith(self.z, self.nb, flag)

  def _note(self, cond: jax.Array) -> None:
    shape = tuple(cond.shape)
    prev = self._pending.get(shape)
    self._pending[shape] = cond if prev is None else prev | cond

  def hide(self, v: jax.Array) -> jax.Array:
    # OR, not XOR: XLA folds xor(xor(a, z), z) back to a, which would let a twice-hidden product
    # fuse again; an OR with the same z is idempotent, so at worst two barriers become one.
    return lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.int32) | self.z, jnp.float32)

  def zero(self) -> jax.Array:
    # A +0.0 the compiler cannot fold `0 + t` with (that would turn -0 into -0, not +0).
    return lax.bitcast_convert_type(self.z, jnp.float32)

  def c(self, v) -> jax.Array:
    return jnp.asarray(np.float32(v), jnp.float32)

  def from_int(self, i: jax.Array) -> jax.Array:
    return i.astype(jnp.float32)

  def from_f32_bits(self, bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)

  def to_f32_bits(self, v: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(v, jnp.uint32)

  def mul(self, a, b):
    r = a * b
    self._note(self.product_underflow(r, a, b))
    return self.hide(r)

  def mul_unchecked(self, a, b):
    """a*b where the caller has proved a nonzero result cannot fall below SAFE_MAGNITUDE.

    Each call site states its proof (typically: `a` was screened or checked, and `b` is an
    integer code, so |a*b| >= |a|). The check costs more than the product in the searches' inner
    loops, which is why it is skipped where it is provably dead.
    """
    return self.hide(a * b)

  def screen(self, v):
    """Flags blocks holding a nonzero |v| below SAFE_MAGNITUDE; afterwards v is 0 or safe."""
    self._note((jnp.abs(v) < SAFE_MAGNITUDE) & (v != 0))
    return v

  def product_underflow(self, r, a, b):
    """Where r = a*b (or a*f(b), f keeping zero and nonzero apart) is below SAFE_MAGNITUDE with a
    and b nonzero: the event `mul` notes, for a product formed unchecked. Pass it to `note`."""
    return (jnp.abs(r) < SAFE_MAGNITUDE) & (a != 0) & (b != 0)

  def note(self, events: jax.Array) -> None:
    """Flags the blocks of any True element of `events` (block axis last)."""
    self._note(events)

  def scratch(self) -> FastArith:
    """A fresh arithmetic for a loop body: collect its events with take_events, carry them."""
    return FastArith(self.z, self.nb, jnp.zeros((self.nb,), jnp.bool_))

  def take_events(self, shape) -> jax.Array:
    """The OR of the events noted so far, as one bool array of `shape` (each event's shape must
    broadcast to it); they are cleared here. Carried through a loop, they are reduced to blocks
    once at its end instead of at every step."""
    out = jnp.zeros(shape, jnp.bool_)
    for cond in self._pending.values():
      out = out | jnp.broadcast_to(cond, shape)
    self._pending = {}
    return out

  def nearest_int_of_product(self, a, b):
    """nearest_int(a*b), needing no underflow check: any |a*b| < 0.5 gives code 0 in C (the
    subnormal vanishes in the + 1.5*2**23) and gives 0 here when flushed, so FTZ cannot matter."""
    return self.nearest_int(a * b)

  def add(self, a, b):
    return a + b  # cannot underflow given the product/quotient/input checks (module docstring)

  def sub(self, a, b):
    return a - b

  def div(self, a, b):
    a, b = _opaque_divisor(a, b, self.z, jnp.int32)
    r = a / b
    self._note((jnp.abs(r) < SAFE_MAGNITUDE) & (a != 0) & jnp.isfinite(b))
    return r

  def sqrt(self, a):
    return jnp.sqrt(a)  # never underflows for a normal or zero input

  def nearest_int(self, v):
    """ggml's nearest_int: add 1.5*2^23 in float32, read the low 23 bits."""
    s = self.hide(v) + MAGIC
    bits = lax.bitcast_convert_type(s, jnp.int32)
    return (bits & 0x7FFFFF) - 0x400000


_TINY_QUANTUM_ADD = np.float64(1.5 * 2.0**-97)  # float64 ulp here is 2**-149: f32's subnormal quantum


class ExactArith:
  """float32 semantics emulated in float64 (subnormal-exact, FMA-immune). Needs x64 enabled."""

  dtype = jnp.float64

  def __init__(self, z: jax.Array, nb: int, flag: jax.Array | None = None):
    self.z = z
    self.nb = nb
    self.flag = jnp.zeros((nb,), jnp.bool_) if flag is None else flag

  def fork(self, flag: jax.Array) -> ExactArith:
    return ExactArith(self.z, self.nb, flag)

  def round32(self, v: jax.Array) -> jax.Array:
    """Rounds float64 `v` to the nearest float32 value (ties to even), subnormals included."""
    hw = v.astype(jnp.float32).astype(jnp.float64)  # exact RNE in the normal range, overflow -> inf
    # RNE to a multiple of 2**-149. XLA's simplifier rewrites (v + K) - K to v, so the sum is
    # hidden behind an integer XOR with the runtime zero before K is taken off again.
    t = lax.bitcast_convert_type(
      lax.bitcast_convert_type(v + _TINY_QUANTUM_ADD, jnp.int64) | self.z.astype(jnp.int64), jnp.float64
    )
    sw = jnp.copysign(t - _TINY_QUANTUM_ADD, v)
    return jnp.where(jnp.abs(v) < np.float64(F32_MIN_NORMAL), sw, hw)

  def zero(self):
    return lax.bitcast_convert_type(self.z, jnp.float32).astype(jnp.float64)

  def c(self, v):
    return jnp.asarray(np.float64(np.float32(v)), jnp.float64)

  def from_int(self, i):
    return i.astype(jnp.float64)

  def from_f32_bits(self, bits):
    bits = bits.astype(jnp.uint32)
    sign = jnp.where((bits >> 31) != 0, -1.0, 1.0)
    expo = (bits >> 23) & 0xFF
    mant = (bits & 0x7FFFFF).astype(jnp.float64)
    sub = sign * mant * np.float64(2.0**-149)  # exact: subnormals (and +-0)
    normal = lax.bitcast_convert_type(bits, jnp.float32).astype(jnp.float64)
    return jnp.where(expo == 0, sub, normal)

  def to_f32_bits(self, v):
    normal = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
    tiny_mag = jnp.round(jnp.abs(v) * np.float64(2.0**149)).astype(jnp.uint32)  # exact multiple
    sign = jnp.where(jnp.signbit(v), jnp.uint32(0x80000000), jnp.uint32(0))
    return jnp.where(jnp.abs(v) < np.float64(F32_MIN_NORMAL), sign | tiny_mag, normal)

  def mul(self, a, b):
    return self.round32(a * b)

  def mul_unchecked(self, a, b):
    return self.mul(a, b)

  def screen(self, v):
    return v

  def product_underflow(self, r, a, b):
    return jnp.zeros(jnp.shape(r), jnp.bool_)

  def note(self, events):
    pass

  def scratch(self) -> ExactArith:
    return ExactArith(self.z, self.nb, self.flag)

  def take_events(self, shape):
    return jnp.zeros(shape, jnp.bool_)

  def nearest_int_of_product(self, a, b):
    return self.nearest_int(self.mul(a, b))

  def add(self, a, b):
    return self.round32(a + b)

  def sub(self, a, b):
    return self.round32(a - b)

  def div(self, a, b):
    a, b = _opaque_divisor(a, b, self.z, jnp.int64)
    return self.round32(a / b)

  def sqrt(self, a):
    return self.round32(jnp.sqrt(a))

  def nearest_int(self, v):
    s = self.round32(v + np.float64(MAGIC))
    bits = lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
    return (bits & 0x7FFFFF) - 0x400000


Arith = FastArith | ExactArith


def materialize(z: jax.Array, tree):
  """`tree`, computed into memory before any consumer runs (z: the runtime zero).

  XLA fuses a producer into each of its consumers. When the consumers are the byte packing (each
  output byte reads two to eight codes at scattered offsets), the code computation is re-run
  per byte inside one concatenating loop that does not vectorise: Q6_K ran 4x slower for it.
  `optimization_barrier` does not stop this (XLA:CPU drops it before fusion); a loop whose trip
  count (1 + z) is unknown at compile time does, and its body (an OR with zero) costs one pass.
  """

  def keep(v):
    if v.dtype == jnp.bool_:
      return v | (z != 0)
    if jnp.issubdtype(v.dtype, jnp.floating):
      int_type = jnp.int64 if v.dtype == jnp.float64 else jnp.int32
      return lax.bitcast_convert_type(lax.bitcast_convert_type(v, int_type) | z.astype(int_type), v.dtype)
    return v | z.astype(v.dtype)

  return lax.fori_loop(0, 1 + z, lambda _, t: jax.tree.map(keep, t), tree)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels, written against either arithmetic.


def seqsum(A: Arith, terms: jax.Array, axis: int, *, from_zero: bool = True):
  """Sum along `axis` strictly left to right, as a C `for` loop does.

  from_zero=True mirrors `float s = 0; s += t0; ...` (so an all -0 sum is +0);
  False mirrors `float s = t0; s += t1; ...`.
  """
  return seqsums(A, [terms], axis, from_zero=from_zero)[0]


_UNROLL_BELOW = 5  # shorter sums are unrolled; a loop step costs more than a few adds


def seqsums(A: Arith, terms: list[jax.Array], axis: int, *, from_zero: bool = True) -> list[jax.Array]:
  """Several sequential sums over the same axis, in one pass (see seqsum).

  The terms are computed by the caller as whole arrays (so XLA vectorises them across groups,
  elements and blocks); only the additions, which C orders, run as a `lax.scan` over `axis`. The
  unrolled alternative (one add per element, chained) made XLA duplicate and re-fuse the terms
  into every consumer: slower to run and far slower to compile.
  """
  n = terms[0].shape[axis]
  moved = [jnp.moveaxis(t, axis, 0) for t in terms]  # [n, ...]
  first = [t[0] for t in moved]
  s = [A.add(A.zero(), f) for f in first] if from_zero else first
  if n < _UNROLL_BELOW:
    for i in range(1, n):
      s = [A.add(si, t[i]) for si, t in zip(s, moved, strict=True)]
    return s

  def step(carry, ts):
    return [A.add(c, t) for c, t in zip(carry, ts, strict=True)], None

  s, _ = lax.scan(step, s, [t[1:] for t in moved])
  return s


_SELECT_CHAIN_MAX = 64  # longer axes go by groups of 16 (a 256-long chain ran slower than argmax)


def first_absmax(x: jax.Array, axis: int):
  """(amax, the signed element attaining it first) — C's `if (ax > amax) {amax = ax; max = x;}`.

  Both start at +0 and a NaN never compares greater, so NaN entries (which only arise from
  float32 overflow inside the searches) are skipped. Comparisons are exact in either
  arithmetic, so a reduction is faithful: the first index attaining the maximum magnitude is
  what the strict `>` scan keeps. It is found by a select chain from the last element to the
  first (an argmax and gather ran 6x slower than the max itself on the CPU).
  """
  ax = jnp.abs(x)
  ax = jnp.where(jnp.isnan(ax), jnp.zeros_like(ax), ax)
  n = x.shape[axis]
  if n > _SELECT_CHAIN_MAX and n % 16 == 0:
    # Two levels: the first group whose own maximum is the maximum, and its first element attaining it.
    shape = x.shape[:axis] + (n // 16, 16) + x.shape[axis + 1 :]
    group_amax, group_mx = first_absmax(x.reshape(shape), axis + 1)
    amax = jnp.max(group_amax, axis=axis)
    mx = jnp.zeros_like(amax)
    for g in reversed(range(n // 16)):
      at = lax.index_in_dim(group_amax, g, axis, keepdims=False) == amax
      mx = jnp.where(at, lax.index_in_dim(group_mx, g, axis, keepdims=False), mx)
    return amax, jnp.where(amax > 0, mx, jnp.zeros_like(mx))
  amax = jnp.max(ax, axis=axis)
  if n > _SELECT_CHAIN_MAX:
    idx = jnp.argmax(ax, axis=axis)
    mx = jnp.take_along_axis(x, jnp.expand_dims(idx, axis), axis=axis).squeeze(axis)
  else:
    mx = jnp.zeros_like(amax)
    for i in reversed(range(x.shape[axis])):
      at = lax.index_in_dim(ax, i, axis, keepdims=False) == amax
      mx = jnp.where(at, lax.index_in_dim(x, i, axis, keepdims=False), mx)
  return amax, jnp.where(amax > 0, mx, jnp.zeros_like(mx))


def positive_max(x: jax.Array, axis: int):
  """C's `m = 0; if (v > m) m = v;` over an axis (NaN never greater; result >= +0)."""
  m = jnp.max(jnp.where(jnp.isnan(x), jnp.zeros_like(x), x), axis=axis)
  return jnp.maximum(m, jnp.zeros_like(m))


def c_max_scan(x: jax.Array, axis: int):
  """C's `m = 0; m = MAX(m, v)` with MAX(a, b) = a > b ? a : b, in order (NaN semantics kept)."""
  m = jnp.zeros_like(lax.index_in_dim(x, 0, axis, keepdims=False))
  for i in range(x.shape[axis]):
    v = lax.index_in_dim(x, i, axis, keepdims=False)
    m = jnp.where(m > v, m, v)
  return m


def scan_min_max(x: jax.Array, axis: int, init_min=None, init_max=None):
  """min/max with C's strict `<`/`>` scan from the first element (or given initial values).

  Sequential, so the sign of a zero extremum matches C exactly (+0 seen before -0 stays +0).
  """
  n = x.shape[axis]
  if init_min is None:
    mn = mx = lax.index_in_dim(x, 0, axis, keepdims=False)
    start = 1
  else:
    mn, mx, start = init_min, init_max, 0
  for i in range(start, n):
    v = lax.index_in_dim(x, i, axis, keepdims=False)
    mn = jnp.where(v < mn, v, mn)
    mx = jnp.where(v > mx, v, mx)
  return mn, mx


def clamp(v, lo, hi):
  """ggml's MAX(lo, MIN(hi, v)) on integers."""
  return jnp.maximum(lo, jnp.minimum(hi, v))


def wrap_u8(v):
  return v & 0xFF


def to_u8(v):
  """Integer codes as the uint8 bytes C stores (wrapping as a C `uint8_t` assignment does)."""
  return wrap_u8(v).astype(jnp.uint8)


def wrap_i8(v):
  return ((v + 128) & 0xFF) - 128


def c_float_to_int32(v: jax.Array) -> jax.Array:
  """C float->int truncation as x86-64 executes it: NaN and out-of-range give INT_MIN."""
  bad = jnp.isnan(v) | (v >= np.float32(2.0**31)) | (v < np.float32(-(2.0**31)))
  t = jnp.where(bad, jnp.zeros_like(v), jnp.trunc(v)).astype(jnp.int32)
  return jnp.where(bad, jnp.int32(-(2**31)), t)


# ---------------------------------------------------------------------------------------------
# IEEE half precision by integer arithmetic: identical on every backend, no FTZ anywhere.


def f32_bits_to_f16_bits(bits: jax.Array) -> jax.Array:
  """ggml's fp32->fp16 (round to nearest even, overflow to inf, NaN -> sign|0x7E00)."""
  bits = bits.astype(jnp.uint32)
  sign = (bits >> 16) & 0x8000
  mag = bits & 0x7FFFFFFF
  # Normal half range: rebias the exponent (127 -> 15) and round the 13 dropped bits to even.
  reb = mag - jnp.uint32(112 << 23)
  normal = (reb + 0xFFF + ((reb >> 13) & 1)) >> 13
  # Subnormal half range (|v| < 2^-14): value in units of 2^-24, rounded to even.
  expo = (mag >> 23).astype(jnp.int32)
  mant = (mag & 0x7FFFFF) | 0x800000
  shift = jnp.clip(126 - expo, 0, 31).astype(jnp.uint32)  # >= 14 in this branch
  q = mant >> shift
  rem = mant & ((jnp.uint32(1) << shift) - 1)
  half = jnp.uint32(1) << (shift - 1)
  sub = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).astype(jnp.uint32)
  sub = jnp.where(shift >= 25, jnp.uint32(0), sub)
  h = jnp.where(mag < 0x38800000, sub, normal)
  h = jnp.where(mag >= 0x477FF000, jnp.uint32(0x7C00), h)  # rounds past 65504 -> inf
  h = jnp.where(mag > 0x7F800000, jnp.uint32(0x7E00), h)  # NaN
  return (sign | h).astype(jnp.uint16)


def f16_bits_to_f32_bits(h: jax.Array) -> jax.Array:
  h = h.astype(jnp.uint32)
  sign = (h & 0x8000) << 16
  expo = (h >> 10) & 0x1F
  mant = h & 0x3FF
  normal = ((expo + 112) << 23) | (mant << 13)
  # A NaN comes out quiet (bit 22 set), as the hardware conversion ggml uses does it.
  inf_nan = jnp.uint32(0x7F800000) | (mant << 13) | jnp.where(mant != 0, jnp.uint32(0x400000), jnp.uint32(0))
  # Subnormal half: mant * 2^-24, renormalised by the position of its leading bit.
  lead = 31 - lax.clz(jnp.maximum(mant, 1))  # 0..9
  sub = ((lead + 103).astype(jnp.uint32) << 23) | ((mant << (23 - lead).astype(jnp.uint32)) & 0x7FFFFF)
  sub = jnp.where(mant == 0, jnp.uint32(0), sub)
  out = jnp.where(expo == 0, sub, jnp.where(expo == 31, inf_nan, normal))
  return sign | out


def fp16_round(A: Arith, v):
  """(fp16 bits, the float32 value they decode to) of `v`: C's fp16(v) and f32(fp16(v))."""
  h = f32_bits_to_f16_bits(A.to_f32_bits(v))
  return h, A.from_f32_bits(f16_bits_to_f32_bits(h))


def f16_value(h: jax.Array) -> jax.Array:
  """fp16 bits (any unsigned integer array) -> their float32 value, by integer operations only."""
  return lax.bitcast_convert_type(f16_bits_to_f32_bits(h), jnp.float32)


def u16_le(h: jax.Array) -> list[jax.Array]:
  h = h.astype(jnp.uint32)
  return [(h & 0xFF).astype(jnp.uint8), (h >> 8).astype(jnp.uint8)]
