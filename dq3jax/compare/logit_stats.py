"""The statistics llama-perplexity prints with `--kl-divergence`, computed from two sets of logits.

Same definitions as llama.cpp's tools/perplexity (read at 0c1e570), so numbers line up with what users
already know:
- KL divergence per position is KL(base || Q) = sum_i p_base(i) (log p_base(i) - log p_Q(i)); its mean is
  reported with the standard error sqrt((E[x^2] - E[x]^2) / (n - 1)) (0 when n <= 10, as llama.cpp does),
  and its percentiles by linear interpolation between sorted values (llama.cpp's `percentile`).
- "Same top p": the fraction of positions whose argmax agrees (first maximum wins on ties), with the
  binomial standard error sqrt(p (1 - p) / (n - 1)).
- Δp = p_Q(next token) - p_base(next token), its mean, percentiles and RMS; perplexities of both, their
  ratio, difference and correlation (these need the next tokens, i.e. real text or a token stream).

Differences, all in the direction of more precision: llama-perplexity stores the base log-probabilities as
16-bit codes and skips terms with log p_base <= -16; here everything is float64 and every term is summed.
llama-perplexity scores only the second half of each context window; callers choose the positions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KLD_PERCENTILES = ("99.9", "99.0", "95.0", "90.0", "10.0", "5.0", "1.0", "0.1")
DP_PERCENTILES = ("99.9", "99.0", "95.0", "90.0", "75.0", "25.0", "10.0", "5.0", "1.0", "0.1")


@dataclasses.dataclass(frozen=True)
class LogitStats:
  n: int  # positions compared
  kld_mean: float
  kld_unc: float
  kld: dict  # "max", "99.9", ..., "median", ..., "min" -> value
  same_top_p: float  # fraction in [0, 1]
  same_top_p_unc: float
  nmse: float  # sum (q - base)^2 / sum base^2 over all logits (test-backend-ops' NMSE)
  max_abs: float  # largest |q - base| over all logits
  # Only with next tokens (None otherwise):
  dp_mean: float | None = None  # fraction, not percent
  dp_unc: float | None = None
  dp: dict | None = None  # "max", percentiles, "median", "min"
  dp_rms: float | None = None
  dp_rms_unc: float | None = None
  ppl_q: float | None = None
  ppl_q_unc: float | None = None
  ppl_base: float | None = None
  ppl_base_unc: float | None = None
  ln_ppl_ratio: float | None = None
  ln_ppl_ratio_unc: float | None = None
  ppl_ratio: float | None = None
  ppl_ratio_unc: float | None = None
  ln_ppl_cor: float | None = None
  ppl_diff: float | None = None  # PPL(Q) - PPL(base)
  ppl_diff_unc: float | None = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """float64 log-probabilities of logits [..., V]."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def per_position_kld(base: np.ndarray, q: np.ndarray) -> np.ndarray:
  """KL(base || q) per position for logits [N, V] -> [N] (float64, clipped at 0 against rounding)."""
  lb, lq = log_softmax(base), log_softmax(q)
  return np.maximum((np.exp(lb) * (lb - lq)).sum(-1), 0.0)


def mean_and_unc(values: np.ndarray) -> tuple[float, float]:
  """Mean and its standard error as llama-perplexity computes them (0 uncertainty for n <= 10)."""
  v = np.asarray(values, np.float64)
  n = v.size
  if n < 1:
    return 0.0, 0.0
  f = float(v.sum() / n)
  df = float((v * v).sum() / n - f * f)
  return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
  """llama-perplexity's interpolated percentile of an ascending array."""
  v = sorted_values
  if fraction <= 0:
    return float(v[0])
  if fraction >= 1:
    return float(v[-1])
  p = fraction * (v.size - 1)
  ip = int(p)
  p -= ip
  return float((1 - p) * v[ip] + p * v[min(ip + 1, v.size - 1)])


