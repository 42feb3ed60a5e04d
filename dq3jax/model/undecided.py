"""Undecided points: where a float64 evaluation cannot be sure what its float32 (or discrete) result is.

The goldens are evaluated in float64 and rounded once to float32. Two machines compute the float64 values
in different orders (XLA's vector width for reductions depends on the CPU's ISA, matmul blocking on its
caches, and the last bit of exp/log on the libm path), so their float64 values differ slightly; they still
write the same float32 bytes unless a value lies so close to a float32 rounding midpoint that the
difference can carry it across. The same holds for every decision the forward takes on float64 values: an
activation rounded to float32 before llama.cpp's quantizer (or to fp16 for the KV cache), and the router's
top-k and group choices (the gap between the last selected and the first rejected candidate).

The margin. A sum of n float64 terms evaluated in two different orders differs by at most
2 (n - 1) u sum|t_i| (u = 2^-53; Higham, Accuracy and Stability, 4.2), i.e. 2 (n - 1) u k relative to the
result, k = sum|t_i| / |sum t_i| its condition number. The widest reduction here has n = 1024 (vocabulary
rows; hidden and latent widths are 256), so one reduction moves a result by at most 2^-43 k relative; the
forward chains about 5 reductions per layer over 3-4 layers, and errors entering a layer pass through it
amplified by its own (modest, RMSNorm-normalised) condition. A relative margin of 2^-40 therefore covers
a chain of reductions of condition k ~ 8 each; in practice the orders differ far less than these worst
cases (a random walk, not a sum of worst cases): tests/model/test_undecided.py measures the float64
difference between full-sequence and incremental evaluation, and between AVX2 and default ISA, and holds
it below 2^-10 of the margin. A float32 value has a relative spacing of 2^-23..2^-24, so a margin of 2^-40
flags about 2 x 2^-40 / 2^-23.5 ~ 2e-5 of all values at random: a few per 100k. That is the price of the
guarantee; a flagged value is reported (tensor, token), not hidden, and a flagged *internal* point (an
activation code or an expert choice) would spread to everything after it, so those are the ones that
matter most.

Collection: `transformer.forward(..., undecided=True)` opens a `Tally` for its trace; `record` (called by
act_quant, mla and moe at their decision points) adds per-token counts under a kind name such as
"blk.1.act.attn.wq_b", "blk.1.kv.probs" or "blk.2.router.topk". Without an open tally nothing is computed.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np

# Relative margin around a float32 rounding midpoint (or a router gap) below which a float64 value counts as
# undecided; derivation in the module doc.
REL_MARGIN = 2.0**-40


def _is_tie(xp, x, near):
  """x (float64) lies exactly on the midpoint between near (its float32 rounding) and the next float32:
  then 2x - near is that float32, exactly."""
  other = 2 * x - near.astype(xp.float64)  # exact: 2x and near are within a factor 2 of each other
  return (x != near) & (other.astype(xp.float32).astype(xp.float64) == other)


def f32_undecided(x):
  """Elementwise: float64 x [...] is within REL_MARGIN |x| of a float32 rounding midpoint (numpy or jax).

  A value exactly on a midpoint is not undecided: it has at most 25 significant bits, which a float64
  result has when it was computed exactly (e.g. a product of quantized activations and quantized weights,
  whose partial sums are all representable, so every summation order gives it), and then every machine
  rounds the same tie to even. (An inexact result landing exactly there has probability ~2^-28.)"""
  xp = np if isinstance(x, np.ndarray | np.generic) else jnp
  m = xp.abs(x) * REL_MARGIN
  near = x.astype(xp.float32)
  return ((x - m).astype(xp.float32) != (x + m).astype(xp.float32)) & ~_is_tie(xp, x, near)


def f32_alternative(x):
  """(nearest float32 of float64 x, the float32 on the other side of x's rounding midpoint when x is
  undecided (f32_undecided), else the nearest again): the two values another evaluation order could give."""
  m = jnp.abs(x) * REL_MARGIN
  near, lo, hi = x.astype(jnp.float32), (x - m).astype(jnp.float32), (x + m).astype(jnp.float32)
  return near, jnp.where(_is_tie(jnp, x, near), near, jnp.where(lo != near, lo, hi))


def gap_undecided(a, b):
  """Elementwise: a decision between scores a and b (a selected, b not) that a reordered float64
  evaluation could reverse: |a - b| within REL_MARGIN of their magnitudes (an exact tie included)."""
  xp = np if isinstance(a, np.ndarray | np.generic) else jnp
  return xp.abs(a - b) <= REL_MARGIN * (xp.abs(a) + xp.abs(b))


class Tally:
  """Per-token counts of undecided points of one forward pass: kind -> int32 [B, size], where slot p
  counts the points of the token at absolute position p (size: the cache length, or T without cache)."""

  def __init__(self, batch: int, q_positions: jax.Array, size: int):
    self.batch, self.q_positions, self.size = batch, q_positions, size
    self.counts: dict[str, jax.Array] = {}
    self._label: str | None = None

  @contextlib.contextmanager
  def layer(self, label: str | None):
    """Names recorded inside get the prefix `label.` ("blk.3", "output")."""
    prev, self._label = self._label, label
    try:
      yield
    finally:
      self._label = prev

  def name(self, kind: str) -> str:
    return kind if self._label is None else f"{self._label}.{kind}"

  def add(self, kind: str, flags: jax.Array, positions: jax.Array | None = None) -> None:
    """flags: bool or int [B, n, ...] (summed over the trailing axes) for the tokens at `positions` [n]
    (default: this pass's query tokens; then leading axes [B * T, ...] are accepted too). Given positions
    (cache rows), only those of this pass's tokens count: a cached token's points were counted in the
    pass that computed it."""
    if positions is None:
      positions = self.q_positions
      fresh = jnp.ones(positions.shape, bool)
    else:
      fresh = (positions >= self.q_positions[0]) & (positions <= self.q_positions[-1])
    per_token = flags.reshape(self.batch, positions.shape[0], -1).astype(jnp.int32).sum(-1, dtype=jnp.int32)
    per_token = jnp.where(fresh[None], per_token, 0)
    zero = jnp.zeros((self.batch, self.size), jnp.int32)
    key = self.name(kind)
    self.counts[key] = self.counts.get(key, zero) + zero.at[:, positions].add(per_token)


_ACTIVE: contextvars.ContextVar[Tally | None] = contextvars.ContextVar("dq3jax_undecided", default=None)


def active() -> Tally | None:
  return _ACTIVE.get()


@contextlib.contextmanager
def collecting(tally: Tally | None):
  """Makes `tally` the one `record` adds to (None: collection off) for the duration of a trace."""
  token = _ACTIVE.set(tally)
  try:
    yield tally
  finally:
    _ACTIVE.reset(token)


@contextlib.contextmanager
def layer(label: str | None):
  """Tally.layer of the active tally (nothing without one)."""
  t = active()
  if t is None:
    yield
  else:
    with t.layer(label):
      yield


def record(kind: str, flags: jax.Array, positions: jax.Array | None = None) -> None:
  """Adds flags to the active tally (no-op without one); see Tally.add."""
  t = active()
  if t is not None:
    t.add(kind, flags, positions)


def summarize(counts: dict[str, np.ndarray], offset: int = 0) -> dict:
  """{kind: {"count": n, "tokens": [positions with points]}} for the kinds with any point (numpy input:
  kind -> [B, S] or [S]); positions shifted by `offset`."""
  out = {}
  for kind, c in sorted(counts.items()):
    c = np.asarray(c)
    per_pos = c.reshape(-1, c.shape[-1]).sum(0)
    if per_pos.sum():
      out[kind] = {"count": int(per_pos.sum()), "tokens": [int(p) + offset for p in np.flatnonzero(per_pos)]}
  return out
