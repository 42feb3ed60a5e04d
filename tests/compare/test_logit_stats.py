"""dq3jax.compare.logit_stats against answers worked out by hand and against a float64 re-implementation of
llama.cpp's `llama-perplexity --kl-divergence` statistics (tools/perplexity/perplexity.cpp, read at 050fc7f).

The re-implementation below follows perplexity.cpp's definitions, written out independently of the module:
- per position it computes log-softmax as logit - max - log(sum exp(logit - max)), the KL divergence
  sum_i p_base(i) (log p_base(i) - log p_Q(i)), the argmax of both rows (first maximum on ties, as the
  strict `>` scans do), NLL of the next token under both and Δp = p_Q(next) - p_base(next);
- it accumulates plain sums as `kl_divergence_result` does (sum, sum of squares, sum of NLL products,
  sum of Δp^4) and turns them into means and standard errors of the mean like the `mean_and_uncertainty`
  lambda: sqrt((sum2/n - mean^2) / (n - 1)), 0 unless that is positive and n > 10; the covariance of the
  two NLLs like the `covariance` lambda: (sum_ab/n - mean_a mean_b) / (n - 1), 0 for n < 10;
- percentiles are the `percentile` lambda's linear interpolation at fraction * (n - 1) between sorted
  values (numpy's default `linear` quantile, which the test also checks), the median the mean of the two
  middle values for even n.
Deliberate differences of the module, not tested against llama.cpp's values: llama.cpp keeps the base
log-probabilities as 16-bit codes, drops terms with log p_base <= -16 and computes in float32.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from dq3jax.compare import logit_stats as ls

LN2 = math.log(2.0)

# llama-perplexity's printed percentiles, top to bottom (perplexity.cpp's kl_divergence()).
LLAMA_KLD_FRACTIONS = {"99.9": 0.999, "99.0": 0.990, "95.0": 0.950, "90.0": 0.900}
LLAMA_KLD_FRACTIONS_LOW = {"10.0": 0.100, "5.0": 0.050, "1.0": 0.010, "0.1": 0.001}
LLAMA_DP_FRACTIONS = {"99.9": 0.999, "99.0": 0.990, "95.0": 0.950, "90.0": 0.900, "75.0": 0.750}
LLAMA_DP_FRACTIONS_LOW = {"25.0": 0.250, "10.0": 0.100, "5.0": 0.050, "1.0": 0.010, "0.1": 0.001}
KLD_KEYS = ("max", *LLAMA_KLD_FRACTIONS, "median", *LLAMA_KLD_FRACTIONS_LOW, "min")
DP_KEYS = ("max", *LLAMA_DP_FRACTIONS, "median", *LLAMA_DP_FRACTIONS_LOW, "min")


# ---------------------------------------------------------------------------------------------------------
# The float64 re-implementation of perplexity.cpp's statistics.


def ref_log_softmax(row: np.ndarray) -> np.ndarray:
  """log-probabilities of one row of logits [V], perplexity.cpp's way (max subtracted, log of the sum)."""
  row = np.asarray(row, np.float64)
  m = row.max()
  return row - m - math.log(float(np.exp(row - m).sum()))


def ref_first_argmax(row: np.ndarray) -> int:
  """Index of the first maximum, as a scan that only moves on a strictly larger value finds it."""
  return int(np.flatnonzero(row == row.max())[0])


def ref_kld(base_row: np.ndarray, q_row: np.ndarray) -> float:
  """KL(base || Q) of one position: sum_i p_base(i) (log p_base(i) - log p_Q(i)), every term summed."""
  lb, lq = ref_log_softmax(base_row), ref_log_softmax(q_row)
  return float(sum(math.exp(x) * (x - y) for x, y in zip(lb.tolist(), lq.tolist(), strict=True)))


def ref_mean_and_unc(total: float, total2: float, count: int) -> tuple[float, float]:
  if count < 1:
    return 0.0, 0.0
  f = total / count
  df = total2 / count - f * f
  return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def ref_covariance(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
  if count < 10:
    return 0.0
  return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


def ref_percentile(sorted_values: list[float], fraction: float) -> float:
  if fraction <= 0:
    return sorted_values[0]
  if fraction >= 1:
    return sorted_values[-1]
  p = fraction * (len(sorted_values) - 1)
  ip = math.floor(p)
  p -= ip
  return (1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, len(sorted_values) - 1)]


