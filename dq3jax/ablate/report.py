"""An AblationResult as a Markdown table, llama-perplexity blocks, JSON (written atomically) and PNG plots.

JSON statistics use the key names of shared/specs/style.md §3.4 (`mean_kld`, `kld_p99`, `same_top_p`, ...,
each uncertainty as `<key>_unc`; Δp and probabilities as fractions, not percent).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

from dq3jax.ablate.run import AblationResult, RecipeResult
from dq3jax.ablate.sensitivity import SensitivityResult, UnitResult, class_label
from dq3jax.compare.logit_stats import LogitStats, format_llama_perplexity
from dq3jax.io.atomic import atomic_path

FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------- markdown


def _pm(v: float | None, unc: float | None, fmt: str, scale: float = 1.0) -> str:
  if v is None:
    return "–"
  return f"{v * scale:{fmt}} ± {unc * scale:{fmt}}" if unc is not None else f"{v * scale:{fmt}}"


def _g(v: float) -> str:
  """Compact number for KLD columns: fixed point down to 1e-4, scientific below (exact zero stays 0)."""
  if v == 0:
    return "0"
  return f"{v:.6f}" if abs(v) >= 1e-4 else f"{v:.3e}"


def _kld_pm(s: LogitStats) -> str:
  return "0" if s.kld_mean == 0 and s.kld_unc == 0 else f"{_g(s.kld_mean)} ± {_g(s.kld_unc)}"


def recipe_table(result: AblationResult) -> str:
  head = (
    "| recipe | bpw | size MiB | mean KLD ± unc | 99% KLD | max KLD | same top p ± unc (%) | mean Δp (%) "
    "| PPL ratio ± unc |"
  )
  lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result.recipes:
    s = r.stats
    lines.append(
      f"| {r.recipe} | {r.bits_per_weight:.3f} | {r.mib:.2f} | {_kld_pm(s)} | {_g(s.kld['99.0'])} "
      f"| {_g(s.kld['max'])} | {_pm(s.same_top_p, s.same_top_p_unc, '.2f', 100)} "
      f"| {_pm(s.dp_mean, s.dp_unc, '.3f', 100)} | {_pm(s.ppl_ratio, s.ppl_ratio_unc, '.4f')} |"
    )
  return "\n".join(lines)


def sensitivity_table(sens: SensitivityResult, units: tuple[UnitResult, ...]) -> str:
  lines = [
    "| rank | tensors | types | params | mean KLD ± unc | 99% KLD | same top p ± unc (%) |",
    "|---:|---|---|---:|---:|---:|---:|",
  ]
  for k, u in enumerate(units, 1):
    s = u.stats
    lines.append(
      f"| {k} | {u.unit.label} | {', '.join(u.types)} | {u.params:,} | {_kld_pm(s)} | {_g(s.kld['99.0'])} "
      f"| {_pm(s.same_top_p, s.same_top_p_unc, '.2f', 100)} |"
    )
  return "\n".join(lines)


def header(result: AblationResult) -> str:
  m, t = result.model, result.tokens
  return (
    f"model {m.name} ({m.description}): {m.layers} layers ({m.dense_layers} dense), {m.experts} routed "
    f"experts, hidden {m.hidden}, vocab {m.vocab}, {m.params:,} params; llama.cpp rules {result.rules}, "
    f"layout {result.layout}" + (f", imatrix {result.imatrix}" if result.imatrix else "") + "\n"
    f"tokens: {t.description}; {t.shape[0]} x {t.shape[1] - 1} positions scored"
    + ("" if t.next_token_stats else " (no next-token statistics: tokens are not text)")
  )


def markdown(result: AblationResult, *, verbose: bool = False) -> str:
  parts = [header(result), "", recipe_table(result)]
  sens = result.sensitivity
  if sens is not None:
    parts += [
      "",
      f"Sensitivity: one class at a time at {sens.type} (llama.cpp shape fallbacks apply), everything else "
      f"F32; ranked by the mean KLD it adds. Whole classes:",
      "",
      sensitivity_table(sens, sens.classes),
    ]
    if sens.groups:
      parts += ["", f"By layer group ({sens.grouping}):", "", sensitivity_table(sens, sens.groups)]
  if verbose:
    for r in result.recipes:
      parts += ["", f"### {r.recipe} ({r.bits_per_weight:.3f} bpw, {r.mib:.2f} MiB)", "", "```",
                format_llama_perplexity(r.stats), "```"]  # fmt: skip
  tm = result.timings
  parts += [
    "",
    f"time: total {tm.total_s:.1f} s = load {tm.load_s:.1f} + sample {tm.sample_s:.1f} + base forward "
    f"{tm.base_forward_s:.1f} + quantize {tm.quantize_s:.1f} + forward {tm.forward_s:.1f} + sensitivity "
    f"{tm.sensitivity_s:.1f} (+ overhead)",
  ]
  return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- json


def _pct_key(k: str) -> str:
  """'99.9' -> 'p99_9', '99.0' -> 'p99', 'max' -> 'max'."""
  if k in ("max", "min", "median"):
    return k
  return "p" + (k[:-2] if k.endswith(".0") else k).replace(".", "_")


def stats_json(s: LogitStats) -> dict[str, Any]:
  """llama-perplexity's statistics under style.md's keys (fractions, not percent)."""
  d: dict[str, Any] = {
    "n": s.n,
    "mean_kld": s.kld_mean,
    "mean_kld_unc": s.kld_unc,
    **{f"kld_{_pct_key(k)}": v for k, v in s.kld.items()},
    "same_top_p": s.same_top_p,
    "same_top_p_unc": s.same_top_p_unc,
    "nmse": s.nmse,
    "max_abs_logit_diff": s.max_abs,
  }
  if s.dp is not None:
    d.update(
      mean_dp=s.dp_mean,
      mean_dp_unc=s.dp_unc,
      **{f"dp_{_pct_key(k)}": v for k, v in s.dp.items()},
      rms_dp=s.dp_rms,
      rms_dp_unc=s.dp_rms_unc,
      ppl_q=s.ppl_q,
      ppl_q_unc=s.ppl_q_unc,
      ppl_base=s.ppl_base,
      ppl_base_unc=s.ppl_base_unc,
      mean_ln_ppl_ratio=s.ln_ppl_ratio,
      mean_ln_ppl_ratio_unc=s.ln_ppl_ratio_unc,
      ppl_ratio=s.ppl_ratio,
      ppl_ratio_unc=s.ppl_ratio_unc,
      cor_ln_ppl=s.ln_ppl_cor,
    )
  return d


def _recipe_json(r: RecipeResult) -> dict[str, Any]:
  return {
    "recipe": r.recipe,
    "description": r.description,
    "bits_per_weight": r.bits_per_weight,
    "bytes": r.bytes,
    "params": r.params,
    "stats": stats_json(r.stats),
    "quantize_s": r.quantize_s,
    "forward_s": r.forward_s,
    "tensors": [dataclasses.asdict(t) for t in r.tensors],
  }


def _unit_json(u: UnitResult, rank: int) -> dict[str, Any]:
  return {
    "rank": rank,
    "class": u.unit.cls,
    "class_label": class_label(u.unit.cls),
    "group": u.unit.group,
    "tensors": list(u.unit.tensors),
    "types": list(u.types),
    "params": u.params,
    "bytes_saved": u.bytes_saved,
    "stats": stats_json(u.stats),
    "seconds": u.seconds,
  }


def to_json(result: AblationResult) -> dict[str, Any]:
  sens = result.sensitivity
  return {
    "format_version": FORMAT_VERSION,
    "model": dataclasses.asdict(result.model),
    "rules": result.rules,
    "layout": result.layout,
    "imatrix": result.imatrix,
    "tokens": dataclasses.asdict(result.tokens),
    "recipes": [_recipe_json(r) for r in result.recipes],
    "sensitivity": None
    if sens is None
    else {
      "type": sens.type,
      "grouping": sens.grouping,
      "classes": [_unit_json(u, k) for k, u in enumerate(sens.classes, 1)],
      "groups": [_unit_json(u, k) for k, u in enumerate(sens.groups, 1)],
    },
    "timings": dataclasses.asdict(result.timings),
  }


def _finite(x: Any) -> Any:
  """NaN and infinities as null: strict JSON has no spelling for them."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def _atomic(path: str | os.PathLike, write) -> None:
  """write(tmp_path), then the temp file replaces path (dq3jax.io.atomic)."""
  p = pathlib.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  with atomic_path(p) as tmp:
    write(tmp)


