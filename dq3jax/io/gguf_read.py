"""Read deepseek2 GGUF files (any llama.cpp reads: attn_kv_b or attn_k_b/attn_v_b, quantized or not) into a
DeepseekV3Config and the model's params pytree (float32 numpy, dequantized bit-exactly with dq3jax.dequantize).

The container is parsed by `gguf_file`; this module checks what a model file must hold (the metadata a config
needs, every tensor of the inventory with the shape the metadata implies) and builds the params. `load` touches
only the tensors a (truncated) model needs.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from tqdm import tqdm

from dq3jax.io import finite, gguf_layout, gguf_meta
from dq3jax.io.gguf_file import MAGIC, GGUFError, GGUFFile, TensorEntry, is_gguf, read_gguf
from dq3jax.io.gguf_layout import Kind
from dq3jax.model.config import DeepseekV3Config

# The container's names, re-exported: callers that load a model often inspect its header too.
__all__ = ["MAGIC", "GGUFError", "GGUFFile", "TensorEntry", "is_gguf", "load", "load_config", "read_gguf"]

log = logging.getLogger(__name__)


def load_config(
  path: str | os.PathLike, *, v3_defaults: bool = False
) -> tuple[DeepseekV3Config, str, GGUFFile]:
  """(config, layout, parsed file) of a deepseek2 GGUF."""
  f = read_gguf(path)
  embd = f.tensors.get("token_embd.weight")
  return (
    *gguf_meta.config_from_metadata(
      f.kv,
      set(f.tensors),
      path=f.path,
      vocab_rows=None if embd is None else embd.ne[-1],
      v3_defaults=v3_defaults,
    ),
    f,
  )


def load(
  path: str | os.PathLike,
  *,
  layers: int | None = None,
  experts: int | None = None,
  v3_defaults: bool = False,
  progress: bool = False,
  on_nonfinite: finite.OnNonFinite = None,
) -> tuple[DeepseekV3Config, dict]:
  """(config, float32 numpy params) of a deepseek2 GGUF, optionally truncated (see DeepseekV3Config.truncate).

  Same return shape as dq3jax.io.safetensors_ckpt.load, so `runner.logits(params, tokens, cfg)` runs the file.
  A tensor with NaN/Inf (stored, or from an Inf/NaN block scale) raises finite.NonFiniteError, or with
  `on_nonfinite` is passed to it and loaded as it is.
  """

  def checked(name: str, a: np.ndarray) -> np.ndarray:
    error = f.check_finite(name, a)
    if error is not None:
      finite.report(error, on_nonfinite)
    return a

  full, layout, f = load_config(path, v3_defaults=v3_defaults)
  cfg = full.truncate(layers=layers, experts=experts)
  want = gguf_layout.tensors(cfg, layout)
  e = cfg.n_routed_experts
  built = gguf_layout.ParamsBuilder(cfg.num_hidden_layers)
  for t in tqdm(want, desc="reading", unit="tensor", disable=not progress):
    m = gguf_layout.mapping(t.name)
    fused = gguf_layout.fused_source(t.name, f.tensors)
    if fused is not None:
      _check_ne(f, fused.fused_name, (t.ne[0], fused.n_parts * t.ne[1], full.n_routed_experts))
      a = checked(fused.fused_name, f.array(fused.fused_name, first_slices=e))  # [E, n_parts*out, in]
      rows = slice(fused.part * t.ne[1], (fused.part + 1) * t.ne[1])
      built.set(m.path, np.ascontiguousarray(a[:, rows]))
      continue
    name = t.name
    if name == "output.weight" and name not in f.tensors and "token_embd.weight" in f.tensors:
      log.warning("%s: no output.weight; using token_embd.weight (tied), as llama.cpp does", f.path)
      name = "token_embd.weight"
    _check_ne(f, name, _full_ne(t, full))
    if m.kind is Kind.EXPERTS:
      a = f.array(name, first_slices=e)
    elif m.path[-1] == "router":
      a = f.array(name, first_slices=e)  # router ne [d, E]: the first E rows
    elif m.path[-1] == "router_bias":
      a = f.array(name)[:e]
    else:
      a = f.array(name)
    checked(name, a)  # every array above is a leading part of the tensor: flat indices are the file's
    built.add(t.name, np.ascontiguousarray(a))
  return cfg, built.tree


def _check_ne(f: GGUFFile, name: str, want: tuple[int, ...]) -> None:
  entry = f.tensor(name)
  if entry.ne != want:
    raise GGUFError(
      f"{f.path}: tensor {name!r} (header entry at offset {entry.info_offset}) has ne {list(entry.ne)}, "
      f"the metadata implies {list(want)}"
    )


def _full_ne(t, full: DeepseekV3Config) -> tuple[int, ...]:
  """The ne a tensor of the truncated inventory has in the (untruncated) file: expert axes use the file's E."""
  m = gguf_layout.mapping(t.name)
  if m.kind is Kind.EXPERTS:
    return (*t.ne[:2], full.n_routed_experts)
  if m.path[-1] == "router":
    return (t.ne[0], full.n_routed_experts)
  if m.path[-1] == "router_bias":
    return (full.n_routed_experts,)
  return t.ne
