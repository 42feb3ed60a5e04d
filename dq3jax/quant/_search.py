"""ggml's per-group scale searches, vectorised over groups and blocks, sequential inside a group.

Arrays are `[P, n, nb]`: P independent groups per block, n the elements of a group (the axis C
loops over, in order), nb blocks. Integer codes are int32. Every float op goes through the
`Arith` object (see _arith.py); the loop structure, comparison directions and the order of
every operation follow ggml-quants.c, because each of them can change a byte.

How they run fast under XLA:CPU: per-element terms are whole-array ops; every loop C runs in element
order is a `lax.scan` whose step does one element for all groups, blocks (and, where trials are
independent, all trials) at once; underflow events are OR-ed elementwise in loop carries and reduced
to blocks once. Unrolled per-element chains, as these kernels were first written, made XLA duplicate
producers into every consumer: 3-10x slower to run and tens of seconds to compile per kernel.
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

  The 19 trial scales depend only on the group's max, so all trials are computed at once as a
  trial axis (a scan over the elements in order, each step over [T, P, nb]); only the
  choice among them runs in C's order, on the per-trial sums. No per-element underflow check is
  needed: w is x*x (checked) or screened, codes are 0 or >= 1 in magnitude, so w*x*l and w*l*l
  are 0 or at least the checked w*x and w; iscale*x only feeds nearest_int.
  """
  amax, mx = first_absmax(x, axis=1)
  is_zero = amax < GROUP_MAX_EPS
  xt = jnp.moveaxis(x, 1, 0)  # [n, P, nb]
  w = A.mul(xt, xt) if qw is None else A.screen(jnp.moveaxis(qw, 1, 0))
  wx = A.mul(w, xt)
  # C: iscale = -nmax/max first, then -(nmax + 0.1f*is)/max for is = -9..9 except 0; the
  # constants are float32 roundings, done here in numpy.
  steps = np.array([s for s in range(-9, 10) if s != 0], dtype=np.float32)
  factors = np.concatenate([[-np.float32(nmax)], -(np.float32(nmax) + np.float32(0.1) * steps)])
  iscale = A.div(jnp.asarray(factors, A.dtype)[:, None, None], mx[None])  # [T, P, nb]

  def element(sums, xs):  # C's element loop, all trials at once: [T, P, nb] per element
    sumlx, suml2 = sums
    xi, wi, wxi = xs  # [P, nb]
    lf = A.from_int(clamp(A.nearest_int_of_product(iscale, xi), -nmax, nmax - 1))
    sumlx = A.add(sumlx, A.mul_unchecked(wxi, lf))
    suml2 = A.add(suml2, A.mul_unchecked(A.mul_unchecked(wi, lf), lf))
    return (sumlx, suml2), None

  zero = jnp.broadcast_to(A.zero(), iscale.shape)
  (sumlx, suml2), _ = lax.scan(element, (zero, zero), (xt, w, wx))  # [T, P, nb]

  scale = jnp.where(suml2[0] != 0, A.div(sumlx[0], suml2[0]), A.c(0))
  best = A.mul(scale, sumlx[0])
  chosen = iscale[0]
  for t in range(1, len(factors)):
    take = (suml2[t] > 0) & (A.mul(sumlx[t], sumlx[t]) > A.mul(best, suml2[t]))
    new_scale = A.div(sumlx[t], suml2[t])
    scale = jnp.where(take, new_scale, scale)
    best = jnp.where(take, A.mul(new_scale, sumlx[t]), best)
    chosen = jnp.where(take, iscale[t], chosen)
  # C recomputes the accepted trial's codes from its iscale; a gather from `l` made XLA fuse the
  # whole trial computation into every consumer of the codes.
  codes = clamp(A.nearest_int_of_product(chosen, xt), -nmax, nmax - 1) + nmax  # [n, P, nb]
  scale = jnp.where(is_zero, A.c(0), scale)
  codes = jnp.where(is_zero, 0, codes)
  return scale, jnp.moveaxis(codes, 0, 1)


def _descent(A: Arith, x, w, codes, sumlx, suml2, *, lo, hi, wrap, need_sl2_positive):
  """ggml's in-place coordinate descent over the codes of each group, N_DESCENT_PASSES passes.

  Each pass is a `lax.scan` over the elements in order
  (the state is the group's two sums); underflow events are OR-ed elementwise in the carry and
  reduced to blocks once. w is screened, so w*l*l and (checked) w*x times a code l need no check.
  """
  xt, ct = jnp.moveaxis(x, 1, 0), jnp.moveaxis(codes, 1, 0)  # [n, P, nb]
  wt = A.screen(jnp.moveaxis(w, 1, 0))
  wx = A.mul(wt, xt)

  def element(carry, xs):
    sumlx, suml2, events, changed = carry
    xi, wi, wxi, ci = xs
    B = A.scratch()
    li = B.from_int(ci)
    slx = B.sub(sumlx, B.mul_unchecked(wxi, li))
    sl2 = B.sub(suml2, B.mul_unchecked(B.mul_unchecked(wi, li), li))
    propose = (slx > 0) & (sl2 > 0) if need_sl2_positive else (slx > 0)
    new = B.nearest_int(B.div(B.mul(xi, sl2), slx))
    new = jnp.minimum(hi, new) if lo is None else clamp(new, lo, hi)
    propose = propose & (new != ci)
    nf = B.from_int(new)
    slx2 = B.add(slx, B.mul_unchecked(wxi, nf))
    sl22 = B.add(sl2, B.mul_unchecked(B.mul_unchecked(wi, nf), nf))
    better = B.mul(B.mul(slx2, slx2), suml2) > B.mul(B.mul(sumlx, sumlx), sl22)
    take = propose & better & (sl22 > 0) if not need_sl2_positive else propose & better
    events = events | B.take_events(events.shape)
    carry = (jnp.where(take, slx2, sumlx), jnp.where(take, sl22, suml2), events, changed | take)
    return carry, jnp.where(take, wrap(new), ci)

  def one_pass(carry):
    k, _, codes, sumlx, suml2, events = carry
    none = jnp.zeros(sumlx.shape, jnp.bool_)
    (sumlx, suml2, events, changed), codes = lax.scan(
      element, (sumlx, suml2, events, none), (xt, wt, wx, codes)
    )
    return k + 1, changed.any(), codes, sumlx, suml2, events

  def more(carry):
    # C stops a group after a pass that changed none of its codes; such a pass changes nothing
    # if repeated, so stopping once no group of the chunk changed is exact, and usually early.
    return (carry[0] < N_DESCENT_PASSES) & carry[1]

  events = jnp.zeros(sumlx.shape, jnp.bool_)
  init = (jnp.int32(0), jnp.bool_(True), ct, sumlx, suml2, events)
  _, _, ct, sumlx, suml2, events = lax.while_loop(more, one_pass, init)
  A.note(events)
  return jnp.moveaxis(ct, 0, 1), sumlx, suml2


