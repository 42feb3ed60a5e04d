"""Routing-aware judging: which expert flips a candidate may make, and which it may not.

A DeepSeek-V3 router picks, per token, the top-K experts by biased score (sigmoid(router x) +
e_score_correction_bias) inside the `topk_group` best groups (a group's score is the sum of its two best
experts). Two correct engines compute those scores with different rounding, so where two candidates are
nearly tied they may pick differently, and a flipped expert moves that token's hidden state far more than
any rounding does. The golden records the scores (`blk.{i}.router_scores` [T, E]), so every decision's
*margin* is known:

  expert gap  the K-th best eligible score minus the (K+1)-th (eligible: in a selected group);
  group gap   the topk_group-th best group score minus the next one (only with group-limited routing).

If each score moves by at most e, an expert gap moves by at most 2e and a group gap (two scores each) by at
most 4e, so the selection can only change where a gap is that small. A flip where the golden's smallest gap
is within the profile's `router_tie_gap` is *explained* (rounding can cause it); a flip at a larger gap is
*decisive*: no rounding of a correct engine moves a score that far, so it is a failure (a wrong gating
function, a bias ignored, a group limit ignored, a wrong scale upstream).

Everything here is numpy over the golden's float32 scores; the selection is recomputed in float64 from them
only to find the gaps (ties between exactly equal float32 scores count as a zero gap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterSpec:
  """The routing hyper-parameters a margin depends on (from the golden's model config)."""

  top_k: int  # num_experts_per_tok
  n_group: int = 1
  topk_group: int = 1

  @classmethod
  def from_hf_config(cls, config: Mapping) -> RouterSpec:
    return cls(
      top_k=int(config["num_experts_per_tok"]),
      n_group=int(config.get("n_group") or 1),
      topk_group=int(config.get("topk_group") or 1),
    )


def _gap(sorted_desc: np.ndarray, k: int) -> np.ndarray:
  """sorted_desc [T, N] descending: the k-th minus the (k+1)-th value (inf where there is no (k+1)-th)."""
  if k >= sorted_desc.shape[1]:
    return np.full(sorted_desc.shape[0], np.inf)
  return sorted_desc[:, k - 1] - sorted_desc[:, k]


@dataclasses.dataclass(frozen=True)
class _Decisions:
  expert_gap: np.ndarray  # [T] K-th minus (K+1)-th eligible score
  group_gap: np.ndarray  # [T] topk_group-th minus next group score (inf without group-limited routing)
  expert_dist: np.ndarray  # [T, E] |score - the K/K+1 boundary| for eligible experts, inf for the others
  group_slack: (
    np.ndarray
  )  # [T, E] how far below the topk_group-th group score the expert's group is (<= 0: selected)


def _analyse(scores: np.ndarray, spec: RouterSpec) -> _Decisions:
  s = np.asarray(scores, np.float64)
  t, e = s.shape
  group_gap = np.full(t, np.inf)
  group_slack = np.zeros((t, e))
  eligible = s
  if spec.n_group > 1:
    if e % spec.n_group:
      raise ValueError(f"router_scores has {e} experts, not a multiple of n_group {spec.n_group}")
    per = e // spec.n_group
    grouped = s.reshape(t, spec.n_group, per)  # [T, G, E/G]
    group_score = (-np.sort(-grouped, axis=-1)[..., :2]).sum(-1)  # [T, G]: sum of each group's two best
    ranked_groups = -np.sort(-group_score, axis=-1)
    kth = ranked_groups[:, spec.topk_group - 1 : spec.topk_group]  # [T, 1]
    group_gap = _gap(ranked_groups, spec.topk_group)
    group_slack = np.repeat(kth - group_score, per, axis=-1)
    eligible = np.where((group_score >= kth)[:, :, None], grouped, -np.inf).reshape(t, e)
  ranked = -np.sort(-eligible, axis=-1)
  expert_gap = _gap(ranked, spec.top_k)
  if spec.top_k < e:
    cut = 0.5 * (ranked[:, spec.top_k - 1] + ranked[:, spec.top_k])
    expert_dist = np.where(np.isfinite(eligible), np.abs(s - cut[:, None]), np.inf)
  else:
    expert_dist = np.zeros((t, e))
  return _Decisions(expert_gap, group_gap, expert_dist, group_slack)


def decision_margins(scores: np.ndarray, spec: RouterSpec) -> np.ndarray:
  """The smallest decision gap per token [T] of noaux_tc selection over biased scores [T, E]."""
  d = _analyse(scores, spec)
  return np.minimum(d.expert_gap, d.group_gap)


@dataclasses.dataclass(frozen=True)
class Flips:
  """Per token [T] of one MoE layer: whether the candidate's expert set differs, and how that is judged."""

  differs: np.ndarray  # bool [T]
  margins: np.ndarray  # float64 [T]: the golden's smallest decision gap
  explained: np.ndarray  # bool [T]: differs at a gap within the tie bound
  decisive: np.ndarray  # bool [T]: differs at a larger gap

  def describe(self, tokens: np.ndarray, limit: int = 4) -> str:
    parts = [f"token {int(t)} (gap {self.margins[t]:.2g})" for t in tokens[:limit]]
    more = f", ... ({tokens.size} in all)" if tokens.size > limit else ""
    return ", ".join(parts) + more


def set_differs(g_ids: np.ndarray, c_ids: np.ndarray) -> np.ndarray:
  """[T] whether the selected expert sets differ (order ignored)."""
  return np.any(np.sort(np.asarray(g_ids), -1) != np.sort(np.asarray(c_ids), -1), axis=-1)


def classify(
  g_ids: np.ndarray, c_ids: np.ndarray, scores: np.ndarray | None, spec: RouterSpec | None, tie_gap: float
) -> Flips:
  """Judge each token's expert set against the golden's. A differing set is explained only if the golden's
  smallest gap there is within tie_gap *and* the candidate's set is one a near-tie can produce: where the
  group decision is near-tied, every chosen expert lies in a group within tie_gap of selection (any of those
  groups may win, and the experts then follow from them); otherwise every expert swapped in or out sits within
  tie_gap of the K-th/(K+1)-th boundary. Without the golden's scores every flip is decisive."""
  g_ids, c_ids = np.asarray(g_ids, np.int64), np.asarray(c_ids, np.int64)
  differs = set_differs(g_ids, c_ids)
  if scores is None or spec is None:
    margins = np.full(differs.shape, np.inf)
    return Flips(differs=differs, margins=margins, explained=np.zeros_like(differs), decisive=differs)
  d = _analyse(scores, spec)
  margins = np.minimum(d.expert_gap, d.group_gap)
  t, e = d.expert_dist.shape
  in_range = np.all((c_ids >= 0) & (c_ids < e), axis=-1)
  c_safe = np.clip(c_ids, 0, e - 1)
  rows = np.arange(t)[:, None]
  g_mask = np.zeros((t, e), bool)
  c_mask = np.zeros((t, e), bool)
  g_mask[rows, g_ids] = True
  c_mask[rows, c_safe] = True
  swapped = g_mask ^ c_mask
  experts_near = np.all(~swapped | (d.expert_dist <= tie_gap), axis=-1)
  groups_near = np.all(d.group_slack[rows, c_safe] <= tie_gap, axis=-1)
  near = np.where(d.group_gap <= tie_gap, groups_near, experts_near)
  explained = differs & (margins <= tie_gap) & near & in_range
  return Flips(differs=differs, margins=margins, explained=explained, decisive=differs & ~explained)
