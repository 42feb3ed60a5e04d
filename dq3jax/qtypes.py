"""The one registry of ggml tensor types dq3jax knows, keyed by ggml's type id.

Every fact about a type lives in its `QType` entry here and nowhere else: block geometry, whether its
quantizer reads an importance matrix, whether it can be stored in a model file, which kernels compute it (and
of which family), and the activation type llama.cpp's CPU backend pairs with it (`vec_dot_type`). Other
modules ask this table; `tests/test_one_table.py` fails if a block size or a kernel is named anywhere else.

Ids are ggml's `enum ggml_type` values, which are also what GGUF files store and what
`gguf.GGMLQuantizationType` enumerates. Three kinds of entry:
  * computable types (`kernels` with both functions): dq3jax quantizes and dequantizes them bit-exactly;
  * dequantize-only types (`kernels.quantize` None: the i-quants IQ1_S..IQ3_S): files holding them are read,
    run and diffed bit-exactly, but dq3jax cannot write them yet;
  * size-only storage types (TQ1_0/TQ2_0; `kernels=None`): planning knows their size and a GGUF holding them
    parses (header, sizes, byte comparison), but dq3jax cannot compute with them;
  * activation-only types (`storable=False`): Q8_K (with kernels) and Q8_1 (without), the vec_dot types the
    llama.cpp emulation rounds activations through.

Kernels are named here as "module:function" strings inside `dq3jax.quant` rather than imported: this module
is the table of facts that every layer (io, recipes, model, quant) asks, and it must not depend on the
implementation it describes (a kernel module asking a fact here would otherwise be an import cycle).
`dq3jax.quant.api` resolves every name once, when it is imported, so a misspelt or missing kernel fails there
rather than at a type's first use.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
from collections.abc import Callable

import gguf


class GGMLType(enum.IntEnum):
  F32 = 0
  F16 = 1
  Q4_0 = 2
  Q4_1 = 3
  Q5_0 = 6
  Q5_1 = 7
  Q8_0 = 8
  Q8_1 = 9
  Q2_K = 10
  Q3_K = 11
  Q4_K = 12
  Q5_K = 13
  Q6_K = 14
  Q8_K = 15
  IQ2_XXS = 16
  IQ2_XS = 17
  IQ3_XXS = 18
  IQ1_S = 19
  IQ4_NL = 20
  IQ3_S = 21
  IQ2_S = 22
  IQ4_XS = 23
  IQ1_M = 29
  BF16 = 30
  TQ1_0 = 34
  TQ2_0 = 35


class Family(enum.Enum):
  """How quant/api.py drives a type's quantizer; the kernel signatures differ by family."""

  # Bit conversions (`f(x)`): integer operations only, nothing can underflow, no exact re-run.
  FLOAT = "float"
  # 32-element blocks (`f(A, x, qw, sigma2=)`): importance-matrix variants also take each row's mean square.
  LEGACY = "legacy"
  # Self-contained blocks (`f(A, x, qw)`): every input a block's bytes depend on lies in the block (its
  # statistics, such as sigma2, are over the block itself). The k-quants' 256-element super-blocks, IQ4_XS's,
  # and IQ4_NL's 32-element block (ggml quantizes it as a super-block of one group).
  K = "k"