def make_q3_quants(A: Arith, x, nmax: int = 4):
  """Q3_K's reference search (make_q3_quants with do_rmse): codes 0..2*nmax-1, or 0 for zero groups."""
  amax, mx = first_absmax(x, axis=1)
  is_zero = amax < GROUP_MAX_EPS
  iscale = A.div(A.c(-nmax), mx)
  l = clamp(A.nearest_int_of_product(iscale[:, None, :], x), -nmax, nmax - 1)
  w = A.mul(x, x)
  lf = A.from_int(l)
  # w and w*x are checked; times a code (0 or >= 1 in magnitude) they cannot newly underflow.
  sumlx, suml2 = seqsums(
    A, [A.mul_unchecked(A.mul(w, x), lf), A.mul_unchecked(A.mul_unchecked(w, lf), lf)], axis=1
  )
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
  wx = A.mul(w, x)  # checked here once: bounds every w*l*x below
  mn, mx = scan_min_max(x, axis=0)
  sum_w, sum_x = seqsums(A, [w, wx], axis=0, from_zero=False)
  mn = jnp.where(mn > 0, A.c(0), mn)
  degenerate = (mx <= mn) if degenerate_le else (mx == mn)
  mn_start = mn

  def weighted_error(B, scale, m, codes):
    """C: err += w * f((scale*L + min) - x), f = |.| (use_mad) or square, in element order.

    Returns the error [P, nb] and the events [P, nb] of its one checked product per element."""

    def element(carry, xs):
      err, events = carry
      xi, wi, li = xs
      diff = B.sub(B.add(B.mul_unchecked(scale, B.from_int(li)), m), xi)
      f = jnp.abs(diff) if use_mad else B.mul_unchecked(diff, diff)
      term = B.mul_unchecked(wi, f)
      return (B.add(err, term), events | B.product_underflow(term, wi, diff)), None

    init = (jnp.broadcast_to(B.zero(), scale.shape), jnp.zeros(scale.shape, jnp.bool_))
    (err, events), _ = lax.scan(element, init, (x, w, codes))
    return err, events

  def trial_sums(B, iscale, m):
    """The trial's codes and C's sum_l, sum_l2, sum_xl (each from 0, in element order)."""

    def element(sums, xs):
      sum_l, sum_l2, sum_xl = sums
      xi, wi = xs
      li = clamp(B.nearest_int_of_product(iscale, B.sub(xi, m)), 0, nmax)
      lf = B.from_int(li)
      wl = B.mul_unchecked(wi, lf)
      sums = (
        B.add(sum_l, wl),
        B.add(sum_l2, B.mul_unchecked(wl, lf)),
        B.add(sum_xl, B.mul_unchecked(wl, xi)),
      )
      return sums, li

    zero = jnp.broadcast_to(B.zero(), iscale.shape)
    sums, codes = lax.scan(element, (zero, zero, zero), (x, w))
    return codes, sums

  iscale = A.div(A.c(nmax), A.sub(mx, mn))
  scale = A.div(A.c(1), iscale)
  codes = clamp(A.nearest_int_of_product(iscale, A.sub(x, mn)), 0, nmax)
  best, events = weighted_error(A, scale, mn, codes)

  # C: (rmin + rdelta*is + nmax) with float32 roundings; precomputed exactly in numpy.
  steps = np.arange(nstep + 1, dtype=np.float32)
  factors = (np.float32(rmin) + np.float32(rdelta) * steps) + np.float32(nmax)

  def trial(k, carry):
    codes, scale, mn, best, events, flag = carry
    B = A.fork(flag)
    l, (sum_l, sum_l2, sum_xl) = trial_sums(B, B.div(jnp.asarray(factors, B.dtype)[k], B.sub(mx, mn)), mn)
    det = B.sub(B.mul(sum_w, sum_l2), B.mul(sum_l, sum_l))
    t_scale = B.div(B.sub(B.mul(sum_w, sum_xl), B.mul(sum_x, sum_l)), det)
    t_min = B.div(B.sub(B.mul(sum_l2, sum_x), B.mul(sum_l, sum_xl)), det)
    pos = t_min > 0
    t_min = jnp.where(pos, B.c(0), t_min)
    t_scale = jnp.where(pos, B.div(sum_xl, sum_l2), t_scale)
    cur, ev = weighted_error(B, t_scale, t_min, l)
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
