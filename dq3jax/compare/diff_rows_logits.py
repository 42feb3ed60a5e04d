"""The row of a logits tensor: llama-perplexity's statistics (Mean KLD, Same top p, Δp, perplexity)."""

from __future__ import annotations

import numpy as np

from dq3jax.compare import logit_stats, metrics
from dq3jax.compare.diff_kinds import TensorKind
from dq3jax.compare.diff_rows import Row, Status, within_bound
from dq3jax.compare.diff_text import sig3
from dq3jax.compare.diff_thresholds import Thresholds


def _llama_labels(s: logit_stats.LogitStats, with_dp: bool) -> dict:
  """The statistics under the labels llama-perplexity prints (percentages where it prints percent)."""

  def label(k: str, what: str) -> str:
    return {"max": f"Maximum {what}", "median": f"Median {what}", "min": f"Minimum {what}"}.get(
      k, f"{k}% {what}"
    )

  out = {"Mean KLD": s.kld_mean, "Mean KLD unc": s.kld_unc}
  out |= {label(k, "KLD"): v for k, v in s.kld.items()}
  out |= {"Same top p": 100 * s.same_top_p, "Same top p unc": 100 * s.same_top_p_unc}
  if with_dp and s.dp is not None:
    out |= {"Mean Δp": 100 * s.dp_mean, "Mean Δp unc": 100 * s.dp_unc}
    out |= {label(k, "Δp"): 100 * v for k, v in s.dp.items()}
    out |= {
      "RMS Δp": 100 * s.dp_rms,
      "RMS Δp unc": 100 * s.dp_rms_unc,
      "Mean PPL(Q)": s.ppl_q,
      "Mean PPL(base)": s.ppl_base,
      "Mean ln(PPL(Q)/PPL(base))": s.ln_ppl_ratio,
      "Mean ln(PPL(Q)/PPL(base)) unc": s.ln_ppl_ratio_unc,
    }
  return out


def logits_row(
  name: str,
  g: np.ndarray,
  c: np.ndarray,
  next_tokens: np.ndarray | None,
  thr: Thresholds,
  status_if_judged: bool = True,
  label: str | None = None,
) -> Row:
  """llama-perplexity's statistics of candidate logits c against golden g [N, V].

  KLD and Same top p use all N positions; Δp and perplexity need the next token, so they use the first N-1
  positions (next_tokens[i] follows position i) when next_tokens is given.
  """
  bound = f"Mean KLD <= {sig3(thr.logits_mean_kld)}, Same top p >= {100 * thr.logits_min_same_top_p:g} %"
  bad = ~np.isfinite(c)
  if bad.any():
    pos, tok = (int(i) for i in np.argwhere(bad)[0])
    return Row(
      label or name,
      TensorKind.LOGITS,
      Status.FAIL,
      f"non-finite logit {c[pos, tok]} at position {pos}, token {tok} ({int(bad.sum())} in all)",
      bound,
      {"non_finite": int(bad.sum())},
    )
  s = logit_stats.logit_stats(g, c)
  m = {"positions": s.n} | _llama_labels(s, with_dp=False)
  if next_tokens is not None and g.shape[0] > 1:
    sd = logit_stats.logit_stats(g[:-1], c[:-1], next_tokens)
    m |= {"Δp positions": sd.n} | {k: v for k, v in _llama_labels(sd, with_dp=True).items() if k not in m}
  m |= {"NMSE": metrics.nmse(g, c), "max abs err": s.max_abs, "logit_stats": s.to_dict()}
  summary = (
    f"Mean KLD {sig3(s.kld_mean)} ± {sig3(s.kld_unc)}, Maximum KLD {sig3(s.kld['max'])}, "
    f"Same top p {100 * s.same_top_p:.3f} ± {100 * s.same_top_p_unc:.3f} %"
  )
  if "RMS Δp" in m:
    summary += f", Mean Δp {m['Mean Δp']:.3f} %, RMS Δp {m['RMS Δp']:.3f} %"
  summary += f", NMSE {sig3(m['NMSE'])}, max abs {sig3(s.max_abs)} ({s.n} positions)"
  ok = within_bound(s.kld_mean, thr.logits_mean_kld) and s.same_top_p >= thr.logits_min_same_top_p
  status = (Status.PASS if ok else Status.FAIL) if status_if_judged else Status.INFO
  return Row(
    label or name, TensorKind.LOGITS, status, summary, bound if status_if_judged else "not judged", m
  )
