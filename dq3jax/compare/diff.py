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
import os
from collections.abc import Mapping

import numpy as np

from dq3jax.compare import dumps, logit_stats, stagewise
from dq3jax.compare.diff_end_to_end import compare_model_outputs, first_divergence, judge_routing
from dq3jax.compare.diff_gguf import compare_gguf
from dq3jax.compare.diff_kernel import compare_kernel
from dq3jax.compare.diff_kinds import (
  LAYER_STAGES,
  LOGIT_TENSORS,
  TensorKind,
  expect_for,
  row_order,
  tensor_kind,
)
from dq3jax.compare.diff_report import Report, write_json
from dq3jax.compare.diff_rows import Row, Status, bytes_row, floats_row, input_row, ints_row, kernel_float_row
from dq3jax.compare.diff_rows_logits import logits_row
from dq3jax.compare.diff_rows_router import router_ids_row, router_weights_row
from dq3jax.compare.diff_settings import check_settings, default_profile, engine_settings, profile_for
from dq3jax.compare.diff_stages import STAGE_TAG, judge_stages
from dq3jax.compare.diff_thresholds import (
  DEFAULT_PROFILE,
  PROFILE_FOR_EMULATION,
  PROFILES,
  Thresholds,
  apply_overrides,
  threshold_names,
)
from dq3jax.compare.dumps import BadInput, GoldenKind, open_candidate, open_golden

# The names this module has always offered (to dq3jax.cli.diff, tests, reference/verdict_selftest.py and
# docs/diff.md); the parts live in the diff_* modules beside it.
__all__ = [
  "DEFAULT_PROFILE",
  "LAYER_STAGES",
  "LOGIT_TENSORS",
  "PROFILES",
  "PROFILE_FOR_EMULATION",
  "STAGE_TAG",
  "BadInput",
  "Report",
  "Row",
  "Status",
  "TensorKind",
  "Thresholds",
  "apply_overrides",
  "bytes_row",
  "compare_gguf",
  "compare_kernel",
  "compare_model_outputs",
  "default_profile",
  "diff",
  "first_divergence",
  "floats_row",
  "input_row",
  "ints_row",
  "kernel_float_row",
  "logits_row",
  "profile_for",
  "router_ids_row",
  "router_weights_row",
  "tensor_kind",
  "threshold_names",
  "write_json",
]


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
  settings = engine_settings(cand)
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
  matched = dumps.match(cand, golden.dump, expect_for(golden))
  notes: list[str] = []
  fd = None
  if golden.kind is GoldenKind.KERNEL:
    rows = compare_kernel(golden, matched, thr, cand.path)
  else:
    check_settings(golden, settings, cand.path)
    expected = profile_for(golden.info.get("emulation"), settings)
    if expected != profile:
      notes.append(
        f"the golden and the engine's settings call for profile {expected!r}; judged under {profile!r}"
      )
    # With every layer's residuals the verdict is stage-wise and the end-to-end rows are only reported, so the
    # golden is not recomputed for end-to-end expert flips.
    staged = stagewise.possible(golden, matched.tensors)
    gt, flips, recomputed = judge_routing(golden, matched, thr, notes, allow_recompute=not staged)
    rows, more = compare_model_outputs(golden, gt, matched, thr, flips, recomputed, cand.path)
    notes += more
    stage_rows, stage_fd = judge_stages(golden, matched, thr, notes)
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
    not_supplied=tuple(sorted(matched.not_supplied, key=row_order)),
    notes=tuple(notes),
    first_divergence=fd,
  )
