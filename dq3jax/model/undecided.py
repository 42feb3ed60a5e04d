"""Undecided points: where a float64 evaluation cannot be sure what its float32 (or discrete) result is.

The goldens are evaluated in float64 and rounded once to float32. Two machines may compute the float64
values in different orders (XLA's vector width for reductions and its exp/log polynomials depend on the
CPU's ISA, FMA contraction on its availability), so their float64 values may differ slightly; they still write
the same float32 bytes unless a value lies so close to a float32 rounding midpoint that the difference can
carry it across. The same holds for every decision the forward takes on float64 values: an activation
rounded to float32 before llama.cpp's quantizer (or to fp16 for the KV cache), and the router's top-k and
group choices (the gap between the last selected and the first rejected candidate).

The margin. The error of a reduction is absolute, not relative to its result: a dot product of n terms
evaluated in two orders differs by up to 2 (n - 1) u sum|t_i| (u = 2^-53; Higham, Accuracy and Stability,
4.2), however small the result is by cancellation. So the margin is relative to the scale of the row the
value belongs to (the largest magnitude along the last axis: a token's logits, hidden state, cache row,
attention probabilities), not to the value: a logit near zero is as uncertain in absolute terms as a large
one, and far more in relative terms. The worst-case bound (n = 1024, sum|t| a few times the row scale,
chained over the layers) is about 2^-37 of the row scale; realised differences are random walks far below
it. Measured on the goldens' models (every output and intermediate tensor, all three emulations) between
XLA's default CPU code (AVX-512, FMA) and --xla_cpu_max_isa=AVX2, AVX (no FMA) and SSE4_2, and between
whole-model and layer-wise compilation, expanded and absorbed attention, one pass and incremental decoding:
the largest float64 difference is 2^-47.4 of its row's scale (|diff| / |value| reaches 2^-30 near zero, so a
margin relative to the value would be unsound). REL_MARGIN = 2^-42 of the row scale leaves a factor 2^5
over every order measured. A float32 value flagged this way is one whose float32 rounding another machine
could change by one unit; at random about 2^-42 / 2^-24 of the values of a row of similar magnitudes are
flagged, more where values are much smaller than their row's largest. Values exactly on a midpoint are not
flagged (`f32_undecided`).

What is flagged is reported, not hidden: the generator records every point (tensor or decision kind, token,
element) in the manifest and prints them. Internal points (an activation's quantization, an fp16 cache
entry, an expert choice) would spread to everything after them and must be zero on committed goldens; an
output element can only be one float32 unit off, and comparisons may exempt the listed ones.

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

# Margin around a float32 rounding midpoint, relative to the largest magnitude of the value's row (its last
# axis), below which a float64 value counts as undecided; also the relative margin of router gaps. Derivation
# in the module doc.
REL_MARGIN = 2.0**-42


def _margin(xp, x):
  """REL_MARGIN times the largest |x| along the last axis, broadcast to x."""
  return xp.broadcast_to(xp.max(xp.abs(x), axis=-1, keepdims=True) * REL_MARGIN, x.shape)


def _is_tie(xp, x, near):
  """x (float64) lies exactly on the midpoint between near (its float32 rounding) and the next float32:
  then 2x - near is that float32, exactly."""
  other = 2 * x - near.astype(xp.float64)  # exact: 2x and near are within a factor 2 of each other
  return (x != near) & (other.astype(xp.float32).astype(xp.float64) == other)


def f32_undecided(x):
  """Elementwise: float64 x [..., n] is within the margin of a float32 rounding midpoint (numpy or jax).

  A value exactly on a midpoint is not undecided: it has at most 25 significant bits, which a float64
  result has when it was computed exactly (e.g. a product of quantized activations and quantized weights,
  whose partial sums are all representable, so every summation order gives it), and then every machine
  rounds the same tie to even. (An inexact result landing exactly there has probability ~2^-28.) Nor is an
  exact zero (masked attention, structural zeros): cancellation to exactly 0 is as unlikely."""
  xp = np if isinstance(x, np.ndarray | np.generic) else jnp
  return _flagged(xp, x, x.astype(xp.float32))


def _flagged(xp, x, near):
  m = _margin(xp, x)
  return ((x - m).astype(xp.float32) != (x + m).astype(xp.float32)) & ~_is_tie(xp, x, near) & (x != 0)


def f32_alternative(x):
  """(nearest float32 of float64 x [..., n], the float32 on the other side of x's rounding midpoint where x
  is undecided (f32_undecided), else the nearest again): the two values another evaluation order could
  give."""
  m = _margin(jnp, x)
  near, lo, hi = x.astype(jnp.float32), (x - m).astype(jnp.float32), (x + m).astype(jnp.float32)
  return near, jnp.where(_flagged(jnp, x, near), jnp.where(lo != near, lo, hi), near)


def gap_undecided(a, b):
  """Elementwise: a decision between scores a and b (a selected, b not) that a reordered float64
  evaluation could reverse: |a - b| within REL_MARGIN of max(|a| + |b|, 1), an exact tie included. The
  scores are sigmoids (in (0, 1)) plus a bias, whose errors are absolute, hence the floor of 1."""
  xp = np if isinstance(a, np.ndarray | np.generic) else jnp
  return xp.abs(a - b) <= REL_MARGIN * xp.maximum(xp.abs(a) + xp.abs(b), 1.0)


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
