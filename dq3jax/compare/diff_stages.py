"""Stage-wise judging (stagewise.py): each half-layer recomputed from the candidate's own input and judged on
its output, and the first stage out of bounds."""

from __future__ import annotations

import dataclasses

import numpy as np

from dq3jax.compare import dumps, logit_stats, metrics, recompute, routing, stagewise
from dq3jax.compare.diff_end_to_end import first_beyond
from dq3jax.compare.diff_kinds import TensorKind, golden_tokens
from dq3jax.compare.diff_rows import Row, Status, floats_row
from dq3jax.compare.diff_rows_logits import logits_row
from dq3jax.compare.diff_rows_router import router_ids_row, router_weights_row
from dq3jax.compare.diff_text import name_list
from dq3jax.compare.diff_thresholds import Thresholds
from dq3jax.compare.dumps import Golden

STAGE_TAG = " [stage]"


def judge_stages(
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
      f"{name_list(missing, 4)}"
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
  tokens, _ = golden_tokens(golden)
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
  first = next((first_beyond(layer, name, per, bound, metric, or_worst=True)
                for name, layer, per, bound, metric in walk if name in failed), None)  # fmt: skip
  return rows, first
