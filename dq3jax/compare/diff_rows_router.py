"""The rows of a layer's routing: its expert sets (topk_ids, decisive flips only) and their weights."""

from __future__ import annotations

import numpy as np

from dq3jax.compare import metrics, routing
from dq3jax.compare.diff_kinds import TensorKind
from dq3jax.compare.diff_rows import Row, Status, floats_row
from dq3jax.compare.diff_text import sig3
from dq3jax.compare.diff_thresholds import Thresholds


def router_ids_row(
  name: str, flips: routing.Flips, g: np.ndarray, c: np.ndarray, thr: Thresholds, recomputed: bool
) -> Row:
  """Expert sets: only decisive flips count against the bound; explained ones are listed."""
  n = int(flips.differs.size)
  k_all, k_bad = int(flips.differs.sum()), int(flips.decisive.sum())
  frac = k_bad / n if n else 0.0
  summary = f"expert set differs at {k_all} of {n} positions"
  m: dict = {
    "positions": n,
    "positions_differ": k_all,
    "positions_decisive": k_bad,
    "fraction_decisive": frac,
    "positions_explained": int(flips.explained.sum()),
  }
  if k_all:
    finite = flips.margins[flips.differs & np.isfinite(flips.margins)]
    m["golden_gaps_at_flips"] = [float(x) for x in finite]
  if flips.explained.any():
    ex = np.flatnonzero(flips.explained)
    summary += (
      f"; {ex.size} explained (golden gap <= {sig3(thr.router_tie_gap)}, a near-tie rounding can "
      f"cross): {flips.describe(ex)}"
    )
    if recomputed:
      summary += "; downstream judged against the golden recomputed with the candidate's experts there"
  if k_bad:
    t = int(np.argmax(flips.decisive))
    m["first"] = {
      "token": t,
      "golden": g[t].tolist(),
      "candidate": c[t].tolist(),
      "golden_gap": float(flips.margins[t]),
    }
    gap = (
      "no router scores in the golden"
      if not np.isfinite(flips.margins[t])
      else f"golden gap {sig3(float(flips.margins[t]))}"
    )
    summary += (
      f"; {k_bad} DECISIVE, first at token {t}: golden {sorted(g[t].tolist())}, candidate "
      f"{sorted(c[t].tolist())} ({gap})"
    )
  return Row(
    name,
    TensorKind.ROUTER_IDS,
    Status.PASS if frac <= thr.router_max_set_mismatch else Status.FAIL,
    summary,
    f"decisive flips <= {sig3(thr.router_max_set_mismatch)} of positions; tie gap {sig3(thr.router_tie_gap)}",
    m,
  )


def router_weights_row(
  name: str, g: np.ndarray, c: np.ndarray, g_ids: np.ndarray | None, c_ids: np.ndarray | None, thr: Thresholds
) -> Row:
  """Expert weights: NMSE by expert id where both chose the same set (golden's order without ids)."""
  if g_ids is None or c_ids is None:
    # Without the candidate's ids the weights can only be compared in the golden's order.
    return floats_row(
      name,
      g,
      c,
      thr.router_weights_nmse,
      TensorKind.ROUTER_WEIGHTS,
      extra=" (in the golden's order: the candidate supplied no topk_ids)",
    )
  same = ~metrics.topk_set_differs(g_ids, c_ids)
  if not same.any():
    return Row(
      name,
      TensorKind.ROUTER_WEIGHTS,
      Status.FAIL,
      "no position selects the same expert set",
      f"NMSE <= {sig3(thr.router_weights_nmse)}",
      {"positions_compared": 0},
    )
  gw = metrics.weights_by_expert(g_ids, g)[same]
  cw = metrics.weights_by_expert(c_ids, c)[same]
  return floats_row(
    name,
    gw,
    cw,
    thr.router_weights_nmse,
    TensorKind.ROUTER_WEIGHTS,
    extra=f" (over the {int(same.sum())} of {same.size} positions with the same expert set, by expert id)",
    extra_metrics={"positions_compared": int(same.sum())},
  )
