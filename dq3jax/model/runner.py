"""Entry points: dtype selection (float32 | float64 | bfloat16), jit, prefill and incremental decode.

float64 turns on JAX's x64 mode only inside the call (`jax.enable_x64` as a context manager); nothing
global changes. Results come back as numpy arrays.

`act_quant` (dq3jax.model.act_quant.ActQuant; io/gguf_act_quant.py reads one from a GGUF) emulates llama.cpp's
CPU activation quantization. llama.cpp computes in float32; in float64 each quantized activation is rounded to
float32 once, quantized exactly as in float32, and continues as float64 (the goldens' mode: everything else
stays float64, so the result is the exact model up to llama.cpp's own roundings). llama.cpp runs the split
layout absorbed and the kv_b layout expanded, so act_quant picks that attention form unless one is given (a
contrary one is an error). `kv_cache="f16"` adds llama.cpp's default F16 KV cache (mla.py). Without these
options every result is what it was before they existed, bit for bit.

`evaluate` is `logits` / `incremental_logits` that also counts undecided points (undecided.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dq3jax.model import mla, transformer
from dq3jax.model import undecided as undecided_mod
from dq3jax.model.act_quant import ActQuant
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.mla import AttnForm
from dq3jax.model.moe import ExpertCompute


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


@functools.partial(
  jax.jit, static_argnames=("cfg", "form", "intermediates", "act_quant", "kv_cache", "experts")
)
def _forward(
  params,
  tokens,
  cache,
  cfg,
  form,
  intermediates,
  act_quant=None,
  kv_cache="f32",
  route_override=None,
  experts=ExpertCompute.DENSE,
):
  return transformer.forward(
    params,
    tokens,
    cfg,
    cache=cache,
    form=form,
    intermediates=intermediates,
    act_quant=act_quant,
    kv_cache=kv_cache,
    route_override=route_override,
    experts=experts,
  )


def _form(form: AttnForm | None, act_quant: ActQuant | None, dtype: Dtype, default: AttnForm) -> AttnForm:
  """The attention form to run: as given, else llama.cpp's for act_quant's layout, else `default`."""
  if act_quant is None:
    return default if form is None else form
  if dtype is Dtype.BFLOAT16:
    raise ValueError("act_quant emulates llama.cpp's float32 activations; dtype must be float32 or float64")
  want = AttnForm(act_quant.attn_form_name)
  if form is not None and form is not want:
    raise ValueError(
      f"act_quant describes a {act_quant.layout!r}-layout file, which llama.cpp runs {want.value}; "
      f"form={form.value} would not emulate it"
    )
  return want


def _check_kv_cache(kv_cache: str) -> str:
  if kv_cache not in mla.KV_CACHES:
    raise ValueError(f"kv_cache must be one of {', '.join(mla.KV_CACHES)}, got {kv_cache!r}")
  return kv_cache


def route_overrides(route_override, cfg: DeepseekV3Config, batch: int, t: int) -> tuple | None:
  """Checked route_override as a tuple over layers of None or int32 [B, T, K] (None if nothing is forced).

  Accepted: a sequence of num_hidden_layers entries or a {layer: array} mapping; an entry is None or
  [B, T, K] expert ids, each token's row either all -1 (the model's own choice) or K distinct ids in
  [0, E). Dense layers take None."""
  if route_override is None:
    return None
  n = cfg.num_hidden_layers
  if isinstance(route_override, dict):
    bad = [k for k in route_override if not (isinstance(k, int) and 0 <= k < n)]
    if bad:
      raise ValueError(f"route_override: layer keys {bad} are not in 0..{n - 1}")
    route_override = [route_override.get(i) for i in range(n)]
  if len(route_override) != n:
    raise ValueError(f"route_override: {len(route_override)} entries, the model has {n} layers")
  k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
  out = []
  for i, ov in enumerate(route_override):
    if ov is None:
      out.append(None)
      continue
    if not cfg.is_moe_layer(i):
      raise ValueError(f"route_override[{i}]: layer {i} is dense")
    ov = np.asarray(ov)
    if ov.shape != (batch, t, k) or not np.issubdtype(ov.dtype, np.integer):
      raise ValueError(
        f"route_override[{i}]: want integer [{batch}, {t}, {k}], got {ov.dtype} {list(ov.shape)}"
      )
    keep = (ov == -1).all(-1)
    ok = (ov >= 0).all(-1) & (ov < e).all(-1)
    ok &= (np.sort(ov, -1)[..., 1:] != np.sort(ov, -1)[..., :-1]).all(-1)
    bad = np.argwhere(~(keep | ok))
    if len(bad):
      at = tuple(int(v) for v in bad[0])
      raise ValueError(
        f"route_override[{i}]: row (batch, token) {at} = {ov[at].tolist()} "
        f"is neither all -1 nor {k} distinct expert ids in [0, {e})"
      )
    out.append(ov.astype(np.int32))
  return tuple(out) if any(ov is not None for ov in out) else None


def _checked(cfg, tokens, dtype, form, act_quant, kv_cache, route_override, default_form):
  """The arguments every entry point validates: (Dtype, attention form, kv_cache, tokens [B, T] as numpy,
  per-layer route overrides or None)."""
  dtype = Dtype(dtype)
  form = _form(form, act_quant, dtype, default_form)
  tokens = np.asarray(tokens)
  return dtype, form, _check_kv_cache(kv_cache), tokens, route_overrides(route_override, cfg, *tokens.shape)


def _slice_override(ov: tuple | None, lo: int, hi: int) -> tuple | None:
  return None if ov is None else tuple(None if a is None else jnp.asarray(a[:, lo:hi]) for a in ov)


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What `evaluate` returns (numpy, in its dtype). Undecided counts: kind -> int [B, T] points per token
  position (module undecided), kinds such as "blk.1.act.attn.wq_b", "blk.1.kv.probs", "blk.2.router.topk",
  "output.act.lm_head"."""

  logits: np.ndarray  # [B, T, V]: one pass over all T tokens
  intermediates: list  # per layer, that pass's transformer.Output intermediates
  undecided: dict  # that pass's undecided points
  decode_logits: np.ndarray | None = None  # [B, T - P, V]: positions P.. decoded one token at a time
  decode_undecided: dict | None = None  # the decode steps' undecided points (positions P..)