def median(sorted_values: np.ndarray) -> float:
  v, n = sorted_values, sorted_values.size
  return float(0.5 * (v[n // 2] + v[n // 2 - 1]) if n % 2 == 0 else v[n // 2])


def _summary(values: np.ndarray, keys: tuple[str, ...]) -> dict:
  s = np.sort(np.asarray(values, np.float64))
  out = {"max": float(s[-1])}
  for k in keys:
    out[k] = percentile(s, float(k) / 100)
  out["median"] = median(s)
  out["min"] = float(s[0])
  # Descending order of the fraction, as llama-perplexity prints them.
  order = ["max"] + sorted([*keys, "median"], key=lambda k: -(50.0 if k == "median" else float(k))) + ["min"]
  return {k: out[k] for k in order}


def logit_stats(base: np.ndarray, q: np.ndarray, next_tokens: np.ndarray | None = None) -> LogitStats:
  """llama-perplexity's statistics of logits q against base, both [N, V] (any leading shape is flattened).

  next_tokens [N]: the token that follows each position; enables Δp and perplexity.
  """
  base = np.asarray(base)
  q = np.asarray(q)
  if base.shape != q.shape:
    raise ValueError(f"logit shapes differ: base {base.shape}, candidate {q.shape}")
  if base.ndim < 1 or base.size == 0:
    raise ValueError(f"empty logits {base.shape}")
  v = base.shape[-1]
  base = base.reshape(-1, v)
  q = q.reshape(-1, v)
  for name, a in (("base", base), ("candidate", q)):
    bad = ~np.isfinite(a)
    if bad.any():
      pos, tok = np.argwhere(bad)[0]
      raise ValueError(f"{name} logits: non-finite value {a[pos, tok]} at position {pos}, token {tok}")
  n = base.shape[0]
  lb, lq = log_softmax(base), log_softmax(q)
  kld = np.maximum((np.exp(lb) * (lb - lq)).sum(-1), 0.0)
  kld_mean, kld_unc = mean_and_unc(kld)
  same = float((base.argmax(-1) == q.argmax(-1)).mean())
  diff = q.astype(np.float64) - base.astype(np.float64)
  denom = float((base.astype(np.float64) ** 2).sum())
  stats = dict(
    n=n,
    kld_mean=kld_mean,
    kld_unc=kld_unc,
    kld=_summary(kld, KLD_PERCENTILES),
    same_top_p=same,
    same_top_p_unc=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    nmse=float((diff**2).sum() / denom) if denom > 0 else float("inf") if (diff != 0).any() else 0.0,
    max_abs=float(np.abs(diff).max()),
  )
  if next_tokens is not None:
    tok = np.asarray(next_tokens).reshape(-1)
    if tok.size != n:
      raise ValueError(f"{tok.size} next tokens for {n} positions")
    if tok.min() < 0 or tok.max() >= v:
      raise ValueError(
        f"next token id {int(tok.max() if tok.max() >= v else tok.min())} outside vocabulary [0, {v})"
      )
    rows = np.arange(n)
    nll_b, nll_q = -lb[rows, tok], -lq[rows, tok]
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    dp_mean, dp_unc = mean_and_unc(dp)
    mse, mse_unc = mean_and_unc(dp * dp)
    lq_mean, lq_unc = mean_and_unc(nll_q)
    lb_mean, lb_unc = mean_and_unc(nll_b)
    # llama-perplexity's covariance: 0 below 10 positions.
    cov = float((nll_q * nll_b).sum() / n - lq_mean * lb_mean) / (n - 1) if n >= 10 else 0.0
    ratio_unc2 = lq_unc**2 + lb_unc**2 - 2.0 * cov
    ln_ratio = lq_mean - lb_mean
    ln_ratio_unc = math.sqrt(max(ratio_unc2, 0.0))
    rms = math.sqrt(mse)
    ppl_q, ppl_b = math.exp(lq_mean), math.exp(lb_mean)
    # The perplexities' covariance to first order, d exp(x)/dx = exp(x): ppl_q ppl_base cov(ln).
    diff_unc2 = (ppl_q * lq_unc) ** 2 + (ppl_b * lb_unc) ** 2 - 2.0 * ppl_q * ppl_b * cov
    stats.update(
      dp_mean=dp_mean,
      dp_unc=dp_unc,
      dp=_summary(dp, DP_PERCENTILES),
      dp_rms=rms,
      dp_rms_unc=0.5 / rms * mse_unc if rms > 0 else 0.0,
      ppl_q=ppl_q,
      ppl_q_unc=ppl_q * lq_unc,
      ppl_base=ppl_b,
      ppl_base_unc=ppl_b * lb_unc,
      ln_ppl_ratio=ln_ratio,
      ln_ppl_ratio_unc=ln_ratio_unc,
      ppl_ratio=math.exp(ln_ratio),
      ppl_ratio_unc=math.exp(ln_ratio) * ln_ratio_unc,
      ln_ppl_cor=cov / (lq_unc * lb_unc) if lq_unc > 0 and lb_unc > 0 else None,
      ppl_diff=ppl_q - ppl_b,
      ppl_diff_unc=math.sqrt(max(diff_unc2, 0.0)),
    )
  return LogitStats(**stats)


def format_llama_perplexity(s: LogitStats) -> str:
  """The statistics as llama-perplexity lays them out (same labels and precision)."""
  lines = []
  if s.ppl_q is not None:
    lines += [
      "====== Perplexity statistics ======",
      f"Mean PPL(Q)                   : {s.ppl_q:10.6f} ± {s.ppl_q_unc:10.6f}",
      f"Mean PPL(base)                : {s.ppl_base:10.6f} ± {s.ppl_base_unc:10.6f}",
    ]
    if s.ln_ppl_cor is not None:
      lines.append(f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s.ln_ppl_cor:6.2f}%")
    lines += [
      f"Mean ln(PPL(Q)/PPL(base))     : {s.ln_ppl_ratio:10.6f} ± {s.ln_ppl_ratio_unc:10.6f}",
      f"Mean PPL(Q)/PPL(base)         : {s.ppl_ratio:10.6f} ± {s.ppl_ratio_unc:10.6f}",
      f"Mean PPL(Q)-PPL(base)         : {s.ppl_diff:10.6f} ± {s.ppl_diff_unc:10.6f}",
      "",
    ]
  lines += ["====== KL divergence statistics ======", f"Mean    KLD: {s.kld_mean:10.6f} ± {s.kld_unc:10.6f}"]
  for k, val in s.kld.items():
    label = {"max": "Maximum", "median": "Median ", "min": "Minimum"}.get(k, f"{k}%".rjust(5) + "  ")
    lines.append(f"{label} KLD: {val:10.6f}")
  if s.dp is not None:
    lines += [
      "",
      "====== Token probability statistics ======",
      f"Mean    Δp: {100 * s.dp_mean:6.3f} ± {100 * s.dp_unc:5.3f} %",
    ]
    for k, val in s.dp.items():
      label = {"max": "Maximum", "median": "Median ", "min": "Minimum"}.get(k, f"{k}%".rjust(5) + "  ")
      lines.append(f"{label} Δp: {100 * val:6.3f}%")
    lines.append(f"RMS Δp    : {100 * s.dp_rms:6.3f} ± {100 * s.dp_rms_unc:5.3f} %")
  lines.append(f"Same top p: {100 * s.same_top_p:6.3f} ± {100 * s.same_top_p_unc:5.3f} %")
  return "\n".join(lines)