@functools.cache
def _resolve(ref: str) -> Callable:
  module, _, name = ref.partition(":")
  return getattr(importlib.import_module(f"dq3jax.quant.{module}"), name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kernels:
  """The functions that compute a type, as "module:function" names inside dq3jax.quant."""

  family: Family
  # float32 [block_elems, nb] -> uint8 [block_bytes, nb] (host: float32 rows -> bytes); None: dequantize only.
  quantize: str | None
  dequantize: str  # uint8 [nb, block_bytes] -> float32 [nb, block_elems] (host: raw bytes -> float32)
  # Pure bit reinterpretations with numpy on the host: nothing a backend could round differently, and one
  # pass over memory instead of a padded device round trip per chunk.
  on_host: bool = False
  # The dequantizer computes exactly in float64 (a float32 scale whose products can round): needs jax x64.
  dequantize_x64: bool = False

  def __post_init__(self):
    if self.on_host and self.family is not Family.FLOAT:
      raise ValueError("only bit conversions (Family.FLOAT) run on the host")

  def quantizer(self) -> Callable:
    if self.quantize is None:
      raise ValueError("no quantizer")
    return _resolve(self.quantize)

  def dequantizer(self) -> Callable:
    return _resolve(self.dequantize)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QType:
  """Static facts about one ggml type."""

  ggml_type: GGMLType
  block_elems: int
  block_bytes: int
  # True where ggml_quantize_chunk takes a different path when given an importance matrix.
  uses_imatrix: bool
  # True for types that appear in model files (Q8_K and Q8_1 are activation-side intermediates).
  storable: bool = True
  # None: dq3jax can size the type but not compute with it.
  kernels: Kernels | None = None
  # ggml-cpu.c type_traits_cpu[type].vec_dot_type: what llama.cpp's CPU backend converts activations to
  # before multiplying them by a weight of this type. None where dq3jax has no such weight to emulate.
  vec_dot_type: GGMLType | None = None

  @property
  def name(self) -> str:
    return self.ggml_type.name

  @property
  def id(self) -> int:
    return int(self.ggml_type)

  @property
  def computable(self) -> bool:
    """Whether dq3jax has kernels for the type (quantize and dequantize)."""
    return self.kernels is not None and self.kernels.quantize is not None

  @property
  def dequantizable(self) -> bool:
    """Whether dq3jax can turn the type's bytes into float32 (what reading and running a file needs)."""
    return self.kernels is not None

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.block_bytes / self.block_elems

  def row_bytes(self, n: int) -> int:
    """Bytes of one row of `n` elements (ggml_row_size); `n` must be a multiple of the block."""
    if n % self.block_elems:
      raise ValueError(f"{self.name}: row width {n} is not a multiple of the block size {self.block_elems}")
    return n // self.block_elems * self.block_bytes


_T, _F = GGMLType, Family


def _k(family: Family, quantize: str, dequantize: str, **kw) -> Kernels:
  return Kernels(family=family, quantize=quantize, dequantize=dequantize, **kw)


def _dq(dequantize: str) -> Kernels:
  # Dequantize-only (no quantizer yet): the block family is the k-quants' self-contained super-block.
  return Kernels(family=Family.K, quantize=None, dequantize=dequantize)


def _q(t, elems, nbytes, imatrix, vec_dot, kernels, storable=True) -> QType:
  return QType(
    ggml_type=t,
    block_elems=elems,
    block_bytes=nbytes,
    uses_imatrix=imatrix,
    storable=storable,
    kernels=kernels,
    vec_dot_type=vec_dot,
  )


# fmt: off
REGISTRY: dict[int, QType] = {
    q.id: q
    for q in (
        # type       elems bytes imatrix vec_dot  kernels
        _q(_T.F32,       1,   4, False, _T.F32,  _k(_F.FLOAT, "host:quantize_f32", "host:dequantize_f32",
                                                      on_host=True)),
        _q(_T.F16,       1,   2, False, _T.F16,  _k(_F.FLOAT, "floats:f16", "dequant:f16")),
        _q(_T.BF16,      1,   2, False, _T.BF16, _k(_F.FLOAT, "host:quantize_bf16", "host:dequantize_bf16",
                                                      on_host=True)),
        _q(_T.Q4_0,     32,  18, True,  _T.Q8_0, _k(_F.LEGACY, "legacy:q4_0", "dequant:q4_0")),
        _q(_T.Q4_1,     32,  20, True,  _T.Q8_1, _k(_F.LEGACY, "legacy:q4_1", "dequant:q4_1")),
        _q(_T.Q5_0,     32,  22, True,  _T.Q8_0, _k(_F.LEGACY, "legacy:q5_0", "dequant:q5_0")),
        _q(_T.Q5_1,     32,  24, True,  _T.Q8_1, _k(_F.LEGACY, "legacy:q5_1", "dequant:q5_1")),
        _q(_T.Q8_0,     32,  34, False, _T.Q8_0, _k(_F.LEGACY, "legacy:q8_0", "dequant:q8_0")),
        _q(_T.Q2_K,    256,  84, True,  _T.Q8_K, _k(_F.K, "kquants:q2_k", "dequant:q2_k")),
        _q(_T.Q3_K,    256, 110, True,  _T.Q8_K, _k(_F.K, "kquants:q3_k", "dequant:q3_k")),
        _q(_T.Q4_K,    256, 144, True,  _T.Q8_K, _k(_F.K, "kquants:q4_k", "dequant:q4_k")),
        _q(_T.Q5_K,    256, 176, True,  _T.Q8_K, _k(_F.K, "kquants:q5_k", "dequant:q5_k")),
        _q(_T.Q6_K,    256, 210, True,  _T.Q8_K, _k(_F.K, "kquants:q6_k", "dequant:q6_k")),
        _q(_T.Q8_K,    256, 292, False, None,    _k(_F.K, "kquants:q8_k", "dequant:q8_k",
                                                      dequantize_x64=True), storable=False),
        # IQ4_NL is the paper-era fallback for Q2_K/Q3_K targets whose rows are not a multiple of 256; its
        # 32-element block is its own super-block, so it is driven like the k-quants (Family.K).
        _q(_T.IQ4_NL,   32,  18, True,  _T.Q8_0, _k(_F.K, "iq4:iq4_nl", "dequant:iq4_nl")),
        # The i-quant and ternary types of published DeepSeek GGUFs (IQ1_S..IQ4_XS mixes): IQ4_XS quantizes,
        # the other i-quants dequantize only (their vec_dot type is Q8_K, ggml-cpu's type_traits_cpu), the
        # ternary types are sized only. Q8_1 (ggml's block_q8_1: fp16 d and s, 32 int8) is the activation
        # type of Q4_1/Q5_1.
        _q(_T.IQ2_XXS, 256,  66, True,  _T.Q8_K, _dq("iq_dequant:iq2_xxs")),
        _q(_T.IQ2_XS,  256,  74, True,  _T.Q8_K, _dq("iq_dequant:iq2_xs")),
        _q(_T.IQ3_XXS, 256,  98, True,  _T.Q8_K, _dq("iq_dequant:iq3_xxs")),
        _q(_T.IQ1_S,   256,  50, True,  _T.Q8_K, _dq("iq_dequant:iq1_s")),
        _q(_T.IQ3_S,   256, 110, True,  _T.Q8_K, _dq("iq_dequant:iq3_s")),
        _q(_T.IQ2_S,   256,  82, True,  _T.Q8_K, _dq("iq_dequant:iq2_s")),
        _q(_T.IQ4_XS,  256, 136, True,  _T.Q8_K, _k(_F.K, "iq4:iq4_xs", "dequant:iq4_xs")),
        _q(_T.IQ1_M,   256,  56, True,  _T.Q8_K, _dq("iq_dequant:iq1_m")),
        _q(_T.TQ1_0,   256,  54, False, None,    None),
        _q(_T.TQ2_0,   256,  66, False, None,    None),
        _q(_T.Q8_1,     32,  36, False, None,    None, storable=False),
    )
}
# fmt: on

QTypeLike = "str | int | GGMLType | gguf.GGMLQuantizationType | QType"


def computable() -> list[QType]:
  """The types dq3jax has kernels for, in registry order (what the kernel goldens and cross-checks cover)."""
  return [q for q in REGISTRY.values() if q.computable]


def qtype_of(t: object) -> QType:
  """Resolves a type name ("Q4_K", case-insensitive), ggml id, or gguf enum to its QType."""
  if isinstance(t, QType):
    return t
  if isinstance(t, str):
    key = t.strip().upper()
    for q in REGISTRY.values():
      if q.name == key:
        return q
    raise ValueError(f"unknown ggml type {t!r}; known: {', '.join(q.name for q in REGISTRY.values())}")
  if isinstance(t, (int, enum.IntEnum)) and not isinstance(t, bool):
    q = REGISTRY.get(int(t))
    if q is None:
      name = t.name if isinstance(t, enum.Enum) else str(int(t))
      raise ValueError(
        f"ggml type {name} (id {int(t)}) is not supported by dq3jax; "
        f"supported: {', '.join(q.name for q in REGISTRY.values())}"
      )
    return q
  raise TypeError(f"expected a ggml type name, id or gguf.GGMLQuantizationType, got {type(t).__name__}")


# Where gguf-py's table is known to be wrong: it still gives Q8_1 two float32 fields (4 + 4 + 32 bytes), while
# ggml's block_q8_1 has been two fp16 (36 bytes, ggml_type_size; tests/quant/test_api.py checks live ggml).
# Recorded with gguf-py's value so that the check below notices when gguf-py is fixed.
_GGUF_PY_ERRATA: dict[GGMLType, tuple[int, int]] = {GGMLType.Q8_1: (32, 40)}


def _check() -> None:
  # gguf-py's table is an independent statement of the same layout; a mismatch is a bug here.
  for q in REGISTRY.values():
    gt = gguf.GGMLQuantizationType(q.id)
    if gt.name != q.name:
      raise AssertionError(f"{q.name}: gguf-py calls type id {q.id} {gt.name}")
    ref = gguf.GGML_QUANT_SIZES[gt]
    want = _GGUF_PY_ERRATA.get(q.ggml_type, (q.block_elems, q.block_bytes))
    if ref != want:
      raise AssertionError(f"{q.name}: registry says {(q.block_elems, q.block_bytes)}, gguf says {ref}")
    # A vec_dot type is what activations are converted to; it must itself be a registry type.
    if q.vec_dot_type is not None and int(q.vec_dot_type) not in REGISTRY:
      raise AssertionError(f"{q.name}: vec_dot_type {q.vec_dot_type.name} is not in the registry")
    if q.kernels is not None and q.kernels.family is Family.FLOAT and q.block_elems != 1:
      raise AssertionError(f"{q.name}: a bit conversion must have one-element blocks")


_check()
