"""What each golden tensor is to `dq3jax diff`: its kind (which metric judges it), the dtype a candidate must
supply, and the order in which the model computes the values (layer numbers, rows, the golden's tokens)."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

import numpy as np

from dq3jax.compare.dumps import Expect, Golden, GoldenKind


class TensorKind(enum.StrEnum):
  """What a golden tensor is; it decides the metric that judges the candidate's copy."""

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


LOGIT_TENSORS = ("logits", "decode_logits")
# The order in which a layer's values are produced: the first-divergence walk follows it.
LAYER_STAGES = ("attn_latent", "hidden_after_attn", "topk_ids", "hidden_after_mlp")
BLK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def tensor_kind(kind: GoldenKind, name: str, g: np.ndarray) -> TensorKind:
  """The kind of tensor `name` (golden array g) in a golden of this kind."""
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
  m = BLK_NAME.match(name)
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


def expect_for(golden: Golden) -> Callable[[str], Expect]:
  """Per golden tensor name, what the candidate must supply (bytes, float32, floats, integers)."""

  def expect(name: str) -> Expect:
    g = golden.dump.tensors[name]
    k = tensor_kind(golden.kind, name, g)
    if k is TensorKind.INPUT:
      return Expect.FLOAT32 if g.dtype.kind == "f" else Expect.INT
    return _EXPECT[k]

  return expect


_TOP_ORDER = ("tokens", "x", "imatrix", "quantized", "dequantized", *LOGIT_TENSORS)
_STAGE_ORDER = (
  "attn_latent",
  "hidden_after_attn",
  "router_scores",
  "topk_ids",
  "topk_weights",
  "hidden_after_mlp",
)


def row_order(name: str) -> tuple:
  """Rows in the order values are computed: inputs, logits, then layer by layer and stage by stage."""
  if name in _TOP_ORDER:
    return (0, _TOP_ORDER.index(name), 0, name)
  m = BLK_NAME.match(name)
  if m:
    stage = m.group(2)
    return (
      1,
      int(m.group(1)),
      _STAGE_ORDER.index(stage) if stage in _STAGE_ORDER else len(_STAGE_ORDER),
      name,
    )
  return (2, 0, 0, name)


def layer_numbers(names) -> list[int]:
  """The layer numbers N of the `blk.N.*` names among names, ascending."""
  return sorted({int(m.group(1)) for n in names if (m := BLK_NAME.match(n))})


def golden_tokens(golden: Golden) -> tuple[np.ndarray | None, int | None]:
  """The golden's tokens (flat int64) and its prefill length where known; (None, None) without tokens."""
  tokens = golden.dump.tensors.get("tokens")
  prefill = golden.info.get("prefill")
  if tokens is None:
    return None, None
  tokens = np.asarray(tokens, np.int64).reshape(-1)
  dec = golden.dump.tensors.get("decode_logits")
  if prefill is None and dec is not None:
    prefill = tokens.size - dec.shape[0]
  return tokens, (int(prefill) if prefill is not None else None)