def ref_median(sorted_values: list[float]) -> float:
  n = len(sorted_values)
  return 0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2]


def ref_summary(values: list[float], high: dict, low: dict) -> dict:
  """max, high percentiles, median, low percentiles, min: llama-perplexity's printed order."""
  s = sorted(values)
  out = {"max": s[-1]}
  out |= {k: ref_percentile(s, f) for k, f in high.items()}
  out["median"] = ref_median(s)
  out |= {k: ref_percentile(s, f) for k, f in low.items()}
  out["min"] = s[0]
  return out


def ref_stats(base: np.ndarray, q: np.ndarray, tokens: np.ndarray | None) -> dict:
  """All statistics of logits q [N, V] against base [N, V], by the definitions above, as a dict keyed like
  LogitStats' fields (fractions, not percent)."""
  n = base.shape[0]
  acc = dict.fromkeys(("nll", "nll2", "nll_b", "nll_b2", "nll_nll_b", "kld", "kld2", "dp", "dp2", "dp4"), 0.0)
  n_same, klds, dps = 0, [], []
  sq_diff = sq_base = max_abs = 0.0
  for i in range(n):
    b, c = np.asarray(base[i], np.float64), np.asarray(q[i], np.float64)
    lb, lq = ref_log_softmax(b), ref_log_softmax(c)
    kld = ref_kld(b, c)
    acc["kld"] += kld
    acc["kld2"] += kld * kld
    klds.append(kld)
    n_same += ref_first_argmax(b) == ref_first_argmax(c)
    sq_diff += float(((c - b) ** 2).sum())
    sq_base += float((b**2).sum())
    max_abs = max(max_abs, float(np.abs(c - b).max()))
    if tokens is not None:
      t = int(tokens[i])
      nll, nll_b = -float(lq[t]), -float(lb[t])
      acc["nll"] += nll
      acc["nll2"] += nll * nll
      acc["nll_b"] += nll_b
      acc["nll_b2"] += nll_b * nll_b
      acc["nll_nll_b"] += nll * nll_b
      dp = math.exp(-nll) - math.exp(-nll_b)
      acc["dp"] += dp
      acc["dp2"] += dp * dp
      acc["dp4"] += dp**4
      dps.append(dp)
  kld_mean, kld_unc = ref_mean_and_unc(acc["kld"], acc["kld2"], n)
  same = n_same / n
  out = {
    "n": n,
    "kld_mean": kld_mean,
    "kld_unc": kld_unc,
    "kld": ref_summary(klds, LLAMA_KLD_FRACTIONS, LLAMA_KLD_FRACTIONS_LOW),
    "same_top_p": same,
    "same_top_p_unc": math.sqrt(same * (1 - same) / (n - 1)),
    "nmse": sq_diff / sq_base,  # test-backend-ops' NMSE: the reference (base) in the denominator
    "max_abs": max_abs,
  }
  if tokens is None:
    return out
  lq_mean, lq_unc = ref_mean_and_unc(acc["nll"], acc["nll2"], n)
  lb_mean, lb_unc = ref_mean_and_unc(acc["nll_b"], acc["nll_b2"], n)
  cov = ref_covariance(acc["nll"], acc["nll_b"], acc["nll_nll_b"], n)
  ln_ratio_unc = math.sqrt(lq_unc**2 + lb_unc**2 - 2 * cov)
  ppl_q, ppl_b = math.exp(lq_mean), math.exp(lb_mean)
  dp_mean, dp_unc = ref_mean_and_unc(acc["dp"], acc["dp2"], n)
  mse, mse_unc = ref_mean_and_unc(acc["dp2"], acc["dp4"], n)
  out |= {
    "dp_mean": dp_mean,
    "dp_unc": dp_unc,
    "dp": ref_summary(dps, LLAMA_DP_FRACTIONS, LLAMA_DP_FRACTIONS_LOW),
    "dp_rms": math.sqrt(mse),
    "dp_rms_unc": 0.5 / math.sqrt(mse) * mse_unc,
    "ppl_q": ppl_q,
    "ppl_q_unc": ppl_q * lq_unc,
    "ppl_base": ppl_b,
    "ppl_base_unc": ppl_b * lb_unc,
    "ln_ppl_ratio": lq_mean - lb_mean,
    "ln_ppl_ratio_unc": ln_ratio_unc,
    "ppl_ratio": math.exp(lq_mean - lb_mean),
    "ppl_ratio_unc": math.exp(lq_mean - lb_mean) * ln_ratio_unc,
    "ln_ppl_cor": cov / (lq_unc * lb_unc),
    # "Mean PPL(Q)-PPL(base)": the covariance of the perplexities is ppl_q ppl_base cov(ln).
    "ppl_diff": ppl_q - ppl_b,
    "ppl_diff_unc": math.sqrt((ppl_q * lq_unc) ** 2 + (ppl_b * lb_unc) ** 2 - 2 * ppl_q * ppl_b * cov),
  }
  return out


