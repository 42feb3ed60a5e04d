"""Entry points: dtype selection (float32 | float64 | bfloat16), jit, prefill and incremental decode.

float64 turns on JAX's x64 mode only inside the call (`jax.enable_x64` as a context manager); nothing
global changes. Results come back as numpy arrays.
"""

from __future__ import annotations

import contextlib
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dq3jax.model import transformer
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.mla import AttnForm


class Dtype(enum.Enum):
  FLOAT32 = "float32"
  FLOAT64 = "float64"
  BFLOAT16 = "bfloat16"

  @property
  def jnp(self):
    return {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}[self.value]


def scope(dtype: Dtype):
  """Context in which arrays of `dtype` can exist: x64 for float64, nothing otherwise."""
  return jax.enable_x64(True) if dtype is Dtype.FLOAT64 else contextlib.nullcontext()


def cast_params(params: dict, dtype: Dtype) -> dict:
  """Cast every weight to dtype; e_score_correction_bias stays at least float32 (transformers keeps it fp32)."""
  keep = jnp.promote_types(dtype.jnp, jnp.float32)

  def cast(path, leaf):
    name = getattr(path[-1], "key", None)
    return jnp.asarray(leaf, keep if name == "router_bias" else dtype.jnp)

  return jax.tree_util.tree_map_with_path(cast, params)


@functools.partial(jax.jit, static_argnames=("cfg", "form", "intermediates"))
def _forward(params, tokens, cache, cfg, form, intermediates):
  return transformer.forward(params, tokens, cfg, cache=cache, form=form, intermediates=intermediates)


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def logits(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  dtype: Dtype | str = Dtype.FLOAT32,
  form: AttnForm = AttnForm.EXPANDED,
  intermediates: bool = False,
  mesh: jax.sharding.Mesh | None = None,
):
  """Full-sequence logits [B, T, V] (numpy, in `dtype`) for tokens [B, T]; with intermediates=True returns
  (logits, per-layer list of dicts, see transformer.Output). mesh: routed experts sharded over its first axis."""
  dtype = Dtype(dtype)
  with scope(dtype):
    p = cast_params(params, dtype)
    if mesh is not None:
      from dq3jax.model.sharding import shard_params

      p = shard_params(p, cfg, mesh)
    out = _forward(p, jnp.asarray(tokens, jnp.int32), None, cfg, form, intermediates)
    if intermediates:
      return _to_numpy(out.logits), _to_numpy(out.intermediates)
    return _to_numpy(out.logits)


def incremental_logits(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  prefill: int,
  dtype: Dtype | str = Dtype.FLOAT32,
  form: AttnForm = AttnForm.ABSORBED,
) -> np.ndarray:
  """Logits [B, T, V] computed as one prefill of the first `prefill` tokens, then one token at a time
  through the latent KV cache. Equals `logits(...)` up to rounding."""
  dtype = Dtype(dtype)
  tokens = np.asarray(tokens)
  b, t = tokens.shape
  with scope(dtype):
    p = cast_params(params, dtype)
    cache = transformer.init_cache(cfg, b, t, dtype.jnp)
    chunks = [tokens[:, :prefill]] + [tokens[:, i : i + 1] for i in range(prefill, t)]
    outs = []
    for chunk in chunks:
      if chunk.shape[1] == 0:
        continue
      out = _forward(p, jnp.asarray(chunk, jnp.int32), cache, cfg, form, False)
      cache = out.cache
      outs.append(np.asarray(out.logits))
    return np.concatenate(outs, axis=1)
