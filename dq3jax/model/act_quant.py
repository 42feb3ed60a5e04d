"""Emulation of llama.cpp's CPU activation quantization: the activation side of every weight matmul.

ggml's CPU backend never multiplies float32 activations by a quantized weight directly. `mul_mat` and
`mul_mat_id` first convert each activation row to the weight type's `vec_dot_type` (`type_traits_cpu` in
ggml-cpu.c; the registry, dq3jax.qtypes, records it per type) and then run integer (or half-precision) dot
products. That rounding of the activations, not the dot product's summation order, is the dominant difference
between llama.cpp's logits and the oracle's float32 logits on the same GGUF. This module reproduces it as
`dequant(quant(x))`, which the model then multiplies by the dequantized weight in float32. The dot product
itself is not emulated (ggml sums integer block products and then scales them, in another order). Positions
then agree with llama.cpp to float32 rounding, except downstream of a code flip: a float32-level difference
that moves one activation across a rounding boundary changes it by a whole quantization step, and that
difference spreads to later layers and positions. dq3jax shows the same spread against itself (full-sequence
vs incremental evaluation), so it is the floor of any float32 emulation; tests/model/test_act_quant.py has the
measurements.

Which quantizer runs (llama-cpp-python 0.3.36 as built on this x86-64 machine, AVX2 and AVX-512; the routines
are in ggml-cpu/arch/x86, the table's `from_float` points at them):
  * Q8_0 / Q8_1 (Q4_0, Q5_0, Q8_0 / Q4_1, Q5_1 weights): the AVX/AVX2 branch of `quantize_row_q8_0/1` (any
    x86-64 build with AVX takes it; the scalar reference runs only without AVX): d = amax / 127 (stored fp16),
    codes = round-half-even(x * (127 / amax)), the reciprocal taken from amax directly. The reference's id = 1/d
    and roundf (half away from zero) give other codes rarely on generic data (1 in 5e5 Gaussian values) but
    often on grids (half the codes of a half-integer grid). The 4-row packer of repacked Q4_0 weights
    (`ggml_quantize_mat_q8_0_4x8`) computes the same codes as the row routine.
  * Q8_K (Q2_K..Q6_K weights): x86 has no SIMD `quantize_row_q8_K`; it is the reference (scale -127/max of the
    first element of largest magnitude, nearest_int, d stored float32). Repacked Q4_K/Q2_K weights quantize
    groups of four rows with `ggml_quantize_mat_q8_K_4x8`, which computes the same values except when a block
    holds both +amax and -amax (it then prefers the positive one); we follow the reference.
  * F16: round to nearest even (F16C); BF16: ggml's reference bit rounding; F32: unchanged.
Q8_1 also stores s = fp16(d * sum(q)), which vec_dot_q4_1_q8_1 uses for the weight's offset term; the round
trip returns d * q, so Q4_1/Q5_1 weights are emulated up to that fp16 rounding of s.

Matmuls between activations (attention's kq and kqv) use the KV cache type's vec_dot_type: with an F32 cache
(type_k = type_v = F32, no flash attention) they are plain float32, so nothing applies; llama.cpp's default
F16 cache rounds the cache and both attention activations to fp16 (mla.py, kv_cache="f16", via `rounded`).

In float64 (the goldens' mode) an activation is rounded to float32 once and then quantized by the same
float32 code; `rounded` also counts the undecided points of that rounding (dq3jax.model.undecided).

`ActQuant` records, per weight (by params path), the ggml type it is stored in; io/gguf_act_quant.py reads it
from a GGUF (the model knows no files). The model threads it through its layers as `aq` (scoped to the current
params subtree with `scope`) and calls `apply(aq, x, name)` on the activation that meets weight `name`;
`apply(None, ...)` returns x itself, so a model run without emulation is unchanged bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from dq3jax.layouts import check_layout
from dq3jax.model import undecided
from dq3jax.qtypes import REGISTRY, GGMLType, qtype_of
from dq3jax.quant import host
from dq3jax.quant._arith import f16_bits_to_f32_bits, f32_bits_to_f16_bits


def vec_dot_type(weight_type: str) -> str:
  """The type llama.cpp's CPU backend converts activations to before multiplying by a `weight_type` weight."""
  try:
    vdt = qtype_of(weight_type).vec_dot_type
  except ValueError:
    vdt = None
  if vdt is None:
    known = ", ".join(q.name for q in REGISTRY.values() if q.vec_dot_type is not None)
    raise ValueError(f"no activation-quantization rule for weight type {weight_type!r}; known: {known}")
  return vdt.name