def assert_stats_match(s: ls.LogitStats, want: dict, rel: float = 1e-9, abs_: float = 1e-12) -> None:
  """Every field in want equals s's within rel / abs_ (both are float64; only summation order differs)."""
  for name, w in want.items():
    got = getattr(s, name)
    if isinstance(w, dict):
      assert list(got) == list(w), f"{name}: keys {list(got)} != {list(w)}"
      for k in w:
        assert got[k] == pytest.approx(w[k], rel=rel, abs=abs_), f"{name}[{k!r}]: {got[k]!r} != {w[k]!r}"
    else:
      assert got == pytest.approx(w, rel=rel, abs=abs_), f"{name}: {got!r} != {w!r}"


def sample_case(n: int, v: int, noise: float, shift: float = 0.0, seed: int = 0):
  """float32 logits base, q = base + shift + noise, and next tokens sampled from base's distribution."""
  rng = np.random.default_rng(seed)
  base = (3 * rng.standard_normal((n, v))).astype(np.float32)
  q = (base + shift + noise * rng.standard_normal((n, v))).astype(np.float32)
  gumbel = -np.log(-np.log(rng.random((n, v))))
  tokens = (base + gumbel).argmax(-1)  # a draw from softmax(base): like real text under the base model
  return base, q, tokens


# ---------------------------------------------------------------------------------------------------------
# Building blocks, on hand-made inputs.


def test_log_softmax_known_answers():
  # Uniform over 7: every log-probability is -log 7.
  np.testing.assert_allclose(ls.log_softmax(np.zeros(7)), np.full(7, -math.log(7)), rtol=1e-15)
  # Odds 3:1 are probabilities 3/4, 1/4, whatever is added to both (1000 would overflow exp without the max).
  for offset in (0.0, 1000.0, -1000.0):
    got = ls.log_softmax(np.array([math.log(3) + offset, offset]))
    np.testing.assert_allclose(got, [math.log(0.75), math.log(0.25)], rtol=1e-13)
  # Rows of a [2, 2, 3] batch are independent: [0, log 2, 0] -> 1/4, 1/2, 1/4.
  x = np.tile(np.array([0.0, LN2, 0.0]), (2, 2, 1))
  got = ls.log_softmax(x)
  assert got.shape == (2, 2, 3)
  np.testing.assert_allclose(got, np.log(np.tile([0.25, 0.5, 0.25], (2, 2, 1))), rtol=1e-15)


@pytest.mark.parametrize("v", [8, 1000], ids=lambda v: f"V{v}")
def test_log_softmax_matches_direct_softmax(v):
  # log(exp(x) / sum exp(x)) computed directly (no max subtraction: the logits are small enough).
  x = np.random.default_rng(v).standard_normal((5, v)) * 4
  direct = np.log(np.exp(x) / np.exp(x).sum(-1, keepdims=True))
  np.testing.assert_allclose(ls.log_softmax(x.astype(np.float32)), direct, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ls.log_softmax(x), direct, rtol=1e-12, atol=1e-12)


