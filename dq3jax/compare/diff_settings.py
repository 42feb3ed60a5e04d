"""The engine settings a candidate records (`meta.llama_cpp`) and the threshold profile a golden and those
settings call for."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from dq3jax.compare import dumps
from dq3jax.compare.diff_thresholds import DEFAULT_PROFILE, PROFILE_FOR_EMULATION
from dq3jax.compare.dumps import BadInput, Golden


def engine_settings(cand: dumps.Dump) -> dict:
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


def check_settings(golden: Golden, settings: Mapping, cand_path: str) -> None:
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
  return profile_for(meta.get("emulation"), engine_settings(cand) if cand is not None else {})
