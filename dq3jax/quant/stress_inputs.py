"""Seeded inputs of the kinds that break quantizers, for the cross-check against ggml.

Every generator returns float32 `[rows, n]`; the seed, kind and width fully determine it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

WIDTHS = (256, 512, 1024, 2048, 4096, 8192)


def _gaussian(rng, rows, n):
  return rng.standard_normal((rows, n)) * 0.02


def _heavy_tail_outliers(rng, rows, n):
  x = rng.standard_t(2.0, size=(rows, n)) * 0.01
  cols = rng.choice(n, size=max(1, n // 50), replace=False)
  x[:, cols] *= 100.0  # outlier columns, as real projection weights have
  return x


def _row_scales(rng, rows, n):
  # Per-row scales over 40 orders of magnitude (1e-20 .. 1e20).
  return rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-20, 20, size=(rows, 1))


def _special_blocks(rng, rows, n):
  """Degenerate 32-element sub-blocks (zero, constant, spike, one-sign, -0, sparse, ties), mixed."""
  x = rng.standard_normal((rows, n // 32, 32)) * 0.05
  kind = rng.integers(0, 9, size=(rows, n // 32))
  x[kind == 0] = 0.0
  x[kind == 1] = rng.standard_normal() * 0.3  # constant
  spike = np.zeros(32)
  spike[rng.integers(32)] = 1.7
  x[kind == 2] = spike  # single spike, zeros around it
  x[kind == 3] = np.abs(x[kind == 3])  # one sign
  x[kind == 4] = -np.abs(x[kind == 4])
  x[kind == 5] = -0.0  # negative zero block
  mixed = np.where(rng.random((32,)) < 0.5, -0.0, 0.0)
  x[kind == 6] = mixed  # +-0 mix
  x[kind == 7] = np.where(rng.random(x[kind == 7].shape) < 0.9, 0.0, x[kind == 7])  # 90 % sparse
  x[kind == 8] = np.round(x[kind == 8] * 40) / 40  # few distinct values, many exact ties
  return x.reshape(rows, n)


def _tiny(rng, rows, n):
  """Magnitudes around 1e-15 (GROUP_MAX_EPS) and float32 subnormals, mixed with zeros."""
  scale = rng.choice([1e-16, 1e-15, 4e-15, 1e-36, 1e-39, 1e-42, 1e-44], size=(rows, n // 32, 1))
  x = rng.standard_normal((rows, n // 32, 32)) * scale
  x[rng.random(x.shape) < 0.1] = 0.0
  return x.reshape(rows, n)


def _fp16_limit(rng, rows, n):
  """Values near the fp16 limit (65504): scales and mins overflow or round at the edge."""
  mag = rng.choice([6.0e4, 6.5e4, 6.6e4, 1.0e5, 2.0e6, 8.0e5], size=(rows, n // 32, 1))
  x = rng.uniform(-1, 1, size=(rows, n // 32, 32)) * mag
  return x.reshape(rows, n)


def _ties(rng, rows, n):
  """Values on a half-integer grid times powers of two, so x*iscale hits exact .5 ties."""
  k = rng.integers(-16, 17, size=(rows, n))
  e = rng.integers(-8, 4, size=(rows, n // 32, 1))
  x = (k / 2.0).reshape(rows, n // 32, 32) * np.exp2(e)
  return x.reshape(rows, n)


def _negative_zero(rng, rows, n):
  x = rng.standard_normal((rows, n)) * 0.01
  x[rng.random((rows, n)) < 0.5] = -0.0
  return x


# IQ4_NL/IQ4_XS's non-linear levels (ggml's kvalues_iq4nl) and the midpoints between neighbours, where
# best_index_int8's float32 `x - lo < hi - x` decides a tie (for the upper level).
_IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float64)
_IQ4_GRID = np.concatenate([_IQ4_LEVELS, (_IQ4_LEVELS[:-1] + _IQ4_LEVELS[1:]) / 2])


def _iq4_grid(rng, rows, n):
  """32-element groups on IQ4's level grid times a power of two: exact level hits and exact ties.

  Group g leads with its first absolute maximum m = sign * 127 * 2**e; the rest are +-sign * 2**e times a
  level or a midpoint between levels. ggml's first trial (inverse scale 1/(m/127)) maps the + groups
  exactly onto the grid, its trial with inverse scale -127/m the - groups. Half the groups hold levels
  only: the - ones are fitted exactly by that trial, so their least-squares scale is exactly
  -sign * 2**e and IQ4_NL's final codes hit levels exactly. Powers of two differ by at most 8 within a
  256-block, so IQ4_XS's 6-bit group scales often snap to exact powers of two, and the final codes of
  its groups holding midpoints are then decided at exact ties.
  """
  g = n // 32
  e = rng.integers(-12, 6, size=(rows, 1, 1)) - rng.integers(0, 4, size=(rows, g, 1))
  sign = np.where(rng.random((rows, g, 1)) < 0.5, -1.0, 1.0)
  orient = np.where(rng.random((rows, g, 1)) < 0.5, -1.0, 1.0)
  pick = rng.integers(0, _IQ4_GRID.size, size=(rows, g, 32))
  levels_only = rng.random((rows, g, 1)) < 0.5
  v = orient * sign * _IQ4_GRID[np.where(levels_only, pick % _IQ4_LEVELS.size, pick)]
  v[:, :, :1] = sign * 127.0
  return (v * np.exp2(e)).reshape(rows, n)


KINDS = {
  "gaussian": _gaussian,
  "heavy_tail_outliers": _heavy_tail_outliers,
  "row_scales": _row_scales,
  "special_blocks": _special_blocks,
  "tiny": _tiny,
  "fp16_limit": _fp16_limit,
  "ties": _ties,
  "negative_zero": _negative_zero,
}

# Kinds aimed at one type family. The cross-check runs them for every type (after KINDS, so the inputs of
# the kinds above stay as they were); the kernel goldens take KINDS only, so adding one here leaves the
# existing goldens unchanged.
CROSSCHECK_KINDS = {
  "iq4_grid": _iq4_grid,
}

# Share of the blocks each kind gets. Kinds whose blocks underflow in float32 run on the slower
# exact path; they are kept to a few percent so the default suite stays within its time budget.
SHARES = {
  "gaussian": 0.25,
  "heavy_tail_outliers": 0.20,
  "row_scales": 0.12,
  "special_blocks": 0.15,
  "tiny": 0.03,
  "fp16_limit": 0.08,
  "ties": 0.09,
  "negative_zero": 0.08,
  "iq4_grid": 0.05,
}


def imatrix_for(rng, n, kind_index: int):
  """Importance weights: squared gaussian, with 30 % zeros (and 10 % of 32-column groups all zero: the
  weighted sums of a group's search are then 0), or heavy-tailed (log-normal)."""
  variant = kind_index % 3
  if variant == 0:
    w = rng.standard_normal(n) ** 2
  elif variant == 1:
    w = rng.standard_normal(n) ** 2
    w[rng.random(n) < 0.3] = 0.0
    w.reshape(-1, 32)[rng.random(n // 32) < 0.1] = 0.0
  else:
    w = rng.lognormal(0.0, 3.0, size=n)
  return w.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str
  seed: int
  x: np.ndarray  # float32 [rows, n]
  imatrix: np.ndarray | None


def cases(total_elems: int, seed: int, with_imatrix: bool):
  """Yields cases covering every kind and width until `total_elems` elements are produced."""
  rng = np.random.default_rng(seed)
  for ki, (kind, share) in enumerate(SHARES.items()):
    budget = int(total_elems * share)
    wi = ki
    while budget > 0:
      n = WIDTHS[wi % len(WIDTHS)]
      wi += 1
      rows = max(1, min(budget // n, (1 << 19) // n))
      case_seed = int(rng.integers(1 << 31))
      crng = np.random.default_rng(case_seed)
      x = (KINDS | CROSSCHECK_KINDS)[kind](crng, rows, n).astype(np.float32)
      im = imatrix_for(crng, n, wi) if with_imatrix else None
      budget -= rows * n
      yield Case(kind, case_seed, x, im)