# KL(base || q) worked out from the definition sum_i p_base(i) log(p_base(i) / p_q(i)):
KLD_CASES = {
  # p_base = 1/4 each; q = [log 5, 0, 0, 0] gives [5/8, 1/8, 1/8, 1/8]:
  # KL = 1/4 (log(2/5) + 3 log 2) = log 2 - (log 5) / 4.
  "uniform-vs-peaked": ([0.0, 0.0, 0.0, 0.0], [math.log(5), 0.0, 0.0, 0.0], LN2 - math.log(5) / 4),
  # The other direction: 5/8 log(5/2) + 3/8 log(1/2) = 5/8 log 5 - log 2.
  "peaked-vs-uniform": ([math.log(5), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], 5 / 8 * math.log(5) - LN2),
  # A fair coin against 3:1: 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3).
  "coin-vs-3to1": ([0.0, 0.0], [math.log(3), 0.0], 0.5 * math.log(4 / 3)),
  # [1/2, 1/8 x 4] against the same with the first two swapped: 1/2 log 4 + 1/8 log(1/4) = 3/4 log 2.
  "swapped-peak": ([2 * LN2, 0, 0, 0, 0], [0, 2 * LN2, 0, 0, 0], 0.75 * LN2),
  # Logits shifted by a constant are the same distribution.
  "shifted": ([0.5, -1.0, 2.0], [7.5, 6.0, 9.0], 0.0),
}


@pytest.mark.parametrize("base,q,want", list(KLD_CASES.values()), ids=list(KLD_CASES))
def test_per_position_kld_known_answers(base, q, want):
  got = ls.per_position_kld(np.array([base, base]), np.array([q, q]))
  np.testing.assert_allclose(got, [want, want], rtol=1e-13, atol=1e-15)


def test_per_position_kld_of_identical_logits_is_exactly_zero():
  x = (3 * np.random.default_rng(1).standard_normal((6, 50))).astype(np.float32)
  assert ls.per_position_kld(x, x.copy()).tolist() == [0.0] * 6


@pytest.mark.parametrize("n,v", [(3, 5), (40, 300)], ids=lambda x: str(x))
def test_per_position_kld_matches_reference(n, v):
  base, q, _ = sample_case(n, v, noise=0.7, seed=n)
  want = [ref_kld(base[i], q[i]) for i in range(n)]
  np.testing.assert_allclose(ls.per_position_kld(base, q), want, rtol=1e-10, atol=1e-14)


MEAN_UNC_CASES = {
  # 1..11: mean 6, population variance (11^2 - 1) / 12 = 10, standard error sqrt(10 / 10) = 1.
  "1-to-11": (np.arange(1, 12), 6.0, 1.0),
  # 1..10: n = 10 is not > 10, so llama-perplexity reports no uncertainty.
  "1-to-10-too-few": (np.arange(1, 11), 5.5, 0.0),
  # Ten 1s and ten 3s: mean 2, population variance 1, standard error sqrt(1 / 19).
  "two-values-n20": (np.array([1.0] * 10 + [3.0] * 10), 2.0, math.sqrt(1 / 19)),
  # No spread: 9 - 3^2 = 0 exactly, so no uncertainty.
  "constant-n20": (np.full(20, 3.0), 3.0, 0.0),
  "empty": (np.zeros(0), 0.0, 0.0),
}


@pytest.mark.parametrize("values,mean,unc", list(MEAN_UNC_CASES.values()), ids=list(MEAN_UNC_CASES))
def test_mean_and_unc_known_answers(values, mean, unc):
  got = ls.mean_and_unc(values)
  assert got == pytest.approx((mean, unc), rel=1e-14, abs=0)


PERCENTILE_CASES = {
  # fraction * (n - 1) = 3.6 over [0, 10, 20, 30, 40]: 0.4 * 30 + 0.6 * 40 = 36.
  "0.9-of-5": ([0, 10, 20, 30, 40], 0.9, 36.0),
  # 3.996: 0.004 * 30 + 0.996 * 40 = 39.96.
  "0.999-of-5": ([0, 10, 20, 30, 40], 0.999, 39.96),
  "0.1-of-5": ([0, 10, 20, 30, 40], 0.1, 4.0),  # 0.4 of the way from 0 to 10
  "0.001-of-5": ([0, 10, 20, 30, 40], 0.001, 0.04),
  "0.5-of-5": ([0, 10, 20, 30, 40], 0.5, 20.0),  # exactly on the middle value
  "0.25-of-2": ([1, 3], 0.25, 1.5),
  "0-is-min": ([0, 10, 20, 30, 40], 0.0, 0.0),
  "negative-is-min": ([-5, 10], -0.5, -5.0),
  "1-is-max": ([0, 10, 20, 30, 40], 1.0, 40.0),
  "above-1-is-max": ([0, 10, 20, 30, 40], 1.5, 40.0),
  "single-value": ([7], 0.999, 7.0),
}


