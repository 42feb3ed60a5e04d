"""`dq3jax diff GOLDEN CANDIDATE`: judge an engine's output against a golden file, tensor by tensor.

GOLDEN is a kernel golden, a model-outputs golden or a golden GGUF (see docs/diff.md for the layouts); its kind
comes from the manifest it is listed in (whose sha256 it must match), else from its content. CANDIDATE is what
another engine produced (.npz, .safetensors, .npy, a raw float32 dump, or a GGUF for a golden GGUF). Tensors
are matched by name and each is judged by the metric of its kind against `Thresholds` (a named profile,
optionally overridden per bound). The verdict is a Markdown table, optionally a JSON report, and the exit
status: 0 within bounds, 1 out of bounds, 2 bad input.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dq3jax.compare import dumps, logit_stats, metrics, recompute, routing, stagewise
from dq3jax.compare.dumps import BadInput, Expect, Golden, GoldenKind, open_candidate, open_golden

# ------------------------------------------------------------------------------------------ thresholds


@dataclasses.dataclass(frozen=True, kw_only=True)
class Thresholds:
  """The bounds a candidate must stay within; the defaults are for an engine computing in float32.

  The table with the reasoning behind each value is docs/diff.md; `--threshold NAME=VALUE` overrides one.
  """

  # Quantized bytes (a kernel golden's `quantized`, every tensor of a golden GGUF): ggml blocks that may differ.
  bytes_max_diff_blocks: int = 0
  # A kernel golden's `dequantized`: ggml's to_float is exact arithmetic on a block, so 0 ULP.
  kernel_max_ulp: int = 0
  # attn_latent, hidden_after_attn, hidden_after_mlp and other float intermediates: test-backend-ops' NMSE.
  intermediate_nmse: float = 1e-6
  # topk_ids: fraction of positions whose expert set differs at a decisive gap (routing.py): flips where the
  # golden's own decision gap is within router_tie_gap are explained by rounding and not counted.
  router_max_set_mismatch: float = 0.0
  # The largest router decision gap (biased score units) that rounding of a correct engine can cross.
  router_tie_gap: float = 1e-5
  # topk_weights: NMSE over the positions whose expert sets agree (weights lined up by expert id).
  router_weights_nmse: float = 1e-6
  # logits, decode_logits: llama-perplexity's Mean KLD (upper) and Same top p (lower, fraction).
  logits_mean_kld: float = 1e-4
  logits_min_same_top_p: float = 0.99
  # Stage-wise (stagewise.py: each half-layer recomputed from the candidate's own input): NMSE of a stage's
  # output (attn_latent, the attention and feed-forward blocks' contributions, router scores, expert weights).
  stage_nmse: float = 1e-9
  # The same for a stage in which the emulated engine quantizes no activation (every matmul weight of the
  # block has vec_dot type F32, as in an F32 file): its noise is float32 rounding, not Q8 code flips, so a
  # bug far below stage_nmse is still far above it.
  stage_nmse_unquantized: float = 1e-9
  # Stage-wise head (logits from the candidate's last hidden state): Mean KLD.
  stage_logits_kld: float = 1e-8
  # Stage-wise routing: the largest decision gap a flip may have when the router input is the candidate's own.
  stage_router_tie_gap: float = 1e-6


_HIGHER_IS_STRICTER = frozenset({"logits_min_same_top_p"})
_INTEGER_BOUNDS = frozenset({"bytes_max_diff_blocks", "kernel_max_ulp"})

PROFILES: dict[str, Thresholds] = {
  # An engine that computes in float32 without quantizing activations (differences: summation order,
  # transcendental implementations, fused kernels), judged against an `emulation: none` golden.
  "float32": Thresholds(),
  # llama.cpp's CPU backend (activations quantized to the weight's vec_dot_type before every matmul, F16 or
  # F32 KV cache, 1 or 2 threads, one batch or small ubatches), judged against the golden that emulates it
  # (`emulation: llama-cpu`, matching kv_cache). Calibrated on llama.cpp itself at every setting of
  # reference.llama_cpp_run.CALIBRATION_SETTINGS on every model golden (docs/diff.md has the worst values and
  # margins): the stage bounds are the verdict (worst clean stage 1.3e-6, smallest planted-bug stage effect
  # 1.8e-5; in blocks that quantize no activation, as in F32 files, worst clean 3.3e-9 (9.7e-9 on inputs a
  # bug upstream had moved) against a smallest effect of 2.4e-7); the end-to-end ones only absorb how correct runs drift apart (worst mean KLD 0.012 prefill, 0.020
  # decode) and judge logits-only candidates and decode_logits. Kernels and file bytes stay exact.
  "llama-cpu": Thresholds(
    intermediate_nmse=0.1,
    router_max_set_mismatch=0.0,
    router_tie_gap=0.1,
    router_weights_nmse=2e-3,
    logits_mean_kld=0.05,
    logits_min_same_top_p=0.75,
    stage_nmse=5e-6,
    stage_nmse_unquantized=5e-8,
    stage_logits_kld=1e-9,
    stage_router_tie_gap=1e-5,
  ),
  # The same with flash attention: llama.cpp's CPU kernel converts Q, K and V to F16 and accumulates V·softmax
  # in F16 with an online softmax, which the golden does not emulate (its F16-KV golden rounds the cache and
  # the two matmul inputs only), so the attention stages carry F16 accumulation noise (worst clean 5.1e-5, and
  # 3.6e-7 in blocks that quantize no activation: a RoPE-base-sized bug can pass here). Chosen automatically
  # when the candidate's meta.llama_cpp records flash attention.
  "llama-cpu-fa": Thresholds(
    intermediate_nmse=0.1,
    router_max_set_mismatch=0.0,
    router_tie_gap=0.3,
    router_weights_nmse=3e-3,
    logits_mean_kld=0.08,
    logits_min_same_top_p=0.7,
    stage_nmse=2e-4,
    stage_nmse_unquantized=2e-6,
    stage_logits_kld=1e-9,
    stage_router_tie_gap=1e-5,
  ),
}
# The profile a golden is judged under by default, from its `emulation` metadata.
PROFILE_FOR_EMULATION = {"none": "float32", "llama-cpu": "llama-cpu"}
DEFAULT_PROFILE = "float32"


def threshold_names() -> list[str]:
  return [f.name for f in dataclasses.fields(Thresholds)]


def apply_overrides(base: Thresholds, items: Sequence[str]) -> tuple[Thresholds, dict[str, dict]]:
  """base with `NAME=VALUE` overrides applied, and a record of each (value, profile value, looser/stricter)."""
  names = threshold_names()
  changes: dict[str, float] = {}
  for item in items:
    name, sep, text = item.partition("=")
    name = name.strip()
    if not sep:
      raise BadInput(f"--threshold {item!r}: expected NAME=VALUE")
    if name not in names:
      raise BadInput(f"--threshold {item!r}: unknown threshold {name!r}; known: {', '.join(names)}")
    try:
      value = int(text) if name in _INTEGER_BOUNDS else float(text)
    except ValueError:
      kind = "an integer" if name in _INTEGER_BOUNDS else "a number"
      raise BadInput(f"--threshold {item!r}: {text!r} is not {kind}") from None
    if not math.isfinite(value) or value < 0 or (name in _HIGHER_IS_STRICTER and value > 1):
      raise BadInput(f"--threshold {item!r}: out of range (finite, >= 0, and <= 1 for a fraction)")
    changes[name] = value
  record = {}
  for name, value in changes.items():
    was = getattr(base, name)
    looser = value < was if name in _HIGHER_IS_STRICTER else value > was
    tighter = value > was if name in _HIGHER_IS_STRICTER else value < was
    record[name] = {
      "value": value,
      "profile_value": was,
      "change": "looser" if looser else "stricter" if tighter else "unchanged",
    }
  return dataclasses.replace(base, **changes), record


# ------------------------------------------------------------------------------------------ golden kinds


class TensorKind(enum.StrEnum):
  BYTES = "bytes"  # ggml block data, bit-exact
  KERNEL_FLOATS = "kernel floats"  # exact float32 (ULP)
  INPUT = "input"  # must be identical: the candidate's copy of an input of the golden
  FLOATS = "intermediate"  # NMSE
  LOGITS = "logits"  # llama-perplexity statistics
  ROUTER_IDS = "router ids"  # expert sets
  ROUTER_WEIGHTS = "router weights"  # NMSE, lined up by expert id
  INTS = "integers"  # any other integer tensor: exact
  GGUF_TENSOR = "gguf tensor"  # ggml type, shape and bytes
  STAGE = "stage"  # one half-layer recomputed from the candidate's own input: NMSE of its output


class Status(enum.StrEnum):
  PASS = "PASS"
  FAIL = "FAIL"
  INFO = "INFO"  # reported, not judged


LOGIT_TENSORS = ("logits", "decode_logits")
# The order in which a layer's values are produced: the first-divergence walk follows it.
LAYER_STAGES = ("attn_latent", "hidden_after_attn", "topk_ids", "hidden_after_mlp")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def tensor_kind(kind: GoldenKind, name: str, g: np.ndarray) -> TensorKind:
  is_float = g.dtype.kind == "f"
  if kind is GoldenKind.KERNEL:
    if name in ("x", "imatrix"):
      return TensorKind.INPUT
    if name == "quantized" or g.dtype == np.uint8:
      return TensorKind.BYTES
    return TensorKind.KERNEL_FLOATS if is_float else TensorKind.INTS
  if name == "tokens":
    return TensorKind.INPUT
  if name in LOGIT_TENSORS:
    return TensorKind.LOGITS
  m = _BLK.match(name)
  if m and m.group(2) == "topk_ids":
    return TensorKind.ROUTER_IDS
  if m and m.group(2) == "topk_weights":
    return TensorKind.ROUTER_WEIGHTS
  return TensorKind.FLOATS if is_float else TensorKind.INTS


_EXPECT = {
  TensorKind.BYTES: Expect.BYTES,
  TensorKind.KERNEL_FLOATS: Expect.FLOAT32,
  TensorKind.FLOATS: Expect.FLOAT,
  TensorKind.LOGITS: Expect.FLOAT,
  TensorKind.ROUTER_WEIGHTS: Expect.FLOAT,
  TensorKind.ROUTER_IDS: Expect.INT,
  TensorKind.INTS: Expect.INT,
}


def _expect_for(golden: Golden) -> Callable[[str], Expect]:
  def expect(name: str) -> Expect:
    g = golden.dump.tensors[name]
    k = tensor_kind(golden.kind, name, g)
    if k is TensorKind.INPUT:
      return Expect.FLOAT32 if g.dtype.kind == "f" else Expect.INT
    return _EXPECT[k]

  return expect


# ------------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  kind: TensorKind
  status: Status
  summary: str  # the metric values, one line
  bound: str  # the bound applied, human readable
  metrics: Mapping
  note: str = ""  # how the candidate tensor was read (batch axis dropped, dtype converted)


def _g(x) -> str:
  if x is None:
    return "-"
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return f"{x:.3g}"


def _within(value: float, bound: float) -> bool:
  return bool(value <= bound)  # NaN is never within a bound


def _deltas_text(first: metrics.BlockDiff) -> str:
  parts = []
  for d in first.deltas[:3]:
    bits = ",".join(str(b) for b in d.bits)
    parts.append(
      f"byte +{d.offset_in_block}: {d.golden:#04x} vs {d.candidate:#04x} (xor {d.xor:#04x}, bit {bits})"
    )
  more = f"; {first.n_bytes_differ} bytes, {first.n_bits_differ} bits differ in this block"
  return ", ".join(parts) + more


def _byte_metrics(d: metrics.ByteDiff) -> dict:
  out: dict = {
    "blocks": d.n_blocks,
    "blocks_differ": d.n_blocks_differ,
    "bytes_differ": d.n_bytes_differ,
    "first": None,
  }
  if d.first is not None:
    f = d.first
    out["first"] = {
      "row": f.row,
      "block": f.block,
      "byte_offset": f.byte_offset,
      "bytes_differ": f.n_bytes_differ,
      "bits_differ": f.n_bits_differ,
      "bytes": [
        {
          "offset_in_block": x.offset_in_block,
          "golden": x.golden,
          "candidate": x.candidate,
          "xor": x.xor,
          "bits": list(x.bits),
        }
        for x in f.deltas
      ],
    }
  return out


def bytes_row(
  name: str,
  g: np.ndarray,
  c: np.ndarray,
  block_bytes: int,
  thr: Thresholds,
  kind: TensorKind = TensorKind.BYTES,
  where: str = "",
) -> Row:
  d = metrics.byte_diff(g, c, block_bytes)
  if d.first is None:
    summary = f"identical ({d.n_blocks} blocks)"
  else:
    f = d.first
    summary = (
      f"{d.n_blocks_differ} of {d.n_blocks} blocks differ; first: row {f.row}, block {f.block}, byte "
      f"offset {f.byte_offset}{where}: {_deltas_text(f)}"
    )
  return Row(
    name,
    kind,
    Status.PASS if d.n_blocks_differ <= thr.bytes_max_diff_blocks else Status.FAIL,
    summary,
    f"<= {thr.bytes_max_diff_blocks} blocks differ",
    _byte_metrics(d),
  )


def _float_metrics(fe: metrics.FloatErrors) -> dict:
  return dataclasses.asdict(fe)


def kernel_float_row(name: str, g: np.ndarray, c: np.ndarray, thr: Thresholds) -> Row:
  fe = metrics.float_errors(g, c)
  at = f" at {list(fe.max_ulp_index)}" if fe.max_ulp_index else ""
  summary = (
    f"max ULP {_g(fe.max_ulp)}{at}, max abs {_g(fe.max_abs)}, max rel {_g(fe.max_rel)}, NMSE {_g(fe.nmse)}"
  )
  if fe.bits_differ and fe.max_ulp == 0:
    summary += f"; {fe.bits_differ} elements differ only in the sign of zero or a NaN payload"
  if fe.nan_mismatch:
    summary += f"; {fe.nan_mismatch} NaN in one only"
  ok = _within(fe.max_ulp, thr.kernel_max_ulp)
  return Row(
    name,
    TensorKind.KERNEL_FLOATS,
    Status.PASS if ok else Status.FAIL,
    summary,
    f"max ULP <= {thr.kernel_max_ulp}",
    _float_metrics(fe),
  )


def input_row(name: str, g: np.ndarray, c: np.ndarray, cand_path: str) -> Row:
  """The candidate's copy of an input: anything but identical means it computed from other inputs."""
  if g.dtype.kind == "f":
    differs = np.asarray(g, np.float32).view(np.uint32) != np.asarray(c, np.float32).view(np.uint32)
  else:
    differs = np.asarray(g, np.int64) != np.asarray(c, np.int64)
  if differs.any():
    at = [int(i) for i in np.argwhere(differs)[0]]
    raise BadInput(
      f"{cand_path}: tensor {name!r} differs from the golden's input at {at} ({c[tuple(at)]} vs "
      f"{g[tuple(at)]}): the candidate was computed from different inputs"
    )
  return Row(name, TensorKind.INPUT, Status.PASS, "identical to the golden's input", "identical", {})


