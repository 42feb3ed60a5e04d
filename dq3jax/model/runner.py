"""Entry points: dtype selection (float32 | float64 | bfloat16), jit, prefill and incremental decode.

float64 turns on JAX's x64 mode only inside the call (`jax.enable_x64` as a context manager); nothing
global changes. Results come back as numpy arrays.

`act_quant` (dq3jax.model.act_quant.ActQuant, e.g. `act_quant_from_gguf(path)`) emulates llama.cpp's CPU
activation quantization; llama.cpp computes in float32 and runs the split layout absorbed and the kv_b layout
expanded, so it requires float32 and picks that attention form unless one is given (a contrary one is an
error). Without it every result is what it was before the option existed, bit for bit.
"""

from __future__ import annotations

import contextlib
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dq3jax.model import transformer
from dq3jax.model.act_quant import ActQuant
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


@functools.partial(jax.jit, static_argnames=("cfg", "form", "intermediates", "act_quant"))
def _forward(params, tokens, cache, cfg, form, intermediates, act_quant=None):
  return transformer.forward(
    params, tokens, cfg, cache=cache, form=form, intermediates=intermediates, act_quant=act_quant
  )


def _form(form: AttnForm | None, act_quant: ActQuant | None, dtype: Dtype, default: AttnForm) -> AttnForm:
  """The attention form to run: as given, else llama.cpp's for act_quant's layout, else `default`."""
  if act_quant is None:
    return default if form is None else form
  if dtype is not Dtype.FLOAT32:
    raise ValueError(
      f"act_quant emulates llama.cpp's float32 activations; dtype must be float32, not {dtype.value}"
    )
  want = AttnForm(act_quant.attn_form_name)
  if form is not None and form is not want:
    raise ValueError(
      f"act_quant describes a {act_quant.layout!r}-layout file, which llama.cpp runs {want.value}; "
      f"form={form.value} would not emulate it"
    )
  return want


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def logits(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  dtype: Dtype | str = Dtype.FLOAT32,
  form: AttnForm | None = None,
  intermediates: bool = False,
  mesh: jax.sharding.Mesh | None = None,
  act_quant: ActQuant | None = None,
):
  """Full-sequence logits [B, T, V] (numpy, in `dtype`) for tokens [B, T]; with intermediates=True returns
  (logits, per-layer list of dicts, see transformer.Output). mesh: routed experts sharded over its first axis.
  form: EXPANDED unless given or implied by act_quant (module doc)."""
  dtype = Dtype(dtype)
  form = _form(form, act_quant, dtype, AttnForm.EXPANDED)
  with scope(dtype):
    p = cast_params(params, dtype)
    if mesh is not None:
      from dq3jax.model.sharding import shard_params

      p = shard_params(p, cfg, mesh)
    out = _forward(p, jnp.asarray(tokens, jnp.int32), None, cfg, form, intermediates, act_quant)
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
  form: AttnForm | None = None,
  act_quant: ActQuant | None = None,
) -> np.ndarray:
  """Logits [B, T, V] computed as one prefill of the first `prefill` tokens, then one token at a time
  through the latent KV cache. Equals `logits(...)` up to rounding. form: ABSORBED unless given or implied
  by act_quant (module doc)."""
  dtype = Dtype(dtype)
  form = _form(form, act_quant, dtype, AttnForm.ABSORBED)
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
      out = _forward(p, jnp.asarray(chunk, jnp.int32), cache, cfg, form, False, act_quant)
      cache = out.cache
      outs.append(np.asarray(out.logits))
    return np.concatenate(outs, axis=1)
