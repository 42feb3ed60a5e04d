"""ggml's per-group scale searches, vectorised over groups and blocks, sequential inside a group.

Arrays are `[P, n, nb]`: P independent groups per block, n the elements of a group (the axis C
loops over, in order), nb blocks. Integer codes are int32. Every float op goes through the
`Arith` object (see _arith.py); the loop structure, comparison directions and the order of
every operation follow ggml-quants.c, because each of them can change a byte.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from dq3jax.quant._arith import (
  GROUP_MAX_EPS,
  Arith,
  c_max_scan,
  clamp,
  first_absmax,
  scan_min_max,
  seqsum,
  seqsums,
  wrap_u8,
)

N_DESCENT_PASSES = 5  # ggml's coordinate-descent passes (make_q3_quants, make_qp_quants)


def _at(a, i):
  return a[:, i, :]


def make_qx_quants(A: Arith, x, nmax: int, qw=None):
  """Symmetric signed codes with a weighted-RMSE scale search (ggml make_qx_quants, rmse_type 1).

  Returns (scale [P, nb], L [P, n, nb] in 0..2*nmax-1). Groups with max|x| < 1e-15 get 0, 0.
  """
  amax, mx = first_absmax(x, axis=1)
  is_zero = amax < GROUP_MAX_EPS
  w = A.mul(x, x) if qw is None else qw
  wx = A.mul(w, x)

  xs = [_at(x, i) for i in range(x.shape[1])]  # per-element [P, nb] slices (see make_qkx_quants)
  ws = [_at(w, i) for i in range(x.shape[1])]
  wxs = [_at(wx, i) for i in range(x.shape[1])]

  def trial(B, iscale):
    sumlx = suml2 = B.zero()
    ls = []
    for xi, wi, wxi in zip(xs, ws, wxs, strict=True):
      li = clamp(B.nearest_int(B.mul(iscale, xi)), -nmax, nmax - 1)
      ls.append(li)
      lf = B.from_int(li)
      sumlx = B.add(sumlx, B.mul(wxi, lf))
      suml2 = B.add(suml2, B.mul(B.mul(wi, lf), lf))
    return jnp.stack(ls, axis=1), sumlx, suml2

  l, sumlx, suml2 = trial(A, A.div(A.c(-nmax), mx))
  codes = l + nmax
  scale = jnp.where(suml2 != 0, A.div(sumlx, suml2), A.c(0))
  best = A.mul(scale, sumlx)
  # C: iscale = -(nmax + 0.1f*is) / max for is = -9..9 except 0; the constants are two float32
  # roundings, done here in numpy.
  steps = np.array([s for s in range(-9, 10) if s != 0], dtype=np.float32)
  factors = -(np.float32(nmax) + np.float32(0.1) * steps)

  def step(k, carry):
    codes, scale, best, flag = carry
    B = A.fork(flag)
    l, sumlx, suml2 = trial(B, B.div(jnp.asarray(factors, B.dtype)[k], mx))
    take = (suml2 > 0) & (B.mul(sumlx, sumlx) > B.mul(best, suml2))
    new_scale = B.div(sumlx, suml2)
    return (
      jnp.where(take[:, None, :], l + nmax, codes),
      jnp.where(take, new_scale, scale),
      jnp.where(take, B.mul(new_scale, sumlx), best),
      B.flag,
    )

  codes, scale, best, A.flag = lax.fori_loop(0, len(factors), step, (codes, scale, best, A.flag))
  scale = jnp.where(is_zero, A.c(0), scale)
  codes = jnp.where(is_zero[:, None, :], 0, codes)
  return scale, codes


def _descent(A: Arith, x, w, codes, sumlx, suml2, *, lo, hi, wrap, need_sl2_positive):
  """ggml's in-place coordinate descent over the codes of each group, N_DESCENT_PASSES passes.

  A pass that changes nothing leaves the state as it was, so running every pass (instead of
  C's early `break`) gives the same result.
  """
  n = x.shape[1]
  wx = A.mul(w, x)

  def one_pass(_, carry):
    codes, sumlx, suml2, flag = carry
    B = A.fork(flag)
    cols = [codes[:, i, :] for i in range(n)]
    for i in range(n):
      li = B.from_int(cols[i])
      slx = B.sub(sumlx, B.mul(_at(wx, i), li))
      sl2 = B.sub(suml2, B.mul(B.mul(_at(w, i), li), li))
      propose = (slx > 0) & (sl2 > 0) if need_sl2_positive else (slx > 0)
      new = B.nearest_int(B.div(B.mul(_at(x, i), sl2), slx))
      new = jnp.minimum(hi, new) if lo is None else clamp(new, lo, hi)
      propose = propose & (new != cols[i])
      nf = B.from_int(new)
      slx2 = B.add(slx, B.mul(_at(wx, i), nf))
      sl22 = B.add(sl2, B.mul(B.mul(_at(w, i), nf), nf))
      better = B.mul(B.mul(slx2, slx2), suml2) > B.mul(B.mul(sumlx, sumlx), sl22)
      take = propose & better & (sl22 > 0) if not need_sl2_positive else propose & better
      cols[i] = jnp.where(take, wrap(new), cols[i])
      sumlx = jnp.where(take, slx2, sumlx)
      suml2 = jnp.where(take, sl22, suml2)
    return jnp.stack(cols, axis=1), sumlx, suml2, B.flag

  codes, sumlx, suml2, A.flag = lax.fori_loop(0, N_DESCENT_PASSES, one_pass, (codes, sumlx, suml2, A.flag))
  return codes, sumlx, suml2


def make_q3_quants(A: Arith, x, nmax: int = 4):
  """Q3_K's reference search (make_q3_quants with do_rmse): codes 0..2*nmax-1, or 0 for zero groups."""
  amax, mx = first_absmax(x, axis=1)
  is_zero = amax < GROUP_MAX_EPS
  iscale = A.div(A.c(-nmax), mx)
  l = clamp(A.nearest_int(A.mul(iscale[:, None, :], x)), -nmax, nmax - 1)
  w = A.mul(x, x)
  lf = A.from_int(l)
  sumlx = seqsum(A, A.mul(A.mul(w, x), lf), axis=1)
  suml2 = seqsum(A, A.mul(A.mul(w, lf), lf), axis=1)
  l, sumlx, suml2 = _descent(
    A, x, w, l, sumlx, suml2, lo=-nmax, hi=nmax - 1, wrap=lambda v: v, need_sl2_positive=False
  )
  scale = jnp.where(suml2 > 0, A.div(sumlx, suml2), A.c(0))
  scale = jnp.where(is_zero, A.c(0), scale)
  codes = jnp.where(is_zero[:, None, :], 0, l + nmax)
  return scale, codes


def make_qkx_quants(
  A: Arith, x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, degenerate_le: bool
):
  """Asymmetric codes 0..nmax with a min (ggml make_qkx2_quants / make_qkx3_quants with weights).

  `degenerate_le` selects make_qkx3's `max <= min` test over make_qkx2's `max == min`.
  Returns (scale [P, nb], the_min [P, nb] (>= 0, to be subtracted), codes [P, n, nb]).

  The trials run in order (each starts from the min the last accepted trial left, as in C); inside
  a trial every per-element term is one array op over all groups, elements and blocks, and only
  the sums run in element order (seqsums, a scan over the leading element axis: the arrays are
  held as [n, P, nb] here so the scan needs no transposes).

  Underflow checks (see _arith.py) are kept where a result can be tiny and dropped where it
  provably cannot, because in this loop they cost more than the arithmetic:
  * w is screened once, so w*l and w*l*l (l a code, 0 or >= 1) are 0 or at least |w|;
  * w*l*x is at least |w*x|, and w*x is checked once when sum_x is formed;
  * a scale times a code is 0 or at least the scale, a checked quotient;
  * iscale*(x - min) only feeds nearest_int, where flushing cannot change a code;
  * the error term w*f(diff) gets one check of its own result: if f(diff) = diff*diff flushed,
    the term reads 0 (flagged); if it did not flush it is a normal number, and is used only as
    this multiplicand, so its exactness is all that matters.
  """
  x = jnp.moveaxis(x, 1, 0)  # [n, P, nb]
  w = A.screen(jnp.moveaxis(w, 1, 0))
  w_nonzero = w != 0
  wx = A.mul(w, x)  # checked here once: bounds every w*l*x below
  mn, mx = scan_min_max(x, axis=0)
  sum_w, sum_x = seqsums(A, [w, wx], axis=0, from_zero=False)
  mn = jnp.where(mn > 0, A.c(0), mn)
  degenerate = (mx <= mn) if degenerate_le else (mx == mn)
  mn_start = mn

  def weighted_error(B, scale, m, lf):
    """C: err += w * f((scale*L + min) - x), f = |.| (use_mad) or square, in element order."""
    diff = B.sub(B.add(B.mul_unchecked(scale, lf), m), x)
    f = jnp.abs(diff) if use_mad else B.mul_unchecked(diff, diff)
    err = B.mul_unchecked(w, f)
    return seqsum(B, err, axis=0), B.product_underflow(err, w_nonzero, diff)

  def codes_for(B, iscale, m):
    return clamp(B.nearest_int_of_product(iscale, B.sub(x, m)), 0, nmax)

  iscale = A.div(A.c(nmax), A.sub(mx, mn))
  scale = A.div(A.c(1), iscale)
  codes = codes_for(A, iscale, mn)
  best, events = weighted_error(A, scale, mn, A.from_int(codes))

  # C: (rmin + rdelta*is + nmax) with float32 roundings; precomputed exactly in numpy.
  steps = np.arange(nstep + 1, dtype=np.float32)
  factors = (np.float32(rmin) + np.float32(rdelta) * steps) + np.float32(nmax)

  def trial(k, carry):
    codes, scale, mn, best, events, flag = carry
    B = A.fork(flag)
    l = codes_for(B, B.div(jnp.asarray(factors, B.dtype)[k], B.sub(mx, mn)), mn)
    lf = B.from_int(l)
    wl = B.mul_unchecked(w, lf)
    sum_l, sum_l2, sum_xl = seqsums(B, [wl, B.mul_unchecked(wl, lf), B.mul_unchecked(wl, x)], axis=0)
    det = B.sub(B.mul(sum_w, sum_l2), B.mul(sum_l, sum_l))
    t_scale = B.div(B.sub(B.mul(sum_w, sum_xl), B.mul(sum_x, sum_l)), det)
    t_min = B.div(B.sub(B.mul(sum_l2, sum_x), B.mul(sum_l, sum_xl)), det)
    pos = t_min > 0
    t_min = jnp.where(pos, B.c(0), t_min)
    t_scale = jnp.where(pos, B.div(sum_xl, sum_l2), t_scale)
    cur, ev = weighted_error(B, t_scale, t_min, lf)
    take = (det > 0) & (cur < best)
    return (
      jnp.where(take, l, codes),
      jnp.where(take, t_scale, scale),
      jnp.where(take, t_min, mn),
      jnp.where(take, cur, best),
      events | ev,
      B.flag,
    )

  if nstep >= 1:
    carry = (codes, scale, mn, best, events, A.flag)
    codes, scale, mn, best, events, A.flag = lax.fori_loop(0, nstep + 1, trial, carry)
  A.note(events)
  scale = jnp.where(degenerate, A.c(0), scale)
  codes = jnp.where(degenerate, 0, codes)
  the_min = -jnp.where(degenerate, mn_start, mn)
  return scale, the_min, jnp.moveaxis(codes, 0, 1)


def make_qp_quants(A: Arith, x, nmax: int, w):
  """Positive 'scales of scales' (ggml make_qp_quants): codes 0..nmax (uint8 semantics)."""
  mx = c_max_scan(x, axis=1)
  is_zero = mx < GROUP_MAX_EPS  # C starts max at 0, so an all-non-positive group lands here too
  iscale = A.div(A.c(nmax), mx)

  def mse(isc, l):
    diff = A.sub(x, A.mul(A.div(A.c(1), isc)[:, None, :], A.from_int(l)))
    return seqsum(A, A.mul(A.mul(w, diff), diff), axis=1)

  best = mse(iscale, wrap_u8(A.nearest_int(A.mul(iscale[:, None, :], x))))
  for step in range(-4, 5):
    if step == 0:
      continue
    k = np.float32(0.1) * np.float32(step) + np.float32(nmax)
    isc = A.div(A.c(k), mx)
    cur = mse(isc, jnp.minimum(nmax, A.nearest_int(A.mul(isc[:, None, :], x))))
    take = cur < best
    best = jnp.where(take, cur, best)
    iscale = jnp.where(take, isc, iscale)
  l = jnp.minimum(nmax, A.nearest_int(A.mul(iscale[:, None, :], x)))
  lf = A.from_int(l)
  sumlx = seqsum(A, A.mul(A.mul(w, x), lf), axis=1)
  suml2 = seqsum(A, A.mul(A.mul(w, lf), lf), axis=1)
  codes, sumlx, suml2 = _descent(
    A, x, w, wrap_u8(l), sumlx, suml2, lo=None, hi=nmax, wrap=wrap_u8, need_sl2_positive=True
  )
  scale = jnp.where(suml2 > 0, A.div(sumlx, suml2), A.c(0))
  scale = jnp.where(is_zero, A.c(0), scale)
  codes = jnp.where(is_zero[:, None, :], 0, codes)
  return scale, codes