def floats_row(
  name: str,
  g: np.ndarray,
  c: np.ndarray,
  bound: float,
  kind: TensorKind = TensorKind.FLOATS,
  extra: str = "",
  extra_metrics: Mapping | None = None,
) -> Row:
  fe = metrics.float_errors(g, c)
  m = _float_metrics(fe) | dict(extra_metrics or {})
  summary = (
    f"NMSE {_g(fe.nmse)}, max abs {_g(fe.max_abs)}, max rel {_g(fe.max_rel)}, max ULP {_g(fe.max_ulp)}"
  )
  if g.ndim == 2 and g.shape[0] > 1:
    per = metrics.nmse_rows(g, c)
    worst = int(np.argmax(np.where(np.isnan(per), np.inf, per)))  # NaN ranks worst
    m["worst_token"], m["worst_token_nmse"] = worst, float(per[worst])
    if per[worst] != 0:
      summary += f"; worst token {worst} (NMSE {_g(float(per[worst]))})"
  return Row(
    name,
    kind,
    Status.PASS if _within(fe.nmse, bound) else Status.FAIL,
    summary + extra,
    f"NMSE <= {_g(bound)}",
    m,
  )


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
  bound = f"Mean KLD <= {_g(thr.logits_mean_kld)}, Same top p >= {100 * thr.logits_min_same_top_p:g} %"
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
    f"Mean KLD {_g(s.kld_mean)} ± {_g(s.kld_unc)}, Maximum KLD {_g(s.kld['max'])}, "
    f"Same top p {100 * s.same_top_p:.3f} ± {100 * s.same_top_p_unc:.3f} %"
  )
  if "RMS Δp" in m:
    summary += f", Mean Δp {m['Mean Δp']:.3f} %, RMS Δp {m['RMS Δp']:.3f} %"
  summary += f", NMSE {_g(m['NMSE'])}, max abs {_g(s.max_abs)} ({s.n} positions)"
  ok = _within(s.kld_mean, thr.logits_mean_kld) and s.same_top_p >= thr.logits_min_same_top_p
  status = (Status.PASS if ok else Status.FAIL) if status_if_judged else Status.INFO
  return Row(
    label or name, TensorKind.LOGITS, status, summary, bound if status_if_judged else "not judged", m
  )


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
      f"; {ex.size} explained (golden gap <= {_g(thr.router_tie_gap)}, a near-tie rounding can "
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
      else f"golden gap {_g(float(flips.margins[t]))}"
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
    f"decisive flips <= {_g(thr.router_max_set_mismatch)} of positions; tie gap {_g(thr.router_tie_gap)}",
    m,
  )