def evaluate(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  decode_from: int | None = None,
  dtype: Dtype | str = Dtype.FLOAT64,
  form: AttnForm | None = None,
  act_quant: ActQuant | None = None,
  kv_cache: str = "f32",
  route_override=None,
) -> Evaluation:
  """One pass over tokens [B, T] with its intermediates and undecided points (float64 by default: the
  goldens' mode); with decode_from=P also the logits of positions P..T-1 decoded one token at a time
  through the latent KV cache, continuing that pass's cache cut to its first P tokens, which is what a
  prefill of P tokens leaves (attention is causal). form: as for `logits`.

  The layers run as separately jitted functions, keyed on the layer's activation types only
  (ActQuant.relative), so recipes and layers with the same types share one compilation; the numbers are
  those of `logits` up to float64 evaluation order. Each decode step runs the same compiled T-token chunk
  as the pass (its token first, then the following tokens or padding, which causal attention keeps from it,
  discarded), over a cache of 2T rows: one compilation per configuration instead of two.
  """
  dtype, form, kv_cache, tokens, ov = _checked(
    cfg, tokens, dtype, form, act_quant, kv_cache, route_override, AttnForm.EXPANDED
  )
  b, t = tokens.shape
  size = t if decode_from is None else 2 * t

  def padded(a, lo, fill):  # a[:, lo:lo + t] along axis 1, padded with `fill` to t positions
    part = a[:, lo : lo + t]
    return np.concatenate([part, np.full((b, t - part.shape[1], *a.shape[2:]), fill, a.dtype)], axis=1)

  with scope(dtype):
    p = cast_params(params, dtype)
    n = len(p["layers"])
    aqs = [_unless_f32(None if act_quant is None else act_quant.relative("layers", str(i))) for i in range(n)]
    head_aq = _unless_f32(None if act_quant is None else _only(act_quant.relative(), ("lm_head",)))
    head_p = {"norm": p["norm"], "lm_head": p["lm_head"]}
    kv16 = jnp.asarray(kv_cache == "f16")  # traced: both cache types share the compiled layers

    def run(lo, cache):
      """The chunk of t tokens from position lo: (logits, records, cache, counts [B, size] per kind)."""
      q_positions = jnp.arange(lo, lo + t, dtype=jnp.int32)
      h, rope_cs = transformer.embed(p, jnp.asarray(padded(tokens, lo, 0), jnp.int32), cfg, q_positions)
      counts, records, layers = {}, [], []
      for i, lp in enumerate(p["layers"]):
        override = None if ov is None or ov[i] is None else jnp.asarray(padded(ov[i], lo, -1))
        h, record, stored, c = _layer_step(
          lp, h, rope_cs, q_positions, cache["layers"][i], override,
          kv16, cfg=cfg, moe_layer=cfg.is_moe_layer(i), form=form, aq=aqs[i],
        )  # fmt: skip
        counts.update({f"blk.{i}.{k}": v for k, v in c.items()})
        records.append(record)
        layers.append(stored)
      logits_, c = _head_step(head_p, h, q_positions, size, cfg=cfg, aq=head_aq)
      counts.update({f"output.{k}": v for k, v in c.items()})
      return logits_, records, {"layers": layers, "length": jnp.asarray(lo + t, jnp.int32)}, counts

    logits_, records, cache, counts = run(0, transformer.init_cache(cfg, b, size, dtype.jnp))
    first = {k: np.asarray(v)[:, :t] for k, v in counts.items()}
    out = Evaluation(np.asarray(logits_), _to_numpy(records), first)
    if decode_from is None:
      return out
    steps, step_counts = [], {}
    for k in range(decode_from, t):
      step, _, cache, c = run(k, cache)
      steps.append(np.asarray(step)[:, :1])
      for kind, v in c.items():
        at = step_counts.setdefault(kind, np.zeros((b, t), np.int64))
        at[:, k] += np.asarray(v)[:, k]
    empty = np.zeros((b, 0, out.logits.shape[-1]), out.logits.dtype)
    decode = np.concatenate(steps, axis=1) if steps else empty
    return dataclasses.replace(out, decode_logits=decode, decode_undecided=step_counts)