@functools.cache
def _representative(act_type: str) -> str:
  """One weight type per vec_dot_type (ActQuant.relative): the first in the registry that has it."""
  for q in REGISTRY.values():
    if q.vec_dot_type is not None and q.vec_dot_type.name == act_type:  # not truthiness: GGMLType.F32 is 0
      return q.name
  raise ValueError(f"no registry type has vec_dot_type {act_type}")


# ------------------------------------------------------------------------------------------ round trips


def _blocks(x: jax.Array, t: GGMLType) -> jax.Array:
  n, size = x.shape[-1], qtype_of(t).block_elems
  if n % size:
    raise ValueError(f"{t.name}: row length {n} is not a multiple of the block size {size} (ggml asserts it)")
  return x.reshape(*x.shape[:-1], n // size, size)


def _opaque(v: jax.Array, like: jax.Array | None = None) -> jax.Array:
  """v (float32) with the bit `like != like` OR-ed into its pattern: that bit is 0 unless `like` is NaN, and
  every result derived from a NaN `like` is NaN anyway, so the value is v; but no compiler may treat it as
  a constant or as the quotient it came from. XLA rewrites `a / const` as `a * (1/const)` and
  `1 / (c / m)` as `m * (1/c)`, two roundings where C has one."""
  like = v if like is None else like
  nan_bit = (like != like).astype(jnp.uint32)
  return lax.bitcast_convert_type(lax.bitcast_convert_type(v, jnp.uint32) | nan_bit, jnp.float32)


def _true_div(a: jax.Array, b: float) -> jax.Array:
  """a / b correctly rounded for a constant b."""
  return a / _opaque(jnp.broadcast_to(jnp.float32(b), a.shape), a)


def _fp16_value(v: jax.Array) -> jax.Array:
  """f32(fp16(v)) by integer arithmetic (exact whatever the backend's flush-to-zero mode)."""
  bits = f16_bits_to_f32_bits(f32_bits_to_f16_bits(lax.bitcast_convert_type(v, jnp.uint32)))
  return lax.bitcast_convert_type(bits, jnp.float32)


def q8_0(x: jax.Array) -> jax.Array:
  """x [..., n] -> the values x86 AVX2 `quantize_row_q8_0` encodes: per 32 elements f32(fp16(amax/127)) * q,
  q = round_half_even(x * (127/amax)) saturated to int8 (the pack instructions saturate)."""
  xb = _blocks(x, GGMLType.Q8_0)  # [..., nb, 32]
  amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
  d = _true_div(amax, 127.0)
  inv = _opaque(jnp.where(amax != 0, jnp.float32(127.0) / jnp.where(amax != 0, amax, 1), 0))
  # Through int32 so that a -0 code decodes to +0 as ggml's integer code does.
  q = jnp.clip(jnp.rint(xb * inv), -128, 127).astype(jnp.int32).astype(jnp.float32)
  return (_fp16_value(d) * q).reshape(x.shape)


def q8_1(x: jax.Array) -> jax.Array:
  """Q8_1's codes and d are Q8_0's (same AVX2 routine); its extra sum field is not a value (module doc)."""
  return q8_0(x)


def q8_k(x: jax.Array) -> jax.Array:
  """x [..., n] -> the values `quantize_row_q8_K` (reference; the x86 build has no SIMD version) encodes: per
  256 elements d * q with iscale = -127/max (max: the first element of largest magnitude),
  q = MIN(127, nearest_int(iscale * x)), d = 1/iscale in float32; an all-zero block stays zero."""
  xb = _blocks(x, GGMLType.Q8_K)  # [..., nb, 256]
  idx = jnp.argmax(jnp.abs(xb), axis=-1, keepdims=True)  # first index of the largest magnitude
  mx = jnp.take_along_axis(xb, idx, axis=-1)  # [..., nb, 1] signed
  zero = mx == 0
  iscale = _opaque(jnp.float32(-127.0) / jnp.where(zero, 1, mx))
  # nearest_int is round-half-even for |v| < 2^22; here |v| <= 127.5.
  q = jnp.minimum(127, jnp.rint(iscale * xb)).astype(jnp.int32).astype(jnp.float32)
  d = jnp.float32(1.0) / iscale
  return jnp.where(zero, 0, d * q).reshape(x.shape)


def f16(x: jax.Array) -> jax.Array:
  """Round to fp16 and back (ggml_cpu_fp32_to_fp16: F16C, round to nearest even)."""
  return _fp16_value(x)


def bf16(x: jax.Array) -> jax.Array:
  """ggml's fp32->bf16 (round to nearest even on the bit pattern, NaN forced quiet) and back."""
  h = host.bf16_bits(lax.bitcast_convert_type(x, jnp.uint32), jnp.where)
  return lax.bitcast_convert_type(h << 16, jnp.float32)


# Jitted so that a model trace records each round trip once per shape instead of re-tracing its ~50 integer
# ops at every matmul (XLA inlines them; results are the same).
_ROUND_TRIPS = {
  k: jax.jit(fn) for k, fn in {"Q8_0": q8_0, "Q8_1": q8_1, "Q8_K": q8_k, "F16": f16, "BF16": bf16}.items()
}


def round_trip(x: jax.Array, act_type: str) -> jax.Array:
  """x [..., n] (rows along the last axis) converted to the activation type `act_type` (a vec_dot_type) and
  back, in float32 as ggml computes it; the result has x's dtype. "F32" returns x itself."""
  if act_type == "F32":
    return x
  try:
    fn = _ROUND_TRIPS[act_type]
  except KeyError:
    raise ValueError(f"unknown activation type {act_type!r}; known: F32, {', '.join(_ROUND_TRIPS)}") from None
  return fn(x.astype(jnp.float32)).astype(x.dtype)


# ------------------------------------------------------------------------------------------ the mapping

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """Per weight, the ggml type it is stored in, keyed by params path: ("lm_head",),
  ("layers", "1", "mlp", "experts", "w_down"), ...; in the split layout the two halves of wkv_b are
  ("layers", i, "attn", "wkv_b", "k_b") and (..., "v_b"), since a recipe may give them different types.

  `layout` says which attention graph llama.cpp builds for the file: "split" (attn_k_b/attn_v_b) runs MLA
  absorbed (q_nope times k_b, the latent attention output times v_b), "kv_b" runs it expanded (the latent
  times wkv_b gives keys and values). `prefix` scopes lookups to a params subtree (see `scope`).
  Hashable, so it can be a static argument of jit.
  """

  weights: tuple[tuple[Path, str], ...]
  layout: str
  prefix: Path = ()
  # "exact": RMSNorm is the exact (float64) one, rounded once where a quantizer meets it; "ggml": float64
  # emulation reproduces ggml-cpu's float32 RMSNorm steps (layers.rms_norm_ggml). Not the goldens' default:
  # its internal float32 roundings are not covered by the undecided tally, and on v3-pydoc it brings
  # llama.cpp closer for Q8_0 (mean KLD 7.1e-3 -> 8.8e-4, F32 KV) but not for Q4_K_M (1.5e-4 -> 5.2e-4).
  rms_norm: str = "exact"

  def __post_init__(self):
    check_layout(self.layout)
    if self.rms_norm not in ("exact", "ggml"):
      raise ValueError(f"rms_norm must be 'exact' or 'ggml', got {self.rms_norm!r}")
    for path, ty in self.weights:
      vec_dot_type(ty)  # fails early on a type without a rule
      if not (isinstance(path, tuple) and all(isinstance(k, str) for k in path)):
        raise ValueError(f"params path {path!r} must be a tuple of str")

  @classmethod
  def from_types(cls, types: Mapping[Path, str], layout: str | None = None) -> ActQuant:
    """From {params path: ggml type name}; layout defaults to "split" iff a wkv_b half (k_b/v_b) appears.
    (A GGUF's tensor names are mapped to params paths in io/gguf_act_quant.py.)"""
    weights: dict[Path, str] = {}
    for key, ty in types.items():
      if isinstance(key, str):
        raise TypeError(f"{key!r}: ActQuant is keyed by params paths (tuples), not GGUF tensor names")
      weights[tuple(key)] = ty
    split = any(p[-1:] in (("k_b",), ("v_b",)) for p in weights)
    return cls(weights=tuple(sorted(weights.items())), layout=layout or ("split" if split else "kv_b"))

  @functools.cached_property
  def _table(self) -> dict[Path, str]:
    return dict(self.weights)

  @property
  def attn_form_name(self) -> str:
    """The MLA order llama.cpp uses for this layout: "absorbed" (split) or "expanded" (kv_b)."""
    return "absorbed" if self.layout == "split" else "expanded"

  def scope(self, *keys: str) -> ActQuant:
    """The same mapping with lookups relative to prefix + keys."""
    return dataclasses.replace(self, prefix=(*self.prefix, *keys))

  def relative(self, *keys: str) -> ActQuant:
    """The part of the mapping under params path `keys`, with paths relative to it and each weight type
    replaced by one representative of its vec_dot_type: the emulation only depends on the latter, so
    layers and recipes with the same activation types give equal (hashable) mappings, and a jitted
    function keyed on them compiles once for all of them."""
    n = len(keys)
    rel = {p[n:]: _representative(vec_dot_type(t)) for p, t in self.weights if p[:n] == keys}
    return ActQuant(weights=tuple(sorted(rel.items())), layout=self.layout, rms_norm=self.rms_norm)

  def weight_type(self, key: Path) -> str:
    """ggml type of a weight, by params path relative to `prefix`."""
    if isinstance(key, str):
      raise TypeError(f"{key!r}: weights are looked up by params path (a tuple), not by GGUF tensor name")
    path = (*self.prefix, *key)
    try:
      return self._table[path]
    except KeyError:
      raise KeyError(
        f"no weight type for {'.'.join(path)!r} (layout {self.layout!r}); the mapping does not match the "
        "model or the attention form"
      ) from None

  def act_type(self, key: Path) -> str:
    """The activation type (vec_dot_type) the weight's activations are converted to."""
    return vec_dot_type(self.weight_type(key))


def apply(aq: ActQuant | None, x: jax.Array, *name: str) -> jax.Array:
  """x [..., n] as llama.cpp's CPU backend presents it to weight `name` (relative to aq's prefix); x itself
  when aq is None. A float64 x is rounded to float32 once (llama.cpp's activations are float32), run
  through the float32 quantizer and returned as float64; under an undecided.Tally the rows whose quantized
  values another float64 evaluation order could change are counted (kind "act.<params path>")."""
  if aq is None:
    return x
  path = (*aq.prefix, *name)
  kind = "act." + ".".join(path[2:] if path[:1] == ("layers",) else path)
  return rounded(x, aq.act_type(name), kind)


def rounded(
  x: jax.Array, act_type: str, kind: str, positions: jax.Array | None = None, gate: jax.Array | None = None
) -> jax.Array:
  """round_trip(x, act_type), recording undecided points under `kind` (module undecided) for float64 x.

  A float64 value near a float32 rounding midpoint is undecided only if its other float32 neighbour would
  change what the quantizer makes of it; so the round trip runs a second time with every such element
  flipped, and each quantization block (element, for F16/BF16) whose output changes counts as one point.
  positions: the tokens of x's second axis when they are not the pass's query tokens (undecided.Tally.add).
  gate: None, or a traced boolean: where it is false, x is returned unrounded and nothing is counted (one
  compiled function for both settings).
  """
  if act_type == "F32" or x.dtype != jnp.float64 or undecided.active() is None:
    y = round_trip(x, act_type)
    return y if gate is None else jnp.where(gate, y, x)
  near, alt = undecided.f32_alternative(x)
  both = _ROUND_TRIPS[act_type](jnp.stack([near, alt]))  # one quantizer instance for both
  changed = both[0] != both[1]  # [..., n]
  block = qtype_of(act_type).block_elems  # elements sharing a scale (1 for F16/BF16)
  per_block = changed.reshape(*changed.shape[:-1], -1, block).any(-1)  # [..., n / block]
  if gate is not None:
    per_block = per_block & gate
  undecided.record(kind, per_block, positions)
  y = both[0].astype(x.dtype)
  return y if gate is None else jnp.where(gate, y, x)


def ggml_norm(aq: ActQuant | None) -> bool:
  """Whether RMSNorm should reproduce ggml-cpu's float32 steps (ActQuant.rms_norm == "ggml")."""
  return aq is not None and aq.rms_norm == "ggml"


def scope(aq: ActQuant | None, *keys: str) -> ActQuant | None:
  return None if aq is None else aq.scope(*keys)
