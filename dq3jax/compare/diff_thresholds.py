"""The bounds `dq3jax diff` judges by: `Thresholds`, its named profiles and `--threshold NAME=VALUE`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from dq3jax.compare.dumps import BadInput


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
  """The names of the bounds (the fields of Thresholds), as --threshold takes them."""
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