def router_weights_row(
  name: str, g: np.ndarray, c: np.ndarray, g_ids: np.ndarray | None, c_ids: np.ndarray | None, thr: Thresholds
) -> Row:
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
      f"NMSE <= {_g(thr.router_weights_nmse)}",
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


def ints_row(name: str, g: np.ndarray, c: np.ndarray) -> Row:
  differs = np.asarray(g, np.int64) != np.asarray(c, np.int64)
  if not differs.any():
    return Row(name, TensorKind.INTS, Status.PASS, "identical", "identical", {"differ": 0})
  at = [int(i) for i in np.argwhere(differs)[0]]
  return Row(
    name,
    TensorKind.INTS,
    Status.FAIL,
    f"{int(differs.sum())} values differ; first at {at}: {c[tuple(at)]} vs golden {g[tuple(at)]}",
    "identical",
    {"differ": int(differs.sum()), "first": at},
  )


# --------------------------------------------------------------------------------------- comparisons


_TOP_ORDER = ("tokens", "x", "imatrix", "quantized", "dequantized", *LOGIT_TENSORS)
_STAGE_ORDER = (
  "attn_latent",
  "hidden_after_attn",
  "router_scores",
  "topk_ids",
  "topk_weights",
  "hidden_after_mlp",
)


def _row_order(name: str) -> tuple:
  """Rows in the order values are computed: inputs, logits, then layer by layer and stage by stage."""
  if name in _TOP_ORDER:
    return (0, _TOP_ORDER.index(name), 0, name)
  m = _BLK.match(name)
  if m:
    stage = m.group(2)
    return (
      1,
      int(m.group(1)),
      _STAGE_ORDER.index(stage) if stage in _STAGE_ORDER else len(_STAGE_ORDER),
      name,
    )
  return (2, 0, 0, name)