@pytest.mark.parametrize("values,fraction,want", list(PERCENTILE_CASES.values()), ids=list(PERCENTILE_CASES))
def test_percentile_known_answers(values, fraction, want):
  assert ls.percentile(np.array(values, np.float64), fraction) == pytest.approx(want, rel=1e-13, abs=1e-14)


@pytest.mark.parametrize("n", [1, 2, 7, 1000], ids=lambda n: f"n{n}")
def test_percentile_is_numpy_linear_quantile(n):
  # llama-perplexity's interpolation is the classic "linear" (Hyndman-Fan type 7) quantile.
  s = np.sort(np.random.default_rng(n).standard_normal(n))
  for f in (0.999, 0.99, 0.95, 0.9, 0.75, 0.25, 0.1, 0.05, 0.01, 0.001):
    want = float(np.quantile(s, f, method="linear"))
    assert ls.percentile(s, f) == pytest.approx(want, rel=1e-12, abs=1e-15), f"fraction {f}"
    assert ls.percentile(s, f) == pytest.approx(ref_percentile(s.tolist(), f), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
  "values,want",
  [([1, 2, 3, 4], 2.5), ([1, 5, 7], 5.0), ([7], 7.0), ([-2, 4], 1.0)],
  ids=["even-4", "odd-3", "one", "even-2"],
)
def test_median_known_answers(values, want):
  assert ls.median(np.array(values, np.float64)) == want


# ---------------------------------------------------------------------------------------------------------
# logit_stats on hand-made distributions.


def test_same_top_p_takes_the_first_maximum_on_ties():
  # Row by row, argmax with the first maximum (perplexity.cpp's strict-> scans) / with the last maximum:
  base = np.array([[1, 3, 3], [2, 2, 0], [5, 0, 5], [0, 0, 0]], np.float32)  # first 1 0 0 0; last 2 1 2 2
  q = np.array([[0, 3, 1], [2, 0, 0], [4, 0, 5], [1, 1, 0]], np.float32)  # first 1 0 2 0; last 1 0 2 1
  s = ls.logit_stats(base, q)
  # First maximum: rows 0, 1, 3 agree -> 3/4 (the last maximum would give 1/4), binomial standard error
  # sqrt(3/4 * 1/4 / 3) = 1/4.
  assert (s.same_top_p, s.same_top_p_unc) == pytest.approx((0.75, 0.25), rel=1e-15)


def swap_case(n: int):
  """n positions over 5 tokens; base gives [1/2, 1/8, 1/8, 1/8, 1/8] (logits [log 4, 0, 0, 0, 0]), Q the same
  with tokens 0 and 1 swapped; the next token alternates 0, 1, 0, 1, ..."""
  base = np.tile([2 * LN2, 0.0, 0.0, 0.0, 0.0], (n, 1))
  q = np.tile([0.0, 2 * LN2, 0.0, 0.0, 0.0], (n, 1))
  return base, q, np.arange(n) % 2


