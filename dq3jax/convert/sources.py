"""Where the float32 weights of a conversion come from: an HF checkpoint directory (read one tensor at a time)
or an in-memory params pytree. Both answer `get(path, expert)` in torch layout; `slices` turns that into the
ggml slices (one per ne[2] index) of one GGUF tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from dq3jax.io import gguf_layout
from dq3jax.io.gguf_layout import Kind
from dq3jax.io.safetensors_ckpt import HFCheckpoint, needed_specs
from dq3jax.model.config import DeepseekV3Config


class WeightSource(Protocol):
  config: DeepseekV3Config  # the (possibly truncated) model being converted

  def get(self, path: tuple[str, ...], expert: int | None = None) -> np.ndarray:
    """float32 torch-layout array of one params leaf (or one routed expert of a stacked leaf)."""
    ...


class ParamsSource:
  """A params pytree (numpy or jax leaves) as a source."""

  def __init__(self, params: dict, config: DeepseekV3Config):
    self.params = params
    self.config = config

  def get(self, path, expert=None):
    node = self.params
    for key in path:
      node = node[int(key)] if key.isdigit() else node[key]
    a = np.asarray(node if expert is None else node[expert], np.float32)
    return a


class CheckpointSource:
  """An HF DeepSeek-V3 checkpoint (FP8 or not, single file or sharded), truncated to `layers`/`experts`.

  Nothing is read up front beyond the headers; each `get` reads (and FP8-dequantises) one tensor.
  """

  def __init__(
    self,
    directory: str,
    *,
    layers: int | None = None,
    experts: int | None = None,
    round_fp8_to_bf16: bool = False,
  ):
    self.ckpt = HFCheckpoint(directory)
    self.config = self.ckpt.config.truncate(layers=layers, experts=experts)
    self.round_fp8_to_bf16 = round_fp8_to_bf16
    self._specs = {(s.path, s.expert): s for s in needed_specs(self.ckpt.config, self.config)}

  def get(self, path, expert=None):
    spec = self._specs.get((tuple(path), expert))
    if spec is None:
      raise KeyError(
        f"{self.ckpt.directory}: no checkpoint tensor for params path {'.'.join(path)} expert {expert}"
      )
    a = self.ckpt.weight(spec, round_bf16=self.round_fp8_to_bf16)
    if path[-1] in ("router", "router_bias"):
      a = a[: self.config.n_routed_experts]  # the first E router rows / bias entries
    return np.ascontiguousarray(a, np.float32)


def slices(source: WeightSource, name: str, ne: tuple[int, ...]) -> Iterator[np.ndarray]:
  """The float32 data of GGUF tensor `name`: one [ne1, ne0] array per ne[2] index for 3-D tensors (routed expert
  or attention head: llama-quantize applies one imatrix row per such slice), else one array of the torch shape."""
  cfg = source.config
  m = gguf_layout.mapping(name)
  want = gguf_layout.torch_shape(ne)
  if m.kind is Kind.LEAF:
    a = source.get(m.path)
    if a.shape != want:
      raise ValueError(f"{name}: source array {m.path} has shape {a.shape}, expected {want}")
    yield a
  elif m.kind is Kind.EXPERTS:
    for e in range(ne[2]):
      a = source.get(m.path, e)
      if a.shape != want[1:]:
        raise ValueError(f"{name}: expert {e} has shape {a.shape}, expected {want[1:]}")
      yield a
  else:
    k_b, v_b = gguf_layout.split_kv_b(source.get(m.path), cfg)
    part = k_b if m.kind is Kind.K_B else v_b
    if part.shape != want:
      raise ValueError(f"{name}: split of wkv_b has shape {part.shape}, expected {want}")
    yield from part


__all__ = ["CheckpointSource", "ParamsSource", "WeightSource", "slices"]