def _layers(names) -> list[int]:
  return sorted({int(m.group(1)) for n in names if (m := _BLK.match(n))})


def _next_tokens(golden: Golden) -> tuple[np.ndarray | None, int | None]:
  tokens = golden.dump.tensors.get("tokens")
  prefill = golden.info.get("prefill")
  if tokens is None:
    return None, None
  tokens = np.asarray(tokens, np.int64).reshape(-1)
  dec = golden.dump.tensors.get("decode_logits")
  if prefill is None and dec is not None:
    prefill = tokens.size - dec.shape[0]
  return tokens, (int(prefill) if prefill is not None else None)


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
  tokens, prefill = _next_tokens(golden)
  notes: list[str] = []
  rows = []
  for name in sorted(gt, key=_row_order):
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
      layer = int(_BLK.match(name).group(1))
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


def _first_beyond(
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
  for layer in _layers(gt):
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
      found = _first_beyond(layer, name, per, bound, metric)
      if found is not None:
        return found
  if "logits" in m.tensors:
    g, c = np.asarray(gt["logits"]), m.tensors["logits"]
    if np.isfinite(c).all():
      per = logit_stats.per_position_kld(g, c)
    else:
      per = np.where(np.isfinite(c).all(-1), 0.0, np.inf)
    return _first_beyond(None, "logits", per, thr.logits_mean_kld, "per-token KLD")
  return None


def compare_kernel(golden: Golden, m: dumps.Matched, thr: Thresholds, cand_path: str) -> list[Row]:
  rows = []
  for name in sorted(golden.dump.tensors, key=_row_order):
    if name not in m.tensors:
      continue
    g, c = np.asarray(golden.dump.tensors[name]), m.tensors[name]
    k = tensor_kind(golden.kind, name, g)
    if k is TensorKind.INPUT:
      row = input_row(name, g, c, cand_path)
    elif k is TensorKind.BYTES:
      row = bytes_row(name, g, c, golden.info["block_bytes"], thr)
    elif k is TensorKind.KERNEL_FLOATS:
      row = kernel_float_row(name, g, c, thr)
    else:
      row = ints_row(name, g, c)
    rows.append(dataclasses.replace(row, note=m.notes.get(name, "")))
  return rows


def _block_bytes(type_id: int) -> tuple[int, int]:
  from dq3jax.qtypes import REGISTRY  # noqa: PLC0415

  q = REGISTRY[type_id]  # read_gguf refuses a tensor whose type the registry does not know
  return q.block_elems, q.block_bytes


def _short(v) -> object:
  text = repr(v)
  return v if len(text) <= 80 else text[:77] + "..."


def compare_gguf(g, c, thr: Thresholds) -> tuple[list[Row], list[dict]]:
  """Every tensor of golden GGUF g against candidate GGUF c: ggml type, shape, then the bytes.

  A tensor missing from either file, or of another type or shape, is out of bounds (the files differ).
  Metadata differences are listed, not judged.
  """
  rows = []
  for name, te in g.tensors.items():
    ce = c.tensors.get(name)
    desc = f"{te.type_name} {list(te.ne)}"
    if ce is None:
      rows.append(
        Row(
          name,
          TensorKind.GGUF_TENSOR,
          Status.FAIL,
          f"missing from the candidate (golden: {desc})",
          "same type, shape, bytes",
          {"golden": desc},
        )
      )
      continue
    if ce.type_id != te.type_id or ce.ne != te.ne:
      rows.append(
        Row(
          name,
          TensorKind.GGUF_TENSOR,
          Status.FAIL,
          f"golden {desc}, candidate {ce.type_name} {list(ce.ne)}",
          "same type, shape, bytes",
          {"golden": desc, "candidate": f"{ce.type_name} {list(ce.ne)}"},
        )
      )
      continue
    elems, nbytes = _block_bytes(te.type_id)
    row_bytes = te.ne[0] // elems * nbytes
    ga = g.raw(name).reshape(-1, row_bytes)
    ca = c.raw(name).reshape(-1, row_bytes)
    d = metrics.byte_diff(ga, ca, nbytes)
    where = ""
    if d.first is not None:
      where = f" (file offsets {te.offset + d.first.byte_offset} / {ce.offset + d.first.byte_offset})"
    row = bytes_row(name, ga, ca, nbytes, thr, TensorKind.GGUF_TENSOR, where)
    rows.append(
      dataclasses.replace(row, summary=f"{desc}: {row.summary}", bound=row.bound + ", same type and shape")
    )
  for name, ce in c.tensors.items():
    if name not in g.tensors:
      rows.append(
        Row(
          name,
          TensorKind.GGUF_TENSOR,
          Status.FAIL,
          f"not in the golden (candidate: {ce.type_name} {list(ce.ne)})",
          "same tensors",
          {},
        )
      )
  meta = []
  for key in list(g.kv) + [k for k in c.kv if k not in g.kv]:
    gv, cv = g.kv.get(key, "<missing>"), c.kv.get(key, "<missing>")
    if gv != cv:
      meta.append({"key": key, "golden": _short(gv), "candidate": _short(cv)})
  return rows, meta


# --------------------------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class Report:
  golden: str
  golden_kind: str
  golden_info: Mapping
  manifest: Mapping | None
  candidate: str
  candidate_format: str
  profile: str
  thresholds: Thresholds
  overrides: Mapping
  rows: tuple[Row, ...]
  unknown: tuple[str, ...] = ()  # candidate tensors the golden does not have (not compared)
  not_supplied: tuple[str, ...] = ()  # golden tensors the candidate did not supply (not compared)
  notes: tuple[str, ...] = ()
  first_divergence: Mapping | None = None
  metadata_differences: tuple[Mapping, ...] = ()

  @property
  def failed(self) -> list[Row]:
    return [r for r in self.rows if r.status is Status.FAIL]

  @property
  def exit_code(self) -> int:
    return 1 if self.failed else 0

  def to_json(self) -> dict:
    return _jsonable(
      {
        "result": "FAIL" if self.failed else "PASS",
        "exit_code": self.exit_code,
        "golden": {
          "path": self.golden,
          "kind": self.golden_kind,
          **self.golden_info,
          "manifest": self.manifest,
        },
        "candidate": {"path": self.candidate, "format": self.candidate_format},
        "profile": self.profile,
        "thresholds": dataclasses.asdict(self.thresholds),
        "overrides": self.overrides,
        "rows": [
          {
            "name": r.name,
            "kind": r.kind.value,
            "status": r.status.value,
            "summary": r.summary,
            "bound": r.bound,
            "note": r.note,
            "metrics": r.metrics,
          }
          for r in self.rows
        ],
        "unknown_candidate_tensors": self.unknown,
        "not_supplied": self.not_supplied,
        "first_divergence": self.first_divergence,
        "metadata_differences": self.metadata_differences,
        "notes": self.notes,
      }
    )

  def to_markdown(self) -> str:
    what = ", ".join(
      f"{k} {v}" for k, v in self.golden_info.items() if k not in ("block_elems", "block_bytes")
    )
    verified = (
      f"sha256 verified against {self.manifest['path']}"
      if self.manifest
      else "not listed in a manifest: not verified"
    )
    thr = ", ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(self.thresholds).items())
    lines = [
      f"golden:     {self.golden} ({self.golden_kind}{'; ' + what if what else ''}; {verified})",
      f"candidate:  {self.candidate} ({self.candidate_format})",
      f"thresholds: profile {self.profile}: {thr}",
    ]
    for name, o in self.overrides.items():
      change = o["change"].upper() if o["change"] == "looser" else o["change"]
      lines.append(f"            override {name}={o['value']:g} (profile {o['profile_value']:g}: {change})")
    lines += ["", "| tensor | kind | metrics | bound | result |", "|---|---|---|---|---|"]
    for r in self.rows:
      summary = r.summary + (f" [{r.note}]" if r.note else "")
      lines.append(f"| {_cell(r.name)} | {r.kind} | {_cell(summary)} | {_cell(r.bound)} | {r.status} |")
    lines.append("")
    if self.unknown:
      lines.append(f"candidate tensors the golden does not have (not compared): {_names(self.unknown)}")
    if self.not_supplied:
      lines.append(f"golden tensors the candidate did not supply (not compared): {_names(self.not_supplied)}")
    for d in self.metadata_differences:
      lines.append(f"metadata {d['key']}: golden {d['golden']!r}, candidate {d['candidate']!r} (not judged)")
    for n in self.notes:
      lines.append(f"note: {n}")
    fd = self.first_divergence
    if fd is not None:
      where = f"layer {fd['layer']}, " if fd["layer"] is not None else ""
      why = (
        fd["metric"]
        if fd["tensor"].endswith("topk_ids")
        else f"{fd['metric']} {_g(fd['value'])} > {_g(fd['bound'])}"
      )
      within = " (every tensor still within its bound)" if not self.failed else ""
      lines.append(f"first divergence{within}: {where}{fd['tensor']}, token {fd['token']} ({why})")
    n = len(self.rows)
    verdict = (
      f"FAIL: {len(self.failed)} of {n} tensors out of bounds"
      if self.failed
      else f"PASS: {n} tensors within bounds"
    )
    lines.append(f"result: {verdict}")
    return "\n".join(lines)


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _names(names: Sequence[str], limit: int = 20) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _jsonable(x):
  """JSON-safe copy: non-finite floats as strings ("inf", "nan"), numpy scalars as Python, tuples as lists."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, enum.Enum):
    return x.value
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def write_json(path: str | os.PathLike, obj: dict) -> None:
  """Write obj as JSON atomically (dq3jax.io.atomic)."""
  from dq3jax.io.atomic import atomic_path  # noqa: PLC0415

  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False, allow_nan=False)
    f.write("\n")


# ------------------------------------------------------------------------------------------------- diff


def _judge_routing(
  golden: Golden, m: dumps.Matched, thr: Thresholds, notes: list[str], allow_recompute: bool = True
) -> tuple[Mapping[str, np.ndarray], dict[int, routing.Flips], bool]:
  """Classify the candidate's expert sets layer by layer; where flips are explained, recompute the golden with
  the candidate's experts there (repeating, since a forced choice changes later layers' scores) so everything
  downstream is judged against what the golden model gives after the same choices.

  Returns (golden tensors to judge against, flips per MoE layer against the original golden, recomputed)."""
  gt: Mapping[str, np.ndarray] = golden.dump.tensors
  layers = [i for i in _layers(gt) if f"blk.{i}.topk_ids" in gt and f"blk.{i}.topk_ids" in m.tensors]
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


def _engine_settings(cand: dumps.Dump) -> dict:
  """The settings a candidate records about its engine (`meta.llama_cpp`, JSON), or {}."""
  meta = cand.metadata.get("llama_cpp")
  if not meta:
    return {}
  try:
    out = json.loads(meta)
  except json.JSONDecodeError:
    out = None
  if not isinstance(out, dict):
    raise BadInput(f"{cand.path}: meta.llama_cpp is not a JSON object")
  return out


def _check_settings(golden: Golden, settings: Mapping, cand_path: str) -> None:
  """A candidate that records its KV cache type must match the golden's emulation (else the bounds, which are
  calibrated for matching settings, say nothing). The effective type counts: with flash attention llama.cpp
  converts an F32 cache to F16 (reference/llama_cpp_run.py)."""
  want = golden.info.get("kv_cache")
  have = settings.get("kv_effective", settings.get("kv_cache"))
  if want and have and have != want:
    sibling = {"f16": "R.llama-cpu-f16kv.safetensors", "f32": "R.llama-cpu.safetensors"}.get(have, "?")
    raise BadInput(
      f"{cand_path}: the engine ran with an effective {have} KV cache, the golden {golden.dump.path} emulates "
      f"a {want} cache; compare against outputs/{sibling}"
    )


def profile_for(golden_emulation: str | None, settings: Mapping) -> str:
  """The profile a golden is judged under by default: from its emulation, and for llama.cpp with flash
  attention (whose F16 accumulation the golden does not emulate) the looser flash-attention profile."""
  profile = PROFILE_FOR_EMULATION.get(golden_emulation or "none", DEFAULT_PROFILE)
  if profile == "llama-cpu" and settings.get("flash_attn"):
    profile = "llama-cpu-fa"
  return profile


def default_profile(golden_path: str | os.PathLike, candidate_path: str | os.PathLike) -> str:
  """The profile used when none is given (profile_for), read from the two files' metadata."""
  try:
    meta = dumps.load(golden_path).metadata if dumps.sniff(golden_path) == "safetensors" else {}
    cand = dumps.load(candidate_path) if dumps.sniff(candidate_path) == "npz" else None
  except BadInput:
    return DEFAULT_PROFILE  # diff() reports the bad input itself
  return profile_for(meta.get("emulation"), _engine_settings(cand) if cand is not None else {})