def test_swapped_peak_n20_every_statistic():
  s = ls.logit_stats(*swap_case(20))
  # KL = 3/4 log 2 at every position (see KLD_CASES), so every percentile is that and no spread.
  # The top tokens (0 vs 1) never agree.
  # NLL(base): log 2 (next 0) and log 8 (next 1), ten each; NLL(Q) the other way round. Both means 2 log 2
  # (PPL 4), population variances (log 2)^2, standard errors sigma = log 2 / sqrt(19).
  # cov = (mean(NLL_Q NLL_base) - mean^2) / 19 = (3 (log 2)^2 - 4 (log 2)^2) / 19 = -sigma^2: correlation -1,
  # ln-ratio uncertainty sqrt(sigma^2 + sigma^2 + 2 sigma^2) = 2 sigma, PPL difference uncertainty
  # sqrt((4 sigma)^2 + (4 sigma)^2 + 2 * 16 sigma^2) = 8 sigma.
  # dp = 1/8 - 1/2 = -3/8 (next 0) or 1/2 - 1/8 = +3/8 (next 1): mean 0, standard error (3/8) / sqrt(19);
  # dp^2 = 9/64 everywhere: RMS 3/8 with no spread. Sorted dp: ten -3/8 then ten +3/8; the 25 % point
  # (4.75 of 19) and below are -3/8, the 75 % point (14.25) and above +3/8, the median (0 + 0) / 2 ... of the
  # middle two, -3/8 and +3/8, is 0.
  # Logits: squared differences per row 2 (2 log 2)^2 against (2 log 2)^2: NMSE 2; largest difference log 4.
  sigma = LN2 / math.sqrt(19)
  kl = 0.75 * LN2
  lo, hi = -3 / 8, 3 / 8
  want = {
    "n": 20,
    "kld_mean": kl,
    "kld_unc": 0.0,
    "kld": dict.fromkeys(KLD_KEYS, kl),
    "same_top_p": 0.0,
    "same_top_p_unc": 0.0,
    "nmse": 2.0,
    "max_abs": 2 * LN2,
    "dp_mean": 0.0,
    "dp_unc": (3 / 8) / math.sqrt(19),
    "dp": {"max": hi, **dict.fromkeys(DP_KEYS[1:6], hi), "median": 0.0, **dict.fromkeys(DP_KEYS[7:], lo)},
    "dp_rms": 3 / 8,
    "dp_rms_unc": 0.0,
    "ppl_q": 4.0,
    "ppl_q_unc": 4 * sigma,
    "ppl_base": 4.0,
    "ppl_base_unc": 4 * sigma,
    "ln_ppl_ratio": 0.0,
    "ln_ppl_ratio_unc": 2 * sigma,
    "ppl_ratio": 1.0,
    "ppl_ratio_unc": 2 * sigma,
    "ln_ppl_cor": -1.0,
    "ppl_diff": 0.0,
    "ppl_diff_unc": 8 * sigma,
  }
  # Constant quantities can pick up a rounding-level spread (sqrt of ~1e-17 / 19 ~ 1e-9): abs 1e-7.
  assert_stats_match(s, want, rel=1e-12, abs_=1e-7)


def test_swapped_peak_n10_uses_llama_thresholds():
  # n = 10: llama-perplexity gives no standard errors (n must be > 10) but already a covariance (n >= 10),
  # here (3 (log 2)^2 - 4 (log 2)^2) / 9 = -(log 2)^2 / 9, so the ln-ratio uncertainty is
  # sqrt(0 + 0 + 2 (log 2)^2 / 9) = sqrt(2) log 2 / 3 and the PPL difference's sqrt(2 * 16 (log 2)^2 / 9).
  s = ls.logit_stats(*swap_case(10))
  assert [s.kld_unc, s.ppl_q_unc, s.ppl_base_unc, s.dp_unc, s.dp_rms_unc] == [0.0] * 5
  assert s.ln_ppl_ratio_unc == pytest.approx(math.sqrt(2) * LN2 / 3, rel=1e-12)
  assert s.ppl_ratio_unc == pytest.approx(math.sqrt(2) * LN2 / 3, rel=1e-12)
  assert s.ppl_diff_unc == pytest.approx(4 * math.sqrt(2) * LN2 / 3, rel=1e-12)


