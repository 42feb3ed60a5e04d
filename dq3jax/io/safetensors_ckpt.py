"""Lazy, memory-mapped loading of Hugging Face DeepSeek-V3 checkpoints into a dq3jax params pytree.

Single file (`model.safetensors`) or sharded (`model.safetensors.index.json`); every tensor, and every
`weight_scale_inv`, is resolved through the index on its own, since DeepSeek's shards split them. Only
headers are parsed up front; a truncated load (`layers`, `experts`) touches only the tensors it keeps.
Weights come back as float32 numpy arrays (bf16/f16 widened exactly, FP8 dequantised in float32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from dq3jax.io import finite, fp8, hf_names
from dq3jax.io.safetensors_format import (
  DTYPES,
  NAMES,
  CheckpointError,
  ReadLog,
  TensorInfo,
  read_header,
  read_tensor,
)
from dq3jax.model.config import DeepseekV3Config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _check_quantization(qc, path: str) -> None:
  if qc is None:
    return
  want = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
  for key, value in want.items():
    if qc.get(key, value) != value:
      raise CheckpointError(
        f"{path}: config key 'quantization_config.{key}'={qc.get(key)!r} unsupported (want {value!r})"
      )


class HFCheckpoint:
  """An HF checkpoint directory: config plus a name -> shard map with lazily parsed shard headers."""

  def __init__(self, directory: str, *, log: ReadLog | None = None):
    self.directory = directory
    self.log = log if log is not None else ReadLog()
    if not os.path.isdir(directory):
      found = "a file" if os.path.exists(directory) else "nothing there"
      raise CheckpointError(
        f"{directory}: expected an HF checkpoint directory (config.json + *.safetensors), found {found}"
      )
    config_path = os.path.join(directory, "config.json")
    try:
      with open(config_path) as f:
        self.hf_config = json.load(f)
    except FileNotFoundError:
      raise CheckpointError(f"{config_path}: file not found") from None
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    try:
      self.config = DeepseekV3Config.from_hf_config(self.hf_config)
    except ValueError as e:
      raise CheckpointError(f"{config_path}: {e}") from None
    _check_quantization(self.hf_config.get("quantization_config"), config_path)
    self._headers: dict[str, dict[str, TensorInfo]] = {}
    index_path = os.path.join(directory, INDEX)
    if os.path.exists(index_path):
      self._index_path = index_path
      try:
        with open(index_path) as f:
          self.weight_map: dict[str, str] = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: malformed index ({e!r})") from None
    elif os.path.exists(os.path.join(directory, SINGLE)):
      self._index_path = None
      self.weight_map = dict.fromkeys(self._header(SINGLE), SINGLE)
    else:
      raise CheckpointError(f"{directory}: neither {INDEX} nor {SINGLE} found")

  def _header(self, shard: str) -> dict[str, TensorInfo]:
    if shard not in self._headers:
      self._headers[shard] = read_header(os.path.join(self.directory, shard))
    return self._headers[shard]

  def info(self, name: str) -> tuple[str, TensorInfo]:
    """(shard path, header entry) of a tensor; errors name the tensor and the file that should hold it."""
    shard = self.weight_map.get(name)
    if shard is None:
      where = self._index_path or os.path.join(self.directory, SINGLE)
      raise CheckpointError(f"{where}: tensor {name!r} not found")
    path = os.path.join(self.directory, shard)
    if not os.path.exists(path):
      raise CheckpointError(
        f"{self._index_path}: tensor {name!r} is mapped to shard {shard!r}, which does not exist"
      )
    header = self._header(shard)
    if name not in header:
      raise CheckpointError(f"{path}: tensor {name!r} listed in the index but absent from the shard")
    return path, header[name]

  def raw(self, name: str) -> np.ndarray:
    """The stored tensor as a read-only memory map (recorded in self.log)."""
    path, info = self.info(name)
    return read_tensor(path, name, info, self.log)

  def weight(self, spec: hf_names.TensorSpec, *, round_bf16: bool = False) -> np.ndarray:
    """One weight as float32, shape-checked against the config, FP8 dequantised with its block scales."""
    path, info = self.info(spec.hf_name)
    if info.shape != spec.shape:
      raise CheckpointError(
        f"{path}: tensor {spec.hf_name!r} has shape {list(info.shape)}, config implies {list(spec.shape)}"
      )
    if info.dtype == DTYPES["F8_E4M3"]:
      if not spec.fp8:
        raise CheckpointError(f"{path}: tensor {spec.hf_name!r} is FP8, which DeepSeek never uses for it")
      scale_name = hf_names.scale_name(spec.hf_name)
      if scale_name not in self.weight_map:
        raise CheckpointError(f"{path}: FP8 tensor {spec.hf_name!r} has no {scale_name!r}")
      scale = self.raw(scale_name)
      try:
        return fp8.dequantize(read_tensor(path, spec.hf_name, info, self.log), scale, round_bf16=round_bf16)
      except ValueError as e:
        raise CheckpointError(f"{path}: tensor {spec.hf_name!r}: {e}") from None
    if info.dtype not in (DTYPES["F32"], DTYPES["BF16"], DTYPES["F16"]):
      raise CheckpointError(f"{path}: tensor {spec.hf_name!r} has unsupported dtype {info.dtype}")
    return read_tensor(path, spec.hf_name, info, self.log).astype(np.float32)

  def check_finite(self, spec: hf_names.TensorSpec, w: np.ndarray) -> finite.NonFiniteError | None:
    """The error describing the first NaN/Inf in `w` (what `weight(spec)` returned), or None if it is finite.
    For FP8 it names the stored element if that is NaN, else the weight_scale_inv entry that scaled it."""
    found = finite.scan(w)
    if found is None:
      return None
    path, info = self.info(spec.hf_name)
    msg = f"{path}: tensor {spec.hf_name!r} ({NAMES[info.dtype]}, shape {list(info.shape)}): {found.count} "
    msg += f"non-finite value(s){' after FP8 dequantization' if info.dtype == DTYPES['F8_E4M3'] else ''}; "
    msg += f"the first is {found.element()}"
    stored = read_tensor(path, spec.hf_name, info)
    if info.dtype != DTYPES["F8_E4M3"] or np.isnan(np.float32(stored[found.index])):
      msg += f", at byte offset {info.begin + found.flat * info.dtype.itemsize}"
    else:
      scale_name = hf_names.scale_name(spec.hf_name)
      scale_path, scale_info = self.info(scale_name)
      at = tuple(i // fp8.BLOCK for i in found.index)
      value = float(read_tensor(scale_path, scale_name, scale_info)[at])
      offset = scale_info.begin + int(np.ravel_multi_index(at, scale_info.shape)) * scale_info.dtype.itemsize
      msg += (
        f", whose stored FP8 value is finite, so the cause is its block scale {scale_name!r} {list(at)} = "
        f"{value} in {scale_path} (byte offset {offset})"
      )
    return finite.NonFiniteError(msg, path=path, tensor=spec.hf_name, finding=found)


def needed_specs(full: DeepseekV3Config, cfg: DeepseekV3Config) -> Iterator[hf_names.TensorSpec]:
  """Specs (with the file's full shapes) of the tensors a truncation `cfg` of `full` keeps."""
  for spec in hf_names.tensor_specs(full.truncate(layers=cfg.num_hidden_layers)):
    if spec.expert is None or spec.expert < cfg.n_routed_experts:
      yield spec


def load(
  directory: str,
  *,
  layers: int | None = None,
  experts: int | None = None,
  progress: bool = False,
  round_fp8_to_bf16: bool = False,
  log: ReadLog | None = None,
  on_nonfinite: finite.OnNonFinite = None,
) -> tuple[DeepseekV3Config, dict]:
  """(config, float32 numpy params) of a checkpoint, optionally truncated (see DeepseekV3Config.truncate).

  A weight with NaN/Inf raises finite.NonFiniteError, or with `on_nonfinite` is passed to it and loaded as is.
  """
  ckpt = HFCheckpoint(directory, log=log)
  cfg = ckpt.config.truncate(layers=layers, experts=experts)
  tree: dict = {}
  specs = list(needed_specs(ckpt.config, cfg))
  for spec in tqdm(specs, desc="loading", unit="tensor", disable=not progress):
    array = ckpt.weight(spec, round_bf16=round_fp8_to_bf16)
    error = ckpt.check_finite(spec, array)
    if error is not None:
      finite.report(error, on_nonfinite)
    if spec.path[-1] in ("router", "router_bias"):
      array = np.ascontiguousarray(array[: cfg.n_routed_experts])  # first E router rows / bias entries
    hf_names.set_leaf(tree, spec, array, cfg.n_routed_experts)
  return cfg, hf_names.layers_to_list(tree)
