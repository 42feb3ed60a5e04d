"""Routing-aware judging (dq3jax/compare/routing.py): decision gaps and which expert flips they explain."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dq3jax.compare import routing


def select(scores: np.ndarray, spec: routing.RouterSpec) -> np.ndarray:
  """Brute-force noaux_tc selection [T, K] (sorted ids), written independently of routing.py: enumerate the
  allowed group subsets, keep the best by summed group score, then the best K experts in them."""
  t, e = scores.shape
  per = e // spec.n_group
  out = []
  for s in scores:
    gscore = [sorted(s[g * per : (g + 1) * per])[-2:] for g in range(spec.n_group)]
    gscore = [sum(x) for x in gscore]
    best = max(
      itertools.combinations(range(spec.n_group), spec.topk_group),
      key=lambda gs: sorted((gscore[g] for g in gs), reverse=True),
    )
    allowed = [x for g in best for x in range(g * per, (g + 1) * per)]
    chosen = sorted(allowed, key=lambda x: -s[x])[: spec.top_k]
    out.append(sorted(chosen))
  return np.array(out)


def test_expert_gap_without_groups():
  spec = routing.RouterSpec(top_k=2)
  scores = np.array([[0.9, 0.5, 0.45, 0.1], [0.2, 0.8, 0.79, 0.7]])
  np.testing.assert_allclose(routing.decision_margins(scores, spec), [0.05, 0.09])


def test_group_gap_is_the_smaller_decision():
  # 4 groups of 2; group sums 1.0, 0.99, 0.5, 0.2: the group decision (top 2 of 4) has gap 0.49, the expert
  # decision inside groups 0 and 1 (0.6, 0.4, 0.59, 0.4: top 2 = 0.6, 0.59 vs 0.4) has gap 0.19.
  spec = routing.RouterSpec(top_k=2, n_group=4, topk_group=2)
  scores = np.array([[0.6, 0.4, 0.59, 0.4, 0.3, 0.2, 0.1, 0.1]])
  np.testing.assert_allclose(routing.decision_margins(scores, spec), [0.19])
  scores2 = np.array([[0.6, 0.4, 0.1, 0.1, 0.3, 0.2, 0.05, 0.05]])  # groups 1.0, 0.2, 0.5, 0.1: gap 0.3
  np.testing.assert_allclose(routing.decision_margins(scores2, spec), [0.1])


@pytest.mark.parametrize(
  "spec",
  [routing.RouterSpec(top_k=4, n_group=4, topk_group=2), routing.RouterSpec(top_k=2)],
  ids=["groups", "flat"],
)
def test_a_perturbation_flips_a_selection_only_where_the_gap_is_within_four_eps(spec):
  rng = np.random.default_rng(0)
  e = 16 if spec.n_group > 1 else 6
  scores = rng.random((4000, e))
  base = select(scores, spec)
  margins = routing.decision_margins(scores, spec)
  eps = 0.01
  moved = select(scores + rng.uniform(-eps, eps, scores.shape), spec)
  flipped = np.any(base != moved, axis=1)
  assert flipped.sum() > 20  # the property is exercised
  assert np.all(margins[flipped] <= 4 * eps), margins[flipped].max()
  # every flip is explained at tie gap 4 eps (the swapped experts sit near their decision)
  f = routing.classify(base, moved, scores, spec, tie_gap=4 * eps)
  assert np.array_equal(f.differs, flipped) and not f.decisive.any()


def test_classify_explained_and_decisive():
  spec = routing.RouterSpec(top_k=2)
  scores = np.array(
    [
      [0.9, 0.500, 0.4999, 0.1],  # experts 1 and 2 tied
      [0.9, 0.500, 0.4999, 0.1],
      [0.9, 0.5, 0.2, 0.1],
    ]
  )
  golden = np.array([[0, 1], [0, 1], [0, 1]])
  cand = np.array(
    [
      [0, 2],  # swaps the tied pair: explained
      [3, 1],  # near-tie at this token, but swaps expert 0 for 3, far from the boundary
      [0, 2],
    ]
  )  # gap 0.3: decisive
  f = routing.classify(golden, cand, scores, spec, tie_gap=1e-3)
  assert f.differs.tolist() == [True, True, True]
  assert f.explained.tolist() == [True, False, False]
  assert f.decisive.tolist() == [False, True, True]
  # Without the golden's scores nothing can be explained.
  f = routing.classify(golden, cand, None, None, tie_gap=1e-3)
  assert f.decisive.tolist() == [True, True, True]
  # The order of ids does not matter.
  assert not routing.classify(golden, golden[:, ::-1], scores, spec, 0.0).differs.any()


def test_group_near_tie_explains_only_experts_of_near_groups():
  spec = routing.RouterSpec(top_k=2, n_group=4, topk_group=2)
  # groups (sum of two best): 1.0, 0.9999, 0.99989 (near-tied with group 1), 0.2
  scores = np.array([[0.6, 0.4, 0.5, 0.4999, 0.5, 0.49989, 0.1, 0.1]] * 2)
  golden = np.array([[0, 2], [0, 2]])
  cand = np.array(
    [
      [0, 4],  # group 2 instead of group 1: explained
      [0, 6],
    ]
  )  # group 3 is far from selection: decisive
  f = routing.classify(golden, cand, scores, spec, tie_gap=1e-3)
  assert f.explained.tolist() == [True, False] and f.decisive.tolist() == [False, True]