def test_uniform_distribution_has_perplexity_v():
  # Uniform over 7 tokens (Q's logits shifted by 2.5): every next token has probability 1/7, NLL log 7, so
  # both perplexities are 7 whatever the tokens; the distributions are identical, so KL = 0 exactly (after
  # subtracting the maximum both rows are all zeros), the top tokens agree (all tied: token 0) and dp = 0.
  n = 30
  base = np.zeros((n, 7), np.float32)
  tokens = np.random.default_rng(3).integers(0, 7, n)
  s = ls.logit_stats(base, base + np.float32(2.5), tokens)
  assert (s.ppl_q, s.ppl_base, s.ppl_ratio) == pytest.approx((7.0, 7.0, 1.0), rel=1e-14)
  assert (s.ppl_q_unc, s.ppl_base_unc, s.ln_ppl_ratio) == pytest.approx((0.0, 0.0, 0.0), abs=1e-7)
  assert [s.kld_mean, s.kld_unc, s.kld["max"], s.kld["min"]] == [0.0] * 4
  assert (s.same_top_p, s.same_top_p_unc) == (1.0, 0.0)
  assert [s.dp_mean, s.dp_unc, s.dp["max"], s.dp["min"], s.dp_rms] == [0.0] * 5
  assert (s.max_abs, s.nmse) == (2.5, math.inf)  # base logits are all 0: NMSE's denominator is 0