def _unless_f32(aq: ActQuant | None) -> ActQuant | None:
  """None for a mapping with nothing to round (every weight F32): the same computation, one compilation."""
  nothing = all(t == "F32" for _, t in aq.weights) if aq is not None else True
  return None if nothing and (aq is None or aq.rms_norm == "exact") else aq


def _only(aq: ActQuant, *paths) -> ActQuant:
  weights = tuple(w for w in aq.weights if w[0] in paths)
  return ActQuant(weights=weights, layout=aq.layout, rms_norm=aq.rms_norm)


@functools.partial(jax.jit, static_argnames=("cfg", "moe_layer", "form", "aq"))
def _layer_step(lp, h, rope_cs, q_positions, cache_layer, override, kv16, *, cfg, moe_layer, form, aq):
  """transformer.decoder_layer over the cache, with its undecided counts (kinds without the layer prefix)."""
  tally = undecided_mod.Tally(h.shape[0], q_positions, cache_layer["c"].shape[1])
  with undecided_mod.collecting(tally):
    h, record, stored = transformer.decoder_layer(
      lp, h, cfg, moe_layer=moe_layer, rope_cs=rope_cs, q_positions=q_positions, start=q_positions[0],
      cache_layer=cache_layer, form=form, aq=aq, kv_cache=kv16, override=override,
    )  # fmt: skip
  return h, record, stored, tally.counts


