"""Undecided points (dq3jax.model.undecided): float64 values too close to a float32 rounding midpoint, and
router decisions too close to a tie, for another evaluation order to be sure of the same result.

- The predicates: near a midpoint (relative to the row's scale) is flagged, exactly on it or far from it is
  not; router gaps likewise.
- The tally: an activation whose float32 neighbour would change its Q8 code is counted at its token, one
  whose code would not change is not; router near-ties are counted per decision kind; forced rows are not.
- The margin has headroom: the float64 difference between two evaluation orders of the same model (full
  pass vs incremental decoding, expanded vs absorbed attention) stays far below it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dq3jax.model import act_quant, moe, random_init, runner, undecided
from dq3jax.model.mla import AttnForm


def _midpoint(v: float) -> float:
  a = np.float32(v)
  return (float(a) + float(np.nextafter(a, np.float32(np.inf)))) / 2


def test_f32_undecided_is_relative_to_the_row_scale():
  m = _midpoint(0.1)
  row = np.array([m, np.nextafter(m, 1), np.nextafter(m, 0), m + 2.0**-36, 0.0, 0.1, 1.0])
  np.testing.assert_array_equal(
    undecided.f32_undecided(row), [False, True, True, False, False, False, False]
  )  # exactly on the midpoint: a tie that rounds to even everywhere
  # The same offset from a midpoint is undecided next to a large value (the error of a reduction is
  # absolute), decided in a row of its own size.
  small = _midpoint(1e-3) + 2.0**-50
  assert undecided.f32_undecided(np.array([small, 1e3]))[0]
  assert not undecided.f32_undecided(np.array([small, 1e-3]))[0]
  with jax.enable_x64(True):
    on_device = np.asarray(undecided.f32_undecided(jnp.asarray(row)))
    np.testing.assert_array_equal(on_device, undecided.f32_undecided(row))
    near, alt = undecided.f32_alternative(jnp.asarray(row))
    flipped = np.asarray(near) != np.asarray(alt)
  np.testing.assert_array_equal(flipped, undecided.f32_undecided(row))
  assert undecided.gap_undecided(np.float64(0.5), np.float64(0.5))
  assert not undecided.gap_undecided(0.5, 0.4999)


def _counts(fn, x, batch=1):
  """Runs fn(x) under a tally of len(x) query tokens; returns its counts (numpy)."""
  with jax.enable_x64(True):

    def run(x):
      tally = undecided.Tally(batch, jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[1])
      with undecided.collecting(tally):
        y = fn(x)
      return y, tally.counts

    y, counts = jax.jit(run)(jnp.asarray(x))
    return np.asarray(y), {k: np.asarray(v) for k, v in counts.items()}


def test_an_activation_is_undecided_only_if_its_quantization_could_change():
  # One Q8_0 block whose amax is 127 (scale 1, codes = rint(x)): 0.5 - tiny rounds to float32 0.5 (code 0,
  # half to even) but its other neighbour 0.5 + 2^-24 has code 1; 0.25 + tiny has no code boundary near.
  x = np.zeros((1, 3, 32))
  x[..., 0] = 127.0
  x[0, 1, 1] = np.nextafter(_midpoint(0.5), 0)
  x[0, 2, 1] = np.nextafter(_midpoint(0.25), 0)
  y, counts = _counts(lambda v: act_quant.rounded(v, "Q8_0", "act.test"), x)
  np.testing.assert_array_equal(counts["act.test"], [[0, 1, 0]])
  assert y[0, 1, 1] == 0.0 and y.dtype == np.float64
  _, f16 = _counts(lambda v: act_quant.rounded(v, "F16", "act.test"), x)
  np.testing.assert_array_equal(f16["act.test"], [[0, 0, 0]])  # both neighbours give the same fp16 value


def test_router_near_ties_are_counted_per_decision():
  cfg = random_init.tiny_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
  inf = -np.inf
  masked = np.array(
    [
      [0.9, 0.8, 0.1, 0.0, inf, inf, inf, inf],  # clear
      [0.9, 0.8, 0.8, 0.0, inf, inf, inf, inf],  # 2nd vs 3rd tied: top-k undecided
      [0.9, 0.9, 0.1, 0.0, inf, inf, inf, inf],  # 1st vs 2nd tied: order undecided
      [0.9, 0.8, 0.8, 0.0, inf, inf, inf, inf],  # tied but forced
    ]
  )
  group = np.array([[2.0, 1.0, 0.5, 0.1], [2.0, 1.0, 1.0, 0.1], [2.0, 1.0, 0.5, 0.1], [2.0, 1.0, 0.5, 0.1]])
  r = moe.Routing(
    ids=jnp.zeros((4, 2), jnp.int32), weights=jnp.zeros((4, 2)), choice=jnp.asarray(masked),
    masked=jnp.asarray(masked), group_score=jnp.asarray(group),
    forced=jnp.asarray([False, False, False, True]),
  )  # fmt: skip
  got = {k: np.asarray(v).tolist() for k, v in moe.undecided_choices(r, cfg).items()}
  assert got == {
    "router.topk": [False, True, False, False],
    "router.order": [False, False, True, False],
    "router.group": [False, True, False, False],
  }


def test_evaluate_reports_counts_per_layer_and_token():
  cfg = random_init.tiny_config()
  params = random_init.init_params(cfg, 4)
  # Two identical experts in the same group: their biased scores tie exactly, so wherever they meet the
  # top-k boundary or each other the decision is undecided.
  for i in range(1, cfg.num_hidden_layers):
    mlp = params["layers"][i]["mlp"]
    mlp["router"][1] = mlp["router"][0]
    mlp["router_bias"][1] = mlp["router_bias"][0]
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 16))
  ev = runner.evaluate(params, tokens, cfg, decode_from=12)
  assert set(ev.undecided) >= {f"blk.{i}.router.{k}" for i in (1, 2) for k in ("topk", "order", "group")}
  _, inter = runner.logits_and_intermediates(params, tokens, cfg, dtype="float64")
  for i in (1, 2):
    ids = inter[i]["topk_ids"][0]
    sel = np.array([(0 in row) != (1 in row) for row in ids])  # one selected, the other not
    order = np.array([(0 in row) and (1 in row) for row in ids])
    # The tied pair can only split across the top-k boundary as the K-th / (K+1)-th candidates.
    assert np.all(ev.undecided[f"blk.{i}.router.topk"][0][sel] == 1), i
    assert np.all(ev.undecided[f"blk.{i}.router.order"][0][order] == 1), i
  for kind, c in ev.undecided.items():
    assert c.shape == (1, 16), kind
  assert all(c[:, :12].sum() == 0 for c in ev.decode_undecided.values())  # decode counts positions 12..


def test_the_margin_covers_other_evaluation_orders_with_room():
  cfg = random_init.tiny_config()
  params = random_init.init_params(cfg, 6)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
  ev = runner.evaluate(params, tokens, cfg, decode_from=6)
  others = {
    "absorbed": runner.logits(params, tokens, cfg, dtype="float64", form=AttnForm.ABSORBED),
    "whole-model jit": runner.logits(params, tokens, cfg, dtype="float64"),
  }
  worst = {k: np.abs(v - ev.logits).max(-1) / np.abs(ev.logits).max(-1) for k, v in others.items()}
  worst["decode"] = np.abs(ev.decode_logits - ev.logits[:, 6:]).max(-1) / np.abs(ev.logits[:, 6:]).max(-1)
  for name, w in worst.items():
    assert w.max() < undecided.REL_MARGIN / 16, (name, np.log2(w.max()))