def test_identical_logits():
  # Q == base: KL 0 exactly everywhere, the top token always agrees, dp = 0, equal perplexities whose NLLs
  # are perfectly correlated, NMSE and largest difference 0.
  base, _, tokens = sample_case(50, 40, noise=0.0, seed=5)
  s = ls.logit_stats(base, base.copy(), tokens)
  assert [s.kld_mean, s.kld_unc, *s.kld.values()] == [0.0] * 13
  assert (s.same_top_p, s.same_top_p_unc, s.nmse, s.max_abs) == (1.0, 0.0, 0.0, 0.0)
  assert [s.dp_mean, s.dp_unc, *s.dp.values(), s.dp_rms] == [0.0] * 16
  assert s.ppl_q == s.ppl_base
  assert (s.ln_ppl_ratio, s.ppl_ratio, s.ppl_diff) == (0.0, 1.0, 0.0)
  assert s.ln_ppl_cor == pytest.approx(1.0, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# logit_stats on random logits against the re-implementation.

RANDOM_CASES = {
  "n11-V8-noise0.3": dict(n=11, v=8, noise=0.3),
  "n64-V16-noise1": dict(n=64, v=16, noise=1.0),
  "n200-V1000-noise0.5": dict(n=200, v=1000, noise=0.5),
  "n1000-V32-noise0.05": dict(n=1000, v=32, noise=0.05),
  "n150-V16-shift3-noise0.01": dict(n=150, v=16, noise=0.01, shift=3.0),
}


@pytest.mark.parametrize("case", list(RANDOM_CASES.values()), ids=list(RANDOM_CASES))
def test_logit_stats_matches_reference(case):
  base, q, tokens = sample_case(**case, seed=case["n"])
  want = ref_stats(base, q, tokens)
  assert_stats_match(ls.logit_stats(base, q, tokens), want)
  # Without next tokens only the distribution statistics, the same values.
  s = ls.logit_stats(base, q)
  dist_only = ("n", "kld_mean", "kld_unc", "kld", "same_top_p", "same_top_p_unc")
  assert_stats_match(s, {k: want[k] for k in dist_only})
  assert [s.dp, s.dp_mean, s.ppl_q, s.ppl_diff] == [None] * 4


def test_logit_stats_flattens_leading_axes():
  base, q, tokens = sample_case(48, 20, noise=0.5, seed=7)
  want = ref_stats(base, q, tokens)
  got = ls.logit_stats(base.reshape(4, 12, 20), q.reshape(4, 12, 20), tokens.reshape(4, 12))
  assert_stats_match(got, want)


@pytest.mark.parametrize(
  "base,q,tokens,message",
  [
    (np.zeros((3, 4)), np.zeros((3, 5)), None, r"logit shapes differ: base \(3, 4\), candidate \(3, 5\)"),
    (np.zeros((0, 4)), np.zeros((0, 4)), None, r"empty logits \(0, 4\)"),
    (np.zeros((3, 4)), np.array([[0, 0, 0, 0], [0, 0, np.nan, 0], [0] * 4]), None, "candidate .* 1, token 2"),
    (np.zeros((3, 4)), np.zeros((3, 4)), np.array([0, 1]), "2 next tokens for 3 positions"),
    (np.zeros((3, 4)), np.zeros((3, 4)), np.array([0, 4, 1]), r"next token id 4 outside vocabulary \[0, 4\)"),
    (np.zeros((3, 4)), np.zeros((3, 4)), np.array([0, -1, 1]), r"next token id -1 outside vocabulary"),
  ],
  ids=["shape-mismatch", "empty", "nan", "token-count", "token-too-large", "token-negative"],
)
def test_logit_stats_rejects_bad_inputs(base, q, tokens, message):
  with pytest.raises(ValueError, match=message):
    ls.logit_stats(base, q, tokens)


def test_to_dict_holds_every_field():
  s = ls.logit_stats(*swap_case(20))
  d = s.to_dict()
  assert list(d) == [f.name for f in dataclasses.fields(ls.LogitStats)]
  assert d == {f.name: getattr(s, f.name) for f in dataclasses.fields(ls.LogitStats)}


# ---------------------------------------------------------------------------------------------------------
# The printed report, line by line as perplexity.cpp's LOG formats lay it out.


def _no_negative_zero(text: str) -> str:
  # A true 0 computed with rounding can print as "-0.000000", in llama-perplexity as here: compare as 0.
  return re.sub(r"-(0\.0+)(?![0-9])", r" \1", text)


def _pct_label(k: str) -> str:
  # perplexity.cpp's labels: "99.9%   KLD", " 5.0%   KLD", "Median  KLD", ... (the name follows a space).
  return {"max": "Maximum", "median": "Median ", "min": "Minimum"}.get(k, f"{k:>4}%  ")


def _llama_kld_block(kl: dict, mean: float, unc: float) -> list[str]:
  # C's %10.6f is Python's {:10.6f}.
  lines = ["====== KL divergence statistics ======", f"Mean    KLD: {mean:10.6f} ± {unc:10.6f}"]
  return lines + [f"{_pct_label(k)} KLD: {v:10.6f}" for k, v in kl.items()]


def test_format_llama_perplexity_full_report():
  s = ls.logit_stats(*swap_case(20))
  sigma = LN2 / math.sqrt(19)  # the closed-form values of test_swapped_peak_n20_every_statistic
  kl = 0.75 * LN2
  kld = dict.fromkeys(KLD_KEYS, kl)
  dp = {"max": 37.5, **dict.fromkeys(DP_KEYS[1:6], 37.5), "median": 0.0, **dict.fromkeys(DP_KEYS[7:], -37.5)}
  want = [
    "====== Perplexity statistics ======",
    f"Mean PPL(Q)                   : {4.0:10.6f} ± {4 * sigma:10.6f}",
    f"Mean PPL(base)                : {4.0:10.6f} ± {4 * sigma:10.6f}",
    f"Cor(ln(PPL(Q)), ln(PPL(base))): {-100.0:6.2f}%",
    f"Mean ln(PPL(Q)/PPL(base))     : {0.0:10.6f} ± {2 * sigma:10.6f}",
    f"Mean PPL(Q)/PPL(base)         : {1.0:10.6f} ± {2 * sigma:10.6f}",
    f"Mean PPL(Q)-PPL(base)         : {0.0:10.6f} ± {8 * sigma:10.6f}",
    "",
    *_llama_kld_block(kld, kl, 0.0),
    "",
    "====== Token probability statistics ======",
    f"Mean    Δp: {0.0:6.3f} ± {100 * (3 / 8) / math.sqrt(19):5.3f} %",
    *[f"{_pct_label(k)} Δp: {v:6.3f}%" for k, v in dp.items()],
    f"RMS Δp    : {37.5:6.3f} ± {0.0:5.3f} %",
    f"Same top p: {0.0:6.3f} ± {0.0:5.3f} %",
  ]
  got = _no_negative_zero(ls.format_llama_perplexity(s)).split("\n")
  assert got == want


def test_format_llama_perplexity_without_next_tokens():
  # The distribution statistics only: the KL block and the Same top p line.
  base, q, _ = swap_case(20)
  s = ls.logit_stats(base, q)
  kl = 0.75 * LN2
  want = [*_llama_kld_block(dict.fromkeys(KLD_KEYS, kl), kl, 0.0), f"Same top p: {0.0:6.3f} ± {0.0:5.3f} %"]
  assert _no_negative_zero(ls.format_llama_perplexity(s)).split("\n") == want