@functools.partial(jax.jit, static_argnames=("size", "cfg", "aq"))
def _head_step(head_p, h, q_positions, size, *, cfg, aq):
  tally = undecided_mod.Tally(h.shape[0], q_positions, size)
  with undecided_mod.collecting(tally):
    logits_ = transformer.head(head_p, h, cfg, aq)
  return logits_, tally.counts


def logits(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  dtype: Dtype | str = Dtype.FLOAT32,
  form: AttnForm | None = None,
  mesh: jax.sharding.Mesh | None = None,
  act_quant: ActQuant | None = None,
  kv_cache: str = "f32",
  route_override=None,
  experts: ExpertCompute | str = ExpertCompute.DENSE,
) -> np.ndarray:
  """Full-sequence logits [B, T, V] (numpy, in `dtype`) for tokens [B, T].

  mesh: routed experts sharded over its first axis. form: EXPANDED unless given or implied by act_quant
  (module doc). kv_cache: "f32" or "f16" (llama.cpp's F16 KV cache, mla.py). route_override: forced expert ids
  per MoE layer (`route_overrides`). experts: "dense" (every expert on every token, weighted 0 where not
  selected; shardable) or "sparse" (only the selected experts; same experts' outputs, the K contributions
  summed in another order)."""
  out = _full_forward(
    params, tokens, cfg, dtype, form, False, mesh, act_quant, kv_cache, route_override, experts
  )
  return _to_numpy(out.logits)


def logits_and_intermediates(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  dtype: Dtype | str = Dtype.FLOAT32,
  form: AttnForm | None = None,
  mesh: jax.sharding.Mesh | None = None,
  act_quant: ActQuant | None = None,
  kv_cache: str = "f32",
  route_override=None,
  experts: ExpertCompute | str = ExpertCompute.DENSE,
) -> tuple[np.ndarray, list[dict]]:
  """(logits [B, T, V], per-layer list of dicts of the layer's intermediates, see transformer.Output), with the
  options of `logits`."""
  out = _full_forward(
    params, tokens, cfg, dtype, form, True, mesh, act_quant, kv_cache, route_override, experts
  )
  return _to_numpy(out.logits), _to_numpy(out.intermediates)


def _full_forward(
  params, tokens, cfg, dtype, form, intermediates, mesh, act_quant, kv_cache, route_override, experts
):
  dtype = Dtype(dtype)
  experts = ExpertCompute(experts)
  if mesh is not None and experts is ExpertCompute.SPARSE:
    raise ValueError("experts='sparse' is not sharded yet; use the dense experts with a mesh")
  form = _form(form, act_quant, dtype, AttnForm.EXPANDED)
  tokens = np.asarray(tokens)
  ov = _slice_override(route_overrides(route_override, cfg, *tokens.shape), 0, tokens.shape[1])
  with scope(dtype):
    p = cast_params(params, dtype)
    if mesh is not None:
      from dq3jax.model.sharding import shard_params

      p = shard_params(p, cfg, mesh)
    kv_cache = _check_kv_cache(kv_cache)
    return _forward(
      p, jnp.asarray(tokens, jnp.int32), None, cfg, form, intermediates, act_quant, kv_cache, ov
    )


def incremental_logits(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  prefill: int,
  dtype: Dtype | str = Dtype.FLOAT32,
  form: AttnForm | None = None,
  act_quant: ActQuant | None = None,
  kv_cache: str = "f32",
  route_override=None,
  experts: ExpertCompute | str = ExpertCompute.DENSE,
) -> np.ndarray:
  """Logits [B, T, V] computed as one prefill of the first `prefill` tokens, then one token at a time
  through the latent KV cache. Equals `logits(...)` up to rounding. form: ABSORBED unless given or implied
  by act_quant (module doc); kv_cache and route_override as for `logits`."""
  dtype, form, kv_cache, tokens, ov = _checked(
    cfg, tokens, dtype, form, act_quant, kv_cache, route_override, AttnForm.ABSORBED
  )
  b, t = tokens.shape
  with scope(dtype):
    p = cast_params(params, dtype)
    cache = transformer.init_cache(cfg, b, t, dtype.jnp)
    bounds = [(0, prefill)] + [(i, i + 1) for i in range(prefill, t)]
    outs = []
    for lo, hi in bounds:
      if hi <= lo:
        continue
      chunk = jnp.asarray(tokens[:, lo:hi], jnp.int32)
      out = _forward(p, chunk, cache, cfg, form, False, act_quant, kv_cache, _slice_override(ov, lo, hi))
      cache = out.cache
      outs.append(np.asarray(out.logits))
    return np.concatenate(outs, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "form", "aq", "kv_cache"))
