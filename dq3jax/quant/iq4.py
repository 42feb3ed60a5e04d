"""IQ4_NL and IQ4_XS block quantizers, bit-exact with ggml-quants.c (quantize_row_iq4_nl_impl).

Both code 32-element groups as 4-bit indices into one fixed non-linear table of int8 levels (KVALUES):

* IQ4_NL: a 32-element block is its own super-block; bytes fp16 d, then 16 bytes of nibbles.
* IQ4_XS: a 256-element super-block of 8 groups; bytes fp16 d, the groups' 6-bit scales (stored + 32) as
  uint16 scales_h (their top two bits, two per group) and 4 bytes scales_l (their low nibbles, two groups a
  byte), then 128 bytes of nibbles.

ggml_quantize_chunk runs the same search (ntry = 7) with and without an importance matrix; only the weights
differ: x*x without, qw * sqrt(sigma2 + x*x) with, sigma2 being 2/n times the super-block's sequential sum
of squares (n = 32 for IQ4_NL, 256 for IQ4_XS). Per group, 16 trial inverse scales (1/(max/127), then
(itry - 127)/max for itry = -7..7) each code every element by best_index and score sum(w*q*x) and
sum(w*q*q); the weighted least-squares scale of the best trial is the group's scale. The codes themselves
are always recomputed from the final (IQ4_XS: quantized) scale.

Kernels map `x [block_elems, nb]` (element-major, block axis last; see _arith.py) and optionally `qw` of the
same shape to `[block_bytes, nb]` uint8. Dequantization is in dequant.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from dq3jax.quant._arith import (
  GROUP_MAX_EPS,
  Arith,
  clamp,
  first_absmax,
  fp16_round,
  materialize,
  seqsum,
  to_u8,
  u16_le,
)

# ggml's kvalues_iq4nl: the 16 levels a 4-bit code stands for (times the group's scale), ascending.
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
GROUP = 32  # elements per scale (ggml's block_size argument)
NTRY = 7  # ggml_quantize_chunk's ntry for both types (quantize_row_iq4_nl_ref's -1 is not on that path)


def _best_index(A: Arith, v, *, with_index: bool):
  """ggml's best_index_int8 over KVALUES: (code 0..15 or None, its level as a float), elementwise.

  C clamps at both ends, binary-searches the bracketing levels lo <= v < hi and returns lo's index iff
  `v - lo < hi - v` in float32 (a tie goes to hi). The bracket comes from one pass of comparisons
  `v >= KVALUES[k]` (what the binary search's branches test); the float32 differences are formed
  exactly as in C, so rounding near a midpoint decides as C's does. v at or below the first level
  brackets as (KVALUES[0], KVALUES[1]) and picks 0, v at or above the last as (KVALUES[14], KVALUES[15])
  and picks 15, as C's clamps do. A NaN (from an infinite inverse scale times 0) fails every comparison
  in C's search, which ends at 15; it is set apart here because it would bracket at the bottom.
  """
  kv = [A.c(float(k)) for k in KVALUES]
  lo, hi = kv[0], kv[1]
  ml = jnp.zeros(jnp.shape(v), jnp.int32) if with_index else None
  for k in range(1, 15):
    above = v >= kv[k]
    lo = jnp.where(above, kv[k], lo)
    hi = jnp.where(above, kv[k + 1], hi)
    if with_index:
      ml = ml + above.astype(jnp.int32)
  take_lo = A.sub(v, lo) < A.sub(hi, v)
  nan = jnp.isnan(v)
  level = jnp.where(nan, kv[15], jnp.where(take_lo, lo, hi))
  if not with_index:
    return None, level
  code = jnp.where(nan, 15, ml + jnp.where(take_lo, 0, 1))
  return code, level


def _codes(A: Arith, v):
  return _best_index(A, v, with_index=True)[0]


def _weights(A: Arith, x, qw):
  """[n, nb] -> [n, nb]: x*x, or qw * sqrt(sigma2 + x*x) with the super-block's sigma2."""
  if qw is None:
    return A.mul(x, x)
  n = x.shape[0]
  # C: `sigma2 += x*x` from 0 in element order, then `sigma2 *= 2.f/n` (a power of two, but a product).
  sigma2 = A.mul(seqsum(A, A.mul(x, x), axis=0), A.c(2.0 / n))
  return A.mul(qw, A.sqrt(A.add(sigma2[None, :], A.mul(x, x))))


def _group_scales(A: Arith, xg, wg):
  """The search: groups xg, weights wg [P, 32, nb] -> each group's scale [P, nb] (0 below GROUP_MAX_EPS).

  All 16 trials run at once along a trial axis (one scan over the elements in C's order, each step over
  [T, P, nb]); only the choice among them is sequential. Underflow checks: w is checked (or built from
  checked and screened values); q is a level, an integer of magnitude >= 1, so w*q and w*q*q are 0 or at
  least |w|; |(w*q)*x| >= |w*x| by the monotonicity of rounding, so one check of w*x per element covers
  that product in every trial; the trial products id*x only feed best_index, where any |v| < 0.5 picks
  the level 1 whether or not it flushed (v - (-10) and 1 - v round to 10 and 1 either way).
  """
  amax, mx = first_absmax(xg, axis=1)  # [P, nb]
  skip = amax < GROUP_MAX_EPS
  xt, wt = jnp.moveaxis(xg, 1, 0), jnp.moveaxis(wg, 1, 0)  # [n, P, nb]
  A.mul(wt, xt)  # checked only: bounds every (w*q)*x below
  # C: d = -max/values[0], id = 1/d; then id = (itry + values[0])/max. The numerators are small integers.
  first = A.div(A.c(1), A.div(-mx, A.c(float(KVALUES[0]))))
  nums = np.arange(-NTRY, NTRY + 1, dtype=np.float32) + np.float32(KVALUES[0])
  rest = A.div(jnp.asarray(nums, A.dtype)[:, None, None], mx[None])
  iscale = jnp.concatenate([first[None], rest], axis=0)  # [T, P, nb]

  def element(sums, xs):
    sumqx, sumq2 = sums
    xi, wi = xs  # [P, nb]
    _, q = _best_index(A, A.mul_unchecked(iscale, xi), with_index=False)
    wq = A.mul_unchecked(wi, q)
    return (A.add(sumqx, A.mul_unchecked(wq, xi)), A.add(sumq2, A.mul_unchecked(wq, q))), None

  zero = jnp.broadcast_to(A.zero(), iscale.shape)
  (sumqx, sumq2), _ = lax.scan(element, (zero, zero), (xt, wt))  # [T, P, nb]

  d = jnp.where(sumq2[0] > 0, A.div(sumqx[0], sumq2[0]), A.c(0))
  best = A.mul(d, sumqx[0])
  for t in range(1, sumqx.shape[0]):
    take = (sumq2[t] > 0) & (A.mul(sumqx[t], sumqx[t]) > A.mul(best, sumq2[t]))
    new_d = A.div(sumqx[t], sumq2[t])
    d = jnp.where(take, new_d, d)
    best = jnp.where(take, A.mul(new_d, sumqx[t]), best)
  return jnp.where(skip, A.c(0), d)


def _pack_nibbles(codes):
  """[..., 32, nb] codes -> [..., 16, nb] bytes: byte j = code j | code j+16 << 4."""
  return to_u8(codes[..., :16, :] | (codes[..., 16:, :] << 4))


def iq4_nl(A: Arith, x, qw=None):
  w = _weights(A, x, qw)
  scale = _group_scales(A, x[None], w[None])[0]  # [nb]
  d_h, _ = fp16_round(A, scale)
  # C: id = scales[0] ? 1/scales[0] : 0 (a NaN scale is true there, as NaN != 0 is here).
  inv = jnp.where(scale != 0, A.div(A.c(1), scale), A.c(0))
  codes = _codes(A, A.mul_unchecked(inv[None, :], x))  # feeds best_index only: see _group_scales
  codes, d_h = materialize(A.z, (codes, d_h))  # before packing: see materialize
  return jnp.concatenate([jnp.stack(u16_le(d_h)), _pack_nibbles(codes)], axis=0)


def iq4_xs(A: Arith, x, qw=None):
  nb = x.shape[-1]
  w = _weights(A, x, qw)
  groups = x.shape[0] // GROUP
  xg = x.reshape(groups, GROUP, nb)
  scales = _group_scales(A, xg, w.reshape(groups, GROUP, nb))  # [8, nb]
  _, max_scale = first_absmax(scales, axis=0)
  d = A.div(-max_scale, A.c(32))
  d_h, _ = fp16_round(A, d)
  # The group scales are quantized against the float32 d, not its fp16 rounding (as in C).
  inv = jnp.where(d != 0, A.div(A.c(1), d), A.c(0))
  l = clamp(A.nearest_int_of_product(inv[None, :], scales), -32, 31)
  # d is checked and l an integer, so d*l is 0 or at least |d|.
  dl = A.mul_unchecked(d[None, :], A.from_int(l))
  idl = jnp.where(dl != 0, A.div(A.c(1), dl), A.c(0))
  dl, idl = materialize(A.z, (dl, idl))  # per group, not per element
  codes = _codes(A, A.mul_unchecked(idl[:, None, :], xg))  # [8, 32, nb]
  ls = l + 32  # 0..63
  scales_h = sum((ls[ib] >> 4) << (2 * ib) for ib in range(groups))
  scales_l = (ls[0::2] & 0xF) | ((ls[1::2] & 0xF) << 4)  # [4, nb]
  codes, d_h, scales_h, scales_l = materialize(A.z, (codes, d_h, scales_h, scales_l))
  out = [
    jnp.stack(u16_le(d_h)),
    jnp.stack(u16_le(scales_h)),
    to_u8(scales_l),
    _pack_nibbles(codes).reshape(groups * GROUP // 2, nb),
  ]
  return jnp.concatenate(out, axis=0)
