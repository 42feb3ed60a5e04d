"""A model as llama.cpp would run it after quantization, without writing a GGUF file.

For every tensor of the recipe's plan the bytes come from the same `TensorJob` pieces that
`dq3jax quantize` writes (so the same ggml bytes), and are dequantized with `dq3jax.dequantize` exactly as
`dq3jax.io.gguf_read.load` reads them back; the params pytree is rebuilt with the same mapping. The result is
bit-identical to writing the GGUF and loading it (tested), minus the file.

`TensorCache` lets several recipes of one ablation share work: a tensor quantized to the same type (with the
same importance matrix) gives the same values whichever recipe asked for it, so it is quantized once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import dq3jax
from dq3jax.convert.quantize import get_recipe, make_jobs, plan_for
from dq3jax.convert.sources import WeightSource
from dq3jax.io import gguf_layout
from dq3jax.io.gguf_write import TensorJob
from dq3jax.io.imatrix import Imatrix
from dq3jax.recipes.plan import Plan
from dq3jax.recipes.rules import Recipe


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorInfo:
  """One tensor of a quantized model: what llama.cpp would store."""

  name: str  # GGUF name
  type: str  # ggml type after shape fallbacks
  bytes: int
  params: int
  fallback_from: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prepared:
  """A recipe resolved against one model: its plan and one (not yet run) job per tensor."""

  recipe: Recipe
  plan: Plan
  jobs: tuple[TensorJob, ...]

  @property
  def tensors(self) -> tuple[TensorInfo, ...]:
    by_name = self.plan.by_name()
    return tuple(
      TensorInfo(
        name=j.name,
        type=j.qtype.name,
        bytes=j.nbytes,
        params=j.n_elements,
        fallback_from=by_name[j.name].fallback_from,
      )
      for j in self.jobs
    )


class TensorCache:
  """(GGUF name, ggml type) -> dequantized float32 array, for one source and one importance matrix.

  Whether the imatrix reaches the quantizer depends only on the tensor, its type and the imatrix (see
  dq3jax.recipes.imatrix_use), so the key is complete as long as a cache is not shared between sources or
  importance matrices. Holding every array costs one float32 copy of a tensor per distinct type it gets;
  `max_bytes` bounds it (arrays beyond the bound are recomputed when asked for again).
  """

  def __init__(self, max_bytes: int = 4 << 30):
    self.max_bytes = max_bytes
    self.bytes = 0
    self.hits = 0
    self._store: dict[tuple[str, str], np.ndarray] = {}

  def get(self, name: str, qtype: str) -> np.ndarray | None:
    a = self._store.get((name, qtype))
    self.hits += a is not None
    return a

  def put(self, name: str, qtype: str, a: np.ndarray) -> None:
    if self.bytes + a.nbytes <= self.max_bytes:
      a.setflags(write=False)  # shared between params trees
      self._store[(name, qtype)] = a
      self.bytes += a.nbytes


def prepare(
  source: WeightSource,
  recipe: str | Recipe,
  *,
  rules: str = "current",
  layout: str = "split",
  imatrix: Imatrix | None = None,
) -> Prepared:
  """Plan and validate without quantizing anything: unknown recipes, types dq3jax cannot quantize, shape
  fallbacks that llama.cpp rejects and importance matrices of the wrong size all fail here."""
  r = get_recipe(recipe, rules)
  plan = plan_for(source.config, r, rules, layout, imatrix=imatrix is not None)
  if imatrix is not None and imatrix.entries and not {t.name for t in plan.tensors} & set(imatrix.entries):
    raise ValueError(f"imatrix {imatrix.path}: none of its entries names a tensor of this model")
  return Prepared(recipe=r, plan=plan, jobs=tuple(make_jobs(source, plan, imatrix=imatrix)))


def _dequantized(job) -> np.ndarray:
  """The job's tensor in float32 [n_elements], dequantized piece by piece as the quantizer yields them: peak
  memory is the float32 result and one piece, not also the whole tensor's bytes."""
  ne0 = job.ne[0]
  row_bytes = job.qtype.row_bytes(ne0)
  out = np.empty(job.n_elements, np.float32)
  pos = 0
  for piece in job.checked_pieces():
    rows = piece.size // row_bytes
    out[pos : pos + rows * ne0] = dq3jax.dequantize(piece, job.qtype, (rows, ne0)).reshape(-1)
    pos += rows * ne0
  return out


def build_params(prepared: Prepared, *, cache: TensorCache | None = None) -> dict:
  """Run the jobs and dequantize: the float32 params pytree a GGUF of this plan loads as."""
  cfg = prepared.plan.dims  # only for the layer count
  built = gguf_layout.ParamsBuilder(cfg.n_layer)
  for job in prepared.jobs:
    a = cache.get(job.name, job.qtype.name) if cache is not None else None
    if a is None:
      a = _dequantized(job).reshape(gguf_layout.torch_shape(job.ne))  # torch layout
      if cache is not None:
        cache.put(job.name, job.qtype.name, a)
    built.add(job.name, a)
  return built.tree


def quantized_params(
  source: WeightSource,
  recipe: str | Recipe,
  rules: str = "current",
  layout: str = "split",
  imatrix: Imatrix | None = None,
  *,
  cache: TensorCache | None = None,
) -> tuple[dict, list[TensorInfo]]:
  """(float32 params pytree as llama.cpp would compute with after quantizing `source` with `recipe`,
  per-tensor info: name, type, bytes, params)."""
  prepared = prepare(source, recipe, rules=rules, layout=layout, imatrix=imatrix)
  return build_params(prepared, cache=cache), list(prepared.tensors)
