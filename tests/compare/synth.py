"""Small synthetic golden files in the layouts `dq3jax diff` reads (docs/diff.md), for tests."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
from safetensors.numpy import save_file

T, V, D, R, K, E, LAYERS, PREFILL = 8, 16, 8, 4, 2, 4, 3, 5  # layer 0 dense, layers 1-2 MoE


def outputs_tensors(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {
    "tokens": rng.integers(0, V, T).astype(np.int32),
    "logits": (3 * rng.standard_normal((T, V))).astype(np.float32),
  }
  out["decode_logits"] = (out["logits"][PREFILL:] + 1e-6 * rng.standard_normal((T - PREFILL, V))).astype(
    np.float32
  )
  for i in range(LAYERS):
    out[f"blk.{i}.attn_latent"] = rng.standard_normal((T, R)).astype(np.float32)
    out[f"blk.{i}.hidden_after_attn"] = rng.standard_normal((T, D)).astype(np.float32)
    out[f"blk.{i}.hidden_after_mlp"] = rng.standard_normal((T, D)).astype(np.float32)
    if i > 0:
      out[f"blk.{i}.topk_ids"] = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
      w = rng.random((T, K)).astype(np.float32) + 0.1
      out[f"blk.{i}.topk_weights"] = (w / w.sum(1, keepdims=True)).astype(np.float32)
  return out


def with_router_scores(t: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
  """t with blk.{i}.router_scores [T, E] consistent with its topk_ids: the selected experts score 0.6..0.9,
  the others 0.1..0.4 (every decision gap at least 0.2)."""
  rng = np.random.default_rng(seed)
  t = dict(t)
  for i in range(1, LAYERS):
    s = rng.uniform(0.1, 0.4, (T, E))
    np.put_along_axis(s, t[f"blk.{i}.topk_ids"].astype(np.int64), rng.uniform(0.6, 0.9, (T, K)), 1)
    t[f"blk.{i}.router_scores"] = s.astype(np.float32)
  return t


ROUTER_CONFIG = {"num_experts_per_tok": K, "n_group": 1, "topk_group": 1, "n_routed_experts": E}


def write_outputs_golden(
  path: pathlib.Path, tensors: dict[str, np.ndarray] | None = None, **metadata: str
) -> pathlib.Path:
  tensors = outputs_tensors() if tensors is None else tensors
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {"kind": "model-outputs", "model": "synthetic", "recipe": "F32", "prefill": str(PREFILL)} | metadata
  save_file(tensors, str(path), metadata=meta)
  return path


def write_manifest(root: pathlib.Path, kinds: dict[str, str], **entry_fields) -> pathlib.Path:
  """root/manifest.json listing the files (relpath -> kind) with their sha256, as goldens/manifest.json;
  entry_fields are added to every entry (e.g. config=ROUTER_CONFIG)."""
  files = {}
  for rel, kind in kinds.items():
    files[rel] = {
      "kind": kind,
      "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest(),
      "tensors": {},
      **entry_fields,
    }
  m = root / "manifest.json"
  m.write_text(json.dumps({"format_version": 1, "generator_version": "test", "files": files}, indent=1))
  return m