def write_json(result: AblationResult, path: str | os.PathLike) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(_finite(to_json(result)), f, indent=1, ensure_ascii=False, allow_nan=False)
      f.write("\n")

  _atomic(path, write)


# ------------------------------------------------------------------------------------------------ png


def sensitivity_plot_path(path: str | os.PathLike) -> pathlib.Path:
  """P.png -> P-sensitivity.png."""
  p = pathlib.Path(path)
  return p.with_name(f"{p.stem}-sensitivity{p.suffix or '.png'}")


def _title(result: AblationResult) -> str:
  m = result.model
  return f"{m.name}: {m.layers} layers, {m.experts} experts, {result.tokens.shape[0]}x{result.tokens.shape[1]} tokens"


def write_plots(result: AblationResult, path: str | os.PathLike) -> list[pathlib.Path]:
  """Mean KLD (log scale) against bits per weight, one labelled point per recipe with its standard error; with
  a sensitivity map, a second PNG (`sensitivity_plot_path`) of its ranked bars. Returns the files written."""
  from dq3jax.extras import require  # noqa: PLC0415

  require("matplotlib", "--plot").use("Agg")
  plt = require("matplotlib.pyplot", "--plot")

  written = []
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  shown = [r for r in result.recipes if r.stats.kld_mean > 0]
  zero = [r.recipe for r in result.recipes if r.stats.kld_mean <= 0]
  for r in shown:
    m, u = r.stats.kld_mean, r.stats.kld_unc
    # On a log axis a bar below zero cannot be drawn: clip the lower error at 90% of the value.
    ax.errorbar(r.bits_per_weight, m, yerr=[[min(u, 0.9 * m)], [u]], fmt="o", capsize=3, color="C0")
    ax.annotate(r.recipe, (r.bits_per_weight, m), textcoords="offset points", xytext=(5, 5), fontsize=9)
  ax.set_yscale("log")
  ax.margins(x=0.1)  # room for the labels of the outermost points
  ax.set_xlabel("bits per weight (all tensors, llama.cpp's BPW)")
  ax.set_ylabel("mean KL divergence vs unquantized (nats)")
  ax.set_title(_title(result), fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  if zero:
    ax.text(0.99, 0.99, f"KLD 0 (not drawn): {', '.join(zero)}", transform=ax.transAxes, ha="right", va="top",
            fontsize=8)  # fmt: skip
  fig.tight_layout()
  _atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
  plt.close(fig)
  written.append(pathlib.Path(path))

  sens = result.sensitivity
  if sens is not None:
    units = [*sens.classes, *sens.groups]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(units) + 1.6), dpi=120)
    labels = [u.unit.label for u in units]
    means = [max(u.stats.kld_mean, 1e-12) for u in units]
    errs = [u.stats.kld_unc for u in units]
    colors = ["C1" if u.unit.group == "all" else "C0" for u in units]
    y = list(range(len(units)))[::-1]
    ax.barh(y, means, xerr=[[min(e, 0.9 * m) for e, m in zip(errs, means, strict=True)], errs],
            color=colors, capsize=2)  # fmt: skip
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"mean KLD added by quantizing only these tensors to {sens.type} (others F32)")
    ax.set_title(f"{_title(result)}\norange: whole classes, blue: layer groups ({sens.grouping})", fontsize=9)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    sp = sensitivity_plot_path(path)
    _atomic(sp, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    written.append(sp)
  return written
