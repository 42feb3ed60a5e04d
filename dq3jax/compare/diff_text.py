"""How `dq3jax diff` writes numbers and lists of tensor names in its rows, notes and report."""

from __future__ import annotations

import math
from collections.abc import Sequence


def sig3(x) -> str:
  """x to 3 significant digits; '-' for None, a non-finite float as Python prints it."""
  if x is None:
    return "-"
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return f"{x:.3g}"


def name_list(names: Sequence[str], limit: int = 20) -> str:
  """names joined by commas, at most `limit` of them, and how many in all when more."""
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
