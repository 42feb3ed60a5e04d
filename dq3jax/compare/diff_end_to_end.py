"""Judging a model-outputs golden end to end: each tensor the candidate supplied against the golden, expert
flips (with the golden recomputed at explained ones) and the first (layer, tensor, token) that departs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from dq3jax.compare import dumps, logit_stats, metrics, recompute, routing
from dq3jax.compare.diff_kinds import (
  BLK_NAME,
  LAYER_STAGES,
  TensorKind,
  golden_tokens,
  layer_numbers,
  row_order,
  tensor_kind,
)
from dq3jax.compare.diff_rows import Row, floats_row, input_row, ints_row
from dq3jax.compare.diff_rows_logits import logits_row
from dq3jax.compare.diff_rows_router import router_ids_row, router_weights_row
from dq3jax.compare.diff_thresholds import Thresholds
from dq3jax.compare.dumps import BadInput, Golden


def compare_model_outputs(
  golden: Golden,
  gt: Mapping[str, np.ndarray],
  m: dumps.Matched,
  thr: Thresholds,
  flips: Mapping[int, routing.Flips],
  recomputed: bool,
  cand_path: str,
) -> tuple[list[Row], list[str]]:
  """Rows for a model-outputs golden. gt: the golden's tensors, recomputed with the candidate's experts at
  explained flips when `recomputed`; flips: per MoE layer the judged expert sets (against the original)."""
  tokens, prefill = golden_tokens(golden)
  notes: list[str] = []
  rows = []
  for name in sorted(gt, key=row_order):
    if name not in m.tensors:
      continue
    g, c = np.asarray(gt[name]), m.tensors[name]
    k = tensor_kind(golden.kind, name, g)
    if k is TensorKind.INPUT:
      row = input_row(name, g, c, cand_path)
    elif k is TensorKind.LOGITS:
      if g.ndim != 2:
        raise BadInput(f"{golden.dump.path}: {name!r} is {list(g.shape)}, expected [positions, vocab]")
      if not np.isfinite(g).all():
        raise BadInput(f"{golden.dump.path}: golden {name!r} has non-finite values")
      nxt = None
      if tokens is not None and name == "logits" and tokens.size == g.shape[0]:
        nxt = tokens[1:]
      elif (
        tokens is not None
        and name == "decode_logits"
        and prefill is not None
        and prefill + g.shape[0] == tokens.size
      ):
        nxt = tokens[prefill + 1 :]
      elif tokens is not None:
        notes.append(f"{name}: positions do not line up with tokens; Δp not computed")
      row = logits_row(name, g, c, nxt, thr)
    elif k is TensorKind.ROUTER_IDS:
      layer = int(BLK_NAME.match(name).group(1))
      row = router_ids_row(name, flips[layer], np.asarray(golden.dump.tensors[name]), c, thr, recomputed)
    elif k is TensorKind.ROUTER_WEIGHTS:
      ids = name.removesuffix("topk_weights") + "topk_ids"
      row = router_weights_row(name, g, c, gt.get(ids), m.tensors.get(ids), thr)
    elif k is TensorKind.FLOATS:
      row = floats_row(name, g, c, thr.intermediate_nmse)
    else:
      row = ints_row(name, g, c)
    rows.append(dataclasses.replace(row, note=m.notes.get(name, "")))
  return rows, notes


def first_beyond(
  layer: int | None, tensor: str, per: np.ndarray, bound: float, metric: str, or_worst: bool = False
) -> dict | None:
  """The first-divergence record for the first token whose per-token value is beyond the bound (NaN is); with
  or_worst, the worst token when none is (a stage out of bounds as a whole); else None."""
  out = np.flatnonzero(~(per <= bound))
  if not out.size:
    if not or_worst:
      return None
    out = np.array([int(np.argmax(np.where(np.isnan(per), np.inf, per)))])
  t = int(out[0])
  return {
    "layer": layer,
    "tensor": tensor,
    "token": t,
    "metric": metric,
    "value": float(per[t]),
    "bound": bound,
  }


def first_divergence(
  gt: Mapping[str, np.ndarray], m: dumps.Matched, thr: Thresholds, flips: Mapping[int, routing.Flips]
) -> dict | None:
  """The first (layer, tensor, token) whose per-token metric leaves its bound, in the order values are computed.

  Layers 0..L-1, within a layer attn_latent, hidden_after_attn, topk_ids, hidden_after_mlp; per token the
  NMSE of that token's row (a decisive expert flip, for topk_ids); after the last layer, the logits'
  per-token KLD. Only tensors the candidate supplied are walked; gt is the (possibly recomputed) golden.
  """
  for layer in layer_numbers(gt):
    for stage in LAYER_STAGES:
      name = f"blk.{layer}.{stage}"
      if name not in gt or name not in m.tensors:
        continue
      g, c = np.asarray(gt[name]), m.tensors[name]
      if stage == "topk_ids":
        per = flips[layer].decisive.astype(np.float64)
        bound, metric = 0.0, "decisive expert flip"
      else:
        per = metrics.nmse_rows(g.reshape(g.shape[0], -1), c.reshape(c.shape[0], -1))
        bound, metric = thr.intermediate_nmse, "per-token NMSE"
      found = first_beyond(layer, name, per, bound, metric)
      if found is not None:
        return found
  if "logits" in m.tensors:
    g, c = np.asarray(gt["logits"]), m.tensors["logits"]
    if np.isfinite(c).all():
      per = logit_stats.per_position_kld(g, c)
    else:
      per = np.where(np.isfinite(c).all(-1), 0.0, np.inf)
    return first_beyond(None, "logits", per, thr.logits_mean_kld, "per-token KLD")
  return None


def judge_routing(
  golden: Golden, m: dumps.Matched, thr: Thresholds, notes: list[str], allow_recompute: bool = True
) -> tuple[Mapping[str, np.ndarray], dict[int, routing.Flips], bool]:
  """Classify the candidate's expert sets layer by layer; where flips are explained, recompute the golden with
  the candidate's experts there (repeating, since a forced choice changes later layers' scores) so everything
  downstream is judged against what the golden model gives after the same choices.

  Returns (golden tensors to judge against, flips per MoE layer against the original golden, recomputed)."""
  gt: Mapping[str, np.ndarray] = golden.dump.tensors
  layers = [i for i in layer_numbers(gt) if f"blk.{i}.topk_ids" in gt and f"blk.{i}.topk_ids" in m.tensors]
  if not layers:
    return gt, {}, False
  spec = recompute.router_spec(golden)
  forced: dict[int, np.ndarray] = {}  # layer -> [T, K] candidate ids at explained flips, -1 elsewhere
  explained_gap: dict[int, np.ndarray] = {}  # layer -> [T] the golden gap at which each override was made
  can_recompute = allow_recompute and recompute.available(golden)
  recomputed = False

  def classify_all(stop_at_explained: bool) -> tuple[dict[int, routing.Flips], int | None]:
    flips = {}
    for i in layers:
      f = routing.classify(
        gt[f"blk.{i}.topk_ids"],
        m.tensors[f"blk.{i}.topk_ids"],
        gt.get(f"blk.{i}.router_scores"),
        spec,
        thr.router_tie_gap,
      )
      flips[i] = f
      if stop_at_explained and f.explained.any():
        return flips, i
    return flips, None

  for _ in range(4 * len(layers) + 4):  # each round forces at least one more position
    if not can_recompute:
      break
    flips, at = classify_all(stop_at_explained=True)
    if at is None:
      break
    f, c_ids = flips[at], np.asarray(m.tensors[f"blk.{at}.topk_ids"])
    over = forced.setdefault(at, np.full(c_ids.shape, -1, np.int64))
    gaps = explained_gap.setdefault(at, np.full(f.differs.shape, np.inf))
    over[f.explained] = c_ids[f.explained]
    gaps[f.explained] = f.margins[f.explained]
    # later layers are judged only after recomputing with this layer's choices
    gt = recompute.with_experts(golden, forced)
    recomputed = True
  flips, _ = classify_all(stop_at_explained=False)
  # Report every flip against the original golden: overridden positions were explained at their gap.
  out = {}
  for i, f in flips.items():
    if i in forced:
      was = forced[i][:, 0] >= 0
      margins = np.where(was, explained_gap[i], f.margins)
      out[i] = routing.Flips(
        differs=f.differs | was, margins=margins, explained=f.explained | was, decisive=f.decisive & ~was
      )
    else:
      out[i] = f
  if spec is None:
    notes.append("the golden has no router config: every expert flip counts as decisive")
  elif any(f.explained.any() for f in out.values()) and not recomputed and allow_recompute:
    notes.append(
      "explained expert flips, but the golden cannot be recomputed here (no GGUF listed in its "
      "manifest): tensors downstream of them are judged against the unforced golden"
    )
  return gt, out, recomputed
