"""The verdict separates: llama.cpp itself (llama-cpp-python 0.3.36, CPU) on every model golden passes
`dq3jax diff` at every setting of `llama_cpp_run.CALIBRATION_SETTINGS` (threads 1/2, F16/F32 KV cache, flash
attention on/off, one batch / ubatches of 8), and fails with every planted engine bug of
`reference.planted_bugs` (run at llama.cpp's defaults), with the first divergence in the stage the bug is in.

The measured clean spread and bug effects behind the bounds are in docs/diff.md (`python -m
reference.verdict_selftest --json` regenerates them).
"""

from __future__ import annotations

import pytest

from reference import verdict_selftest as vs

pytestmark = pytest.mark.crosscheck

# Where each bug must be seen first: the stage (row-name part) of the first divergence.
FIRST_STAGE = {
  "gating_softmax": "router_scores",
  "routed_scale_x2.5": "feed-forward",
  "routed_scale_+5pct": "feed-forward",
  "topk_norm_off": "feed-forward",
  "selection_bias_ignored": "router_scores",
  "group_limit_ignored": "topk_ids",
  "yarn_mscale_missing": "attention",
  "yarn_mscale_on_rope": "attention",
  "rope_base_+10pct": "attention",
  "rope_pairing_neox": "attention",
  "mla_heads_swapped": "attention",
  "kquant_lanes_one_block": None,  # the stage of the tensor holding the block (checked below)
  "kquant_lanes_expert_tensor": "feed-forward",
}


def _goldens():
  return [(m, r) for m in vs.MODELS for r in vs.RECIPES]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("verdicts")


def _suite_settings():
  """Four of the eight calibration settings, covering F32 and F16 KV cache, flash attention on and off, 1 and 2
  threads, one batch and ubatches of 8. Threads and ubatch size never changed a bit in the calibration (every
  run of the full eight is in test_clean_llama_cpp_passes_at_all_eight_settings, marked slow, and in
  docs/diff.md); the KV type and flash attention are the classes that differ."""
  from reference.llama_cpp_run import CALIBRATION_SETTINGS as S  # noqa: PLC0415

  return [S[0], S[2], S[5], S[7]]  # t1 f32 fa0 all, t1 f16 fa0 ub8, t2 f32 fa1 all, t2 f16 fa1 ub8


@pytest.mark.parametrize(("model", "recipe"), _goldens(), ids=[f"{m}-{r}" for m, r in _goldens()])
def test_clean_llama_cpp_passes_at_the_settings_people_run(model, recipe, work):
  runs = vs.clean_runs(model, recipe, work, settings=_suite_settings())
  bad = [(r.setting, r.first_divergence, r.worst) for r in runs if r.result != "PASS"]
  assert bad == [], bad


@pytest.mark.slow
@pytest.mark.parametrize(("model", "recipe"), _goldens(), ids=[f"{m}-{r}" for m, r in _goldens()])
def test_clean_llama_cpp_passes_at_all_eight_settings(model, recipe, work):
  runs = vs.clean_runs(model, recipe, work)
  bad = [(r.setting, r.first_divergence, r.worst) for r in runs if r.result != "PASS"]
  assert bad == [], bad


@pytest.mark.parametrize(("model", "recipe"), _goldens(), ids=[f"{m}-{r}" for m, r in _goldens()])
def test_every_planted_bug_fails_where_it_is(model, recipe, work):
  from reference import planted_bugs  # noqa: PLC0415

  runs = vs.planted_runs(model, recipe, work)
  applicable = {b.name for b in planted_bugs.BUGS.values() if b.applies_to(vs.gguf_for(model, recipe))}
  assert {r.case for r in runs} == applicable
  # k-quant bugs need a k-quant tensor; v3-pydoc's rows are multiples of 256, so its k-quant files have them.
  if model == "v3-pydoc" and recipe not in ("F32", "Q8_0"):
    assert {"kquant_lanes_one_block", "kquant_lanes_expert_tensor"} <= applicable
  for r in runs:
    assert r.result == "FAIL", (r.case, r.worst)
    fd = r.first_divergence
    assert fd is not None, r.case
    want = FIRST_STAGE[r.case]
    if want is not None:
      assert f".{want} [stage]" in fd["tensor"], (r.case, fd)
    else:
      assert fd["tensor"].endswith("[stage]"), (r.case, fd)