STAGE_TAG = " [stage]"


def _judge_stages(
  golden: Golden, m: dumps.Matched, thr: Thresholds, notes: list[str]
) -> tuple[list[Row], dict | None]:
  """Stage-wise rows (stagewise.py) and the first stage that leaves its bound, when the candidate supplied its
  per-layer residuals and the golden can be recomputed; else no rows and a note."""
  config = (golden.entry or {}).get("config") or {}
  n = config.get("num_hidden_layers")
  path = recompute._gguf_path(golden)
  if not n or path is None or "tokens" not in golden.dump.tensors:
    return [], None
  missing = [k for k in stagewise.required(int(n)) if k not in m.tensors]
  if missing:
    notes.append(
      f"stage-wise judging needs every layer's hidden_after_attn and hidden_after_mlp; missing "
      f"{_names(missing, 4)}"
    )
    return [], None
  cand = m.tensors
  spec = recompute.router_spec(golden)
  st, emb = stagewise.golden_stages(path, golden, cand, {})
  moe_layers = [i for i in range(n) if f"blk.{i}.topk_ids" in st and f"blk.{i}.topk_ids" in cand]
  flips = {
    i: routing.classify(
      st[f"blk.{i}.topk_ids"],
      cand[f"blk.{i}.topk_ids"],
      st[f"blk.{i}.router_scores"],
      spec,
      thr.stage_router_tie_gap,
    )
    for i in moe_layers
  }
  forced = {}
  for i, f in flips.items():
    if f.explained.any():
      over = np.full(cand[f"blk.{i}.topk_ids"].shape, -1, np.int64)
      over[f.explained] = cand[f"blk.{i}.topk_ids"][f.explained]
      forced[i] = over
  st_ids = {i: st[f"blk.{i}.topk_ids"] for i in moe_layers}
  if forced:  # stages are independent: forcing layer i's experts changes only layer i's feed-forward block
    st, _ = stagewise.golden_stages(path, golden, cand, forced)
  tokens, _ = _next_tokens(golden)
  rows: list[Row] = []
  walk: list[
    tuple[str, int | None, np.ndarray, float, str]
  ] = []  # (row name, layer, per token, bound, metric)

  emulated = golden.info.get("emulation", "none") == "llama-cpu"

  def stage_row(name: str, layer: int, g: np.ndarray, c: np.ndarray, what: str, *weights: str) -> None:
    # weights: the params subtree of the layer whose matmuls make this stage's output
    quantized = emulated and stagewise.quantizes_activations(path, layer, *weights)
    bound = thr.stage_nmse if quantized else thr.stage_nmse_unquantized
    extra = f" ({what}{'' if quantized else '; no activation quantized in this block'})"
    row = floats_row(
      name + STAGE_TAG,
      g,
      c,
      bound,
      TensorKind.STAGE,
      extra=extra,
      extra_metrics={"activations_quantized": quantized},
    )
    rows.append(row)
    walk.append(
      (
        name + STAGE_TAG,
        layer,
        metrics.nmse_rows(g.reshape(g.shape[0], -1), c.reshape(c.shape[0], -1)),
        bound,
        "per-token NMSE",
      )
    )

  for i in range(n):
    h_in = emb if i == 0 else cand[f"blk.{i - 1}.hidden_after_mlp"]
    src = "the token embedding" if i == 0 else f"the candidate's blk.{i - 1}.hidden_after_mlp"
    if f"blk.{i}.attn_latent" in cand:
      stage_row(
        f"blk.{i}.attn_latent",
        i,
        st[f"blk.{i}.attn_latent"],
        cand[f"blk.{i}.attn_latent"],
        f"from {src}",
        "attn",
        "wkv_a",
      )
    h_attn = cand[f"blk.{i}.hidden_after_attn"]
    stage_row(
      f"blk.{i}.attention",
      i,
      st[f"blk.{i}.hidden_after_attn"] - h_in,
      h_attn - h_in,
      f"the attention block's output, from {src}",
      "attn",
    )
    ffn_src = f"from the candidate's blk.{i}.hidden_after_attn"
    if i in moe_layers:
      if f"blk.{i}.router_scores" in cand:
        stage_row(
          f"blk.{i}.router_scores",
          i,
          st[f"blk.{i}.router_scores"],
          cand[f"blk.{i}.router_scores"],
          ffn_src,
          "mlp",
          "router",
        )
      name = f"blk.{i}.topk_ids"
      ids_thr = dataclasses.replace(thr, router_tie_gap=thr.stage_router_tie_gap)
      rows.append(
        dataclasses.replace(
          router_ids_row(name, flips[i], st_ids[i], cand[name], ids_thr, bool(forced)), name=name + STAGE_TAG
        )
      )
      walk.append((name + STAGE_TAG, i, flips[i].decisive.astype(np.float64), 0.0, "decisive expert flip"))
      if f"blk.{i}.topk_weights" in cand:
        w = router_weights_row(
          f"blk.{i}.topk_weights",
          st[f"blk.{i}.topk_weights"],
          cand[f"blk.{i}.topk_weights"],
          st[name],
          cand[name],
          dataclasses.replace(thr, router_weights_nmse=thr.stage_nmse),
        )
        rows.append(dataclasses.replace(w, name=w.name + STAGE_TAG))
    stage_row(
      f"blk.{i}.feed-forward",
      i,
      st[f"blk.{i}.hidden_after_mlp"] - h_attn,
      cand[f"blk.{i}.hidden_after_mlp"] - h_attn,
      f"the MLP/MoE block's output, {ffn_src}",
      "mlp",
    )
  if "logits" in cand:
    nxt = tokens[1:] if tokens is not None and tokens.size == st["logits"].shape[0] else None
    head_thr = dataclasses.replace(thr, logits_mean_kld=thr.stage_logits_kld)
    row = logits_row("logits", st["logits"], cand["logits"], nxt, head_thr)
    rows.append(
      dataclasses.replace(
        row,
        name="head" + STAGE_TAG,
        summary=row.summary + f" (from the candidate's blk.{n - 1}.hidden_after_mlp)",
      )
    )
    if np.isfinite(cand["logits"]).all():
      walk.append(
        (
          "head" + STAGE_TAG,
          None,
          logit_stats.per_position_kld(st["logits"], cand["logits"]),
          thr.stage_logits_kld,
          "per-token KLD",
        )
      )
  # The first stage, in the order values are computed, that is out of bounds as a whole (a single token of a
  # passing stage may exceed the bound by noise); within it the first token beyond the bound (else its worst).
  failed = {r.name for r in rows if r.status is Status.FAIL}
  first = next((_first_beyond(layer, name, per, bound, metric, or_worst=True)
                for name, layer, per, bound, metric in walk if name in failed), None)  # fmt: skip
  return rows, first


