"""Stage-by-stage judging: the golden model run on the candidate's own inputs, one half-layer at a time.

End to end, two correct llama.cpp-style engines drift apart: a float32-level difference moves one activation
across a Q8 rounding boundary, the changed code moves the next layer's input, and so on (dq3jax's own
emulation run in float32 instead of float64 drifts from itself by the same amount, NMSE ~1e-5 after three
layers of v3-pydoc Q4_K_M). A bug of a few percent in one layer hides in that drift. Given the candidate's
per-layer dumps, each stage can instead be recomputed from the candidate's *own* input to it, as
test-backend-ops gives every op the same inputs:

  attention of layer i   from the candidate's residual entering layer i (blk.{i-1}.hidden_after_mlp; the
                         token embedding for layer 0), giving attn_latent and the attention output;
  feed-forward of layer i  from the candidate's blk.{i}.hidden_after_attn, giving the router scores, the
                         experts and their weights, and the MLP/MoE output;
  head                   from the candidate's last hidden state, giving the logits.

Each stage's output (the block's contribution: output minus input residual) is then compared with what the
golden model computes from the same input, so the noise is one stage's rounding and an error is seen, at its
full size, in the stage that makes it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping

import numpy as np

from dq3jax.compare.dumps import Golden

# Stage names as they appear in the report: (row name suffix, output tensor, input tensor of the stage).
ATTN, FFN, HEAD = "attention", "feed-forward", "head"


@functools.lru_cache(maxsize=2)
def _load(path: str):
  from dq3jax.io import gguf_read  # noqa: PLC0415
  from dq3jax.io.gguf_act_quant import act_quant_from_gguf  # noqa: PLC0415

  cfg, params = gguf_read.load(path)
  # Stage by stage the oracle starts from the candidate's own float32 values, so it can follow llama.cpp's
  # float32 RMSNorm exactly (layers.rms_norm_ggml): one ulp there decides Q8 codes, and on a quantized token
  # embedding activations sit on exact Q8 ties (layer-0 attention stage noise 3e-5 -> 1e-7 on v3-pydoc).
  return cfg, params, dataclasses.replace(act_quant_from_gguf(path), rms_norm="ggml")


def required(n_layers: int) -> list[str]:
  """The candidate tensors stage-wise judging needs."""
  return [f"blk.{i}.{k}" for i in range(n_layers) for k in ("hidden_after_attn", "hidden_after_mlp")]


def possible(golden: Golden, cand: Mapping[str, np.ndarray]) -> bool:
  """Whether the candidate supplied what stage-wise judging needs and the golden names its GGUF and config."""
  config = (golden.entry or {}).get("config") or {}
  n = config.get("num_hidden_layers")
  return (
    bool(n)
    and bool((golden.entry or {}).get("gguf"))
    and "tokens" in golden.dump.tensors
    and all(k in cand for k in required(int(n)))
  )


def quantizes_activations(gguf_path: pathlib.Path, layer: int, *weights: str) -> bool:
  """Whether llama.cpp's CPU backend converts the activations of any matmul weight under params subtree
  layers.<layer>.<weights...> of the file (to Q8_K, Q8_0, F16 ...: the weight's vec_dot type is not F32)."""
  from dq3jax.model.act_quant import vec_dot_type  # noqa: PLC0415

  _, _, aq = _load(str(gguf_path))
  prefix = ("layers", str(layer), *weights)
  types = [t for p, t in aq.weights if p[: len(prefix)] == prefix]
  if not types:
    raise KeyError(f"{gguf_path}: no matmul weight under {'.'.join(prefix)}")
  return any(vec_dot_type(t) != "F32" for t in types)


def stage_inputs(cand: Mapping[str, np.ndarray], n_layers: int) -> tuple[list, list, np.ndarray]:
  """(layer inputs [T, d] (None for layer 0: the embedding), attention outputs [T, d], last hidden [T, d])."""
  layer_inputs = [None] + [cand[f"blk.{i - 1}.hidden_after_mlp"] for i in range(1, n_layers)]
  attn_outputs = [cand[f"blk.{i}.hidden_after_attn"] for i in range(n_layers)]
  return layer_inputs, attn_outputs, cand[f"blk.{n_layers - 1}.hidden_after_mlp"]


def golden_stages(
  gguf_path: pathlib.Path, golden: Golden, cand: Mapping[str, np.ndarray], forced: Mapping[int, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The golden's per-stage values on the candidate's inputs: {blk.i.<tensor>: [T, ...] float32} and the
  embedding [T, d] (layer 0's input). forced: {layer: [T, K]} experts to force (-1: the model's own)."""
  from dq3jax.golden_models import _override  # noqa: PLC0415
  from dq3jax.model import runner  # noqa: PLC0415

  cfg, params, aq = _load(str(gguf_path))
  emulation = golden.info.get("emulation", "none")
  tokens = np.asarray(golden.dump.tensors["tokens"], np.int32)
  n = cfg.num_hidden_layers
  layer_inputs, attn_outputs, last = stage_inputs(cand, n)
  records, logits = runner.stagewise(
    params, tokens[None], cfg,
    layer_inputs=[None if x is None else np.asarray(x, np.float64)[None] for x in layer_inputs],
    attn_outputs=[np.asarray(x, np.float64)[None] for x in attn_outputs],
    final_hidden=np.asarray(last, np.float64)[None],
    act_quant=aq if emulation == "llama-cpu" else None,
    kv_cache=golden.info.get("kv_cache", "f32"),
    route_override=_override(cfg, forced, tokens.size),
  )  # fmt: skip
  out = {}
  for i, rec in enumerate(records):
    for k, v in rec.items():
      v = np.asarray(v)[0]
      out[f"blk.{i}.{k}"] = v.astype(np.int64) if k == "topk_ids" else v.astype(np.float32)
  out["logits"] = np.asarray(logits[0], np.float32)
  emb = np.asarray(params["embed"], np.float32)[tokens]
  return out, emb