def _attention_step(lp, h, rope_cs, q_positions, cache_layer, *, cfg, form, aq, kv_cache):
  h, record, _ = transformer.attention_block(
    lp, h, cfg, rope_cs=rope_cs, q_positions=q_positions, start=q_positions[0], cache_layer=cache_layer,
    form=form, aq=aq, kv_cache=kv_cache,
  )  # fmt: skip
  return record


@functools.partial(jax.jit, static_argnames=("cfg", "moe_layer", "aq"))
def _ffn_step(lp, h, override, *, cfg, moe_layer, aq):
  return transformer.ffn_block(lp, h, cfg, moe_layer=moe_layer, aq=aq, override=override)[1]


def stagewise(
  params: dict,
  tokens,
  cfg: DeepseekV3Config,
  *,
  layer_inputs,
  attn_outputs,
  final_hidden=None,
  dtype: Dtype | str = Dtype.FLOAT64,
  form: AttnForm | None = None,
  act_quant: ActQuant | None = None,
  kv_cache: str = "f32",
  route_override=None,
) -> tuple[list[dict], np.ndarray | None]:
  """Each half-layer evaluated on *given* inputs (another engine's own values) instead of this model's: for
  layer i the attention block on layer_inputs[i] [B, T, d] (its input residual; layer 0's is the embedding)
  and the feed-forward block on attn_outputs[i] [B, T, d] (its residual after attention); the head on
  final_hidden [B, T, d]. This is how per-operation tests judge an engine (test-backend-ops gives every op the
  same inputs): differences then come from that stage alone instead of accumulating over the stack.

  Returns (per layer the records of both blocks, as `evaluate`'s intermediates, and the logits or None).
  layer_inputs[0] may be None (the embedding is used). route_override as for `evaluate`.
  """
  dtype, form, kv_cache, tokens, ov = _checked(
    cfg, tokens, dtype, form, act_quant, kv_cache, route_override, AttnForm.EXPANDED
  )
  b, t = tokens.shape
  with scope(dtype):
    p = cast_params(params, dtype)
    q_positions = jnp.arange(t, dtype=jnp.int32)
    emb, rope_cs = transformer.embed(p, jnp.asarray(tokens, jnp.int32), cfg, q_positions)
    cache = transformer.init_cache(cfg, b, t, dtype.jnp)
    records = []
    for i, lp in enumerate(p["layers"]):
      aq = None if act_quant is None else act_quant.relative("layers", str(i))
      h_in = emb if layer_inputs[i] is None else jnp.asarray(layer_inputs[i], dtype.jnp)
      rec = _attention_step(lp, h_in, rope_cs, q_positions, cache["layers"][i], cfg=cfg, form=form, aq=aq,
                            kv_cache=kv_cache)  # fmt: skip
      override = None if ov is None or ov[i] is None else jnp.asarray(ov[i])
      rec = rec | _ffn_step(lp, jnp.asarray(attn_outputs[i], dtype.jnp), override, cfg=cfg,
                            moe_layer=cfg.is_moe_layer(i), aq=aq)  # fmt: skip
      records.append(_to_numpy(rec))
    logits_ = None
    if final_hidden is not None:
      head_aq = None if act_quant is None else _only(act_quant.relative(), ("lm_head",))
      head_p = {"norm": p["norm"], "lm_head": p["lm_head"]}
      logits_ = np.asarray(transformer.head(head_p, jnp.asarray(final_hidden, dtype.jnp), cfg, head_aq))
    return records, logits_