def diff(
  golden_path: str | os.PathLike,
  candidate_path: str | os.PathLike,
  *,
  thresholds: Thresholds | None = None,
  profile: str | None = None,
  overrides: Mapping | None = None,
) -> Report:
  """Compare a candidate with a golden file; raises BadInput when they cannot be compared. profile: None
  picks the golden's own (PROFILE_FOR_EMULATION)."""
  golden = open_golden(golden_path)
  cand = open_candidate(candidate_path, golden)
  settings = _engine_settings(cand)
  if profile is None:
    profile = profile_for(golden.info.get("emulation"), settings)
  thr = thresholds if thresholds is not None else PROFILES[profile]
  common = dict(
    golden=golden.dump.path,
    golden_kind=golden.kind.value,
    golden_info=golden.info,
    manifest=golden.manifest,
    candidate=cand.path,
    candidate_format=cand.format,
    profile=profile,
    thresholds=thr,
    overrides=dict(overrides or {}),
  )
  if golden.kind is GoldenKind.MODEL_GGUF:
    rows, meta = compare_gguf(golden.dump.gguf, cand.gguf, thr)
    return Report(**common, rows=tuple(rows), metadata_differences=tuple(meta))
  matched = dumps.match(cand, golden.dump, _expect_for(golden))
  notes: list[str] = []
  fd = None
  if golden.kind is GoldenKind.KERNEL:
    rows = compare_kernel(golden, matched, thr, cand.path)
  else:
    _check_settings(golden, settings, cand.path)
    expected = profile_for(golden.info.get("emulation"), settings)
    if expected != profile:
      notes.append(
        f"the golden and the engine's settings call for profile {expected!r}; judged under {profile!r}"
      )
    # With every layer's residuals the verdict is stage-wise and the end-to-end rows are only reported, so the
    # golden is not recomputed for end-to-end expert flips.
    staged = stagewise.possible(golden, matched.tensors)
    gt, flips, recomputed = _judge_routing(golden, matched, thr, notes, allow_recompute=not staged)
    rows, more = compare_model_outputs(golden, gt, matched, thr, flips, recomputed, cand.path)
    notes += more
    stage_rows, stage_fd = _judge_stages(golden, matched, thr, notes)
    if stage_rows:
      # Every stage was judged on the candidate's own inputs; end to end, the prefill tensors then differ only
      # by how rounding differences compound (Q8 code flips, near-tie experts), which says nothing about the
      # engine. They are reported, not judged. decode_logits has no stage-wise counterpart and stays judged.
      rows = [
        r
        if r.name == "decode_logits" or r.status is Status.INFO
        else dataclasses.replace(r, status=Status.INFO, bound="reported (stage-wise judged)")
        for r in rows
      ]
      notes.append(
        "judged stage by stage on the candidate's own inputs (rows marked [stage]); end-to-end prefill "
        "rows are reported only"
      )
    rows += stage_rows
    # The stage that departs is where the error is made; end to end, it is only where it became visible.
    fd = stage_fd if stage_rows else first_divergence(gt, matched, thr, flips)
    decode_failed = any(r.name == "decode_logits" and r.status is Status.FAIL for r in rows)
    if stage_rows and fd is None and decode_failed:
      per = (
        logit_stats.per_position_kld(np.asarray(gt["decode_logits"]), matched.tensors["decode_logits"])
        if np.isfinite(matched.tensors["decode_logits"]).all()
        else np.full(len(gt["decode_logits"]), np.inf)
      )
      out = np.flatnonzero(~(per <= thr.logits_mean_kld))
      if out.size:
        fd = {
          "layer": None,
          "tensor": "decode_logits",
          "token": int(out[0]),
          "metric": "per-token KLD",
          "value": float(per[out[0]]),
          "bound": thr.logits_mean_kld,
        }
  return Report(
    **common,
    rows=tuple(rows),
    unknown=matched.unknown,
    not_supplied=tuple(sorted(matched.not_supplied, key=_row_order)),
    notes=tuple(notes),
    first_divergence=fd,
  )
