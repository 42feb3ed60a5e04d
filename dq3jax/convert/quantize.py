"""HF checkpoint (or params pytree) -> deepseek2 GGUF, plain (F32/F16/BF16) or quantized by a recipe.

The result equals running llama.cpp's `convert_hf_to_gguf.py --outtype f32` and then `llama-quantize` with the
recipe's preset (plus `--tensor-type` overrides for non-preset recipes) and the same imatrix: per tensor the
same ggml type (dq3jax.recipes plans it with llama-quantize's rules) and the same bytes (dq3jax.quantize is
byte-identical to ggml_quantize_chunk). Plain F32/F16/BF16 follow the converter: norms, 1-D tensors and the
router stay F32, every other weight gets the type.

Tensors are streamed: each is read from the source, quantized in row chunks and written before the next one
is read, so peak memory is about one tensor in float32 (plus one row chunk of quantizer scratch).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import gguf
import numpy as np

import dq3jax
from dq3jax.convert.sources import WeightSource, slices
from dq3jax.io import gguf_layout, gguf_meta
from dq3jax.io.gguf_write import TensorJob, write_gguf
from dq3jax.io.imatrix import Imatrix
from dq3jax.qtypes import QType, qtype_of
from dq3jax.recipes.imatrix_use import imatrix_use
from dq3jax.recipes.plan import Plan, make_plan
from dq3jax.recipes.recipe_file import resolve_recipe
from dq3jax.recipes.rules import Recipe, RecipeError
from dq3jax.recipes.rules import rule_set as get_rule_set

log = logging.getLogger(__name__)

PLAIN = ("F32", "F16", "BF16")
_FILE_TYPE = {
  "F32": gguf.LlamaFileType.ALL_F32,
  "F16": gguf.LlamaFileType.MOSTLY_F16,
  "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}
# Rows are quantized in chunks of about this many elements: bounds quantizer scratch, not results (rows are
# independent in every ggml quantizer, including the legacy types' per-row imatrix sigma2).
CHUNK_ELEMS = 1 << 22


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorResult:
  name: str
  ne: tuple[int, ...]
  type: str
  bytes: int
  quantized: bool  # False: kept in its source type by the driver rules
  imatrix: bool  # importance weights reached the quantizer
  fallback_from: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeResult:
  path: str
  recipe: str
  rules: str
  layout: str
  config: object
  tensors: tuple[TensorResult, ...]

  @property
  def total_bytes(self) -> int:
    return sum(t.bytes for t in self.tensors)

  @property
  def total_params(self) -> int:
    return sum(int(np.prod(t.ne)) for t in self.tensors)

  def by_type(self) -> dict[str, tuple[int, int, int]]:
    """type -> (tensors, params, bytes), largest first."""
    acc: dict[str, list[int]] = {}
    for t in self.tensors:
      a = acc.setdefault(t.type, [0, 0, 0])
      a[0] += 1
      a[1] += int(np.prod(t.ne))
      a[2] += t.bytes
    return {k: tuple(v) for k, v in sorted(acc.items(), key=lambda kv: -kv[1][2])}

  def summary(self) -> str:
    lines = [
      f"{self.path}: recipe {self.recipe}, rules {self.rules}, layout {self.layout}, {len(self.tensors)} tensors",
      f"{'type':<6} {'tensors':>8} {'params':>15} {'MiB':>11} {'share':>7}",
    ]
    for ty, (n, p, b) in self.by_type().items():
      lines.append(f"{ty:<6} {n:>8} {p:>15,} {b / 2**20:>11.2f} {100 * p / self.total_params:>6.2f}%")
    n_im = sum(t.imatrix for t in self.tensors)
    n_fb = sum(t.fallback_from is not None for t in self.tensors)
    lines.append(
      f"total  {len(self.tensors):>8} {self.total_params:>15,} {self.total_bytes / 2**20:>11.2f}  "
      f"{8 * self.total_bytes / self.total_params:.4f} bits/weight; imatrix used for {n_im} tensors, "
      f"{n_fb} shape fallbacks"
    )
    return "\n".join(lines)


def get_recipe(name: str | Recipe, rules: str = "current") -> Recipe:
  """A built-in llama.cpp preset or DQ3_K_M, a recipe JSON file, or plain F32/F16/BF16."""
  if isinstance(name, Recipe):
    return name
  if name.strip().upper() in PLAIN:
    t = name.strip().upper()
    # A default type that is not a quantized one makes llama-quantize's per-tensor rules a no-op.
    return Recipe(name=t, default_type=t, rules=(), description=f"plain {t}, as convert_hf_to_gguf --outtype")
  return resolve_recipe(name, rules=rules)


def file_type(recipe: Recipe) -> int | None:
  key = recipe.ftype or recipe.name
  if key in _FILE_TYPE:
    return int(_FILE_TYPE[key])
  try:
    return int(gguf.LlamaFileType[f"MOSTLY_{key}"])
  except KeyError:
    return None


def make_jobs(
  source: WeightSource,
  plan: Plan,
  *,
  imatrix: Imatrix | None = None,
  on_result: Callable[[TensorResult], None] | None = None,
) -> list[TensorJob]:
  """One TensorJob per planned tensor. Validates everything knowable up front (computable types, imatrix sizes,
  required imatrix entries) so a bad input fails before the output file is created."""
  cfg = source.config
  jobs = []
  for t in plan.tensors:
    if t.quantized:
      ty = t.type
    else:
      # The driver keeps it in its source type; the source is float32 (1-D, router, recipe `keep`).
      ty = "F32"
    try:
      q = qtype_of(ty)
    except ValueError:
      q = None
    if q is None or not q.computable:  # e.g. IQ2_XXS: the registry knows its size, no quantizer yet
      raise RecipeError(
        f"{t.name}: recipe {plan.recipe.name} ({plan.rules.name} rules) gives {ty}"
        f"{f' (fallback from {t.fallback_from})' if t.fallback_from else ''}, which dq3jax cannot quantize"
      )
    rows_imat = _imatrix_rows(imatrix, t, ty, plan.recipe, cfg) if t.quantized else None
    if t.requires_imatrix and rows_imat is None:
      raise ValueError(
        f"{t.name}: {plan.recipe.name} needs an importance matrix for {ty} tensors (as llama-quantize), "
        + ("none given" if imatrix is None else f"{imatrix.path} has no entry for it")
      )
    result = TensorResult(
      name=t.name,
      ne=t.ne,
      type=q.name,
      bytes=0,
      quantized=t.quantized,
      imatrix=rows_imat is not None,
      fallback_from=t.fallback_from,
    )
    jobs.append(
      TensorJob(
        name=t.name,
        ne=t.ne,
        qtype=q,
        pieces=_producer(source, t.name, t.ne, q, rows_imat, result, on_result),
      )
    )
  return jobs


def _imatrix_rows(imatrix: Imatrix | None, t, ty: str, recipe: Recipe, cfg) -> np.ndarray | None:
  """Importance weights [n_slices, ne0] for tensor t, or None where llama-quantize would not pass any."""
  if imatrix is None or t.name not in imatrix.entries:
    return None
  ne0 = t.ne[0]
  n_slices = t.ne[2] if len(t.ne) > 2 else 1
  try:
    w = imatrix.weights(t.name, ne0)
  except ValueError as e:
    if t.name == "token_embd.weight":
      return None  # llama-quantize ignores a token_embd entry of the wrong size
    raise ValueError(f"imatrix {imatrix.path}: {e} (is it for another model?)") from None
  if len(t.ne) > 2 and w.shape[0] > n_slices and gguf_layout.mapping(t.name).kind is gguf_layout.Kind.EXPERTS:
    # A truncated model (--experts E) keeps the first E experts; their statistics are the first E rows.
    w = w[:n_slices]
  try:
    use = imatrix_use(t.name, t.ne, "F32", ty, int(w.size), recipe)
  except ValueError as e:
    raise ValueError(
      f"imatrix {imatrix.path}: entry {t.name!r} has {w.shape[0]} x {w.shape[1]} values, tensor ne {list(t.ne)} "
      f"needs {n_slices} x {ne0} ({e}; is it for another model?)"
    ) from None
  return w.reshape(n_slices, ne0) if use.applies else None


def _producer(source, name, ne, q: QType, rows_imat, result: TensorResult, on_result):
  def pieces():
    # One row chunk at a time: peak memory is one slice of float32 input and one chunk of bytes and scratch,
    # whatever the tensor's size (a [256, 2048, 7168] expert tensor is 15 GB in float32).
    total = 0
    for k, x in enumerate(slices(source, name, ne)):
      x = x.reshape(-1, ne[0])
      im = None if rows_imat is None else rows_imat[k]
      step = max(1, CHUNK_ELEMS // ne[0])
      for s in range(0, x.shape[0], step):
        b = dq3jax.quantize(x[s : s + step], q, imatrix=im).reshape(-1)
        total += b.size
        yield b
      del x
    if on_result is not None:
      on_result(dataclasses.replace(result, bytes=int(total)))

  return pieces


def plan_for(cfg, recipe: Recipe, rules: str, layout: str, *, imatrix: bool = False) -> Plan:
  """The plan of `recipe` for a model config; imatrix: whether an importance matrix is given (llama-quantize
  chooses some i-quant presets' types differently then)."""
  rs = get_rule_set(rules)
  tensors, dims = gguf_layout.tensors(cfg, layout), gguf_layout.dims_of(cfg)
  return make_plan(tensors, dims, recipe, rs, layout, imatrix=imatrix)


def quantize_to_gguf(
  source: WeightSource,
  out: str | os.PathLike,
  recipe: str | Recipe,
  *,
  imatrix: Imatrix | None = None,
  rules: str = "current",
  layout: str = "split",
  progress: bool = False,
  name: str = "dq3jax",
) -> QuantizeResult:
  """Write `source` as a deepseek2 GGUF at `out` (atomically) with the types of `recipe`."""
  cfg = source.config
  r = get_recipe(recipe, rules)
  gguf_meta.check_representable(cfg)
  plan = plan_for(cfg, r, rules, layout, imatrix=imatrix is not None)
  _check_imatrix_matches(imatrix, plan)
  results: list[TensorResult] = []
  jobs = make_jobs(source, plan, imatrix=imatrix, on_result=results.append)
  ft = file_type(r)
  write_gguf(
    out, lambda w: gguf_meta.metadata(w, cfg, layout, name=name, file_type=ft), jobs, progress=progress
  )
  return QuantizeResult(
    path=os.fspath(out), recipe=r.name, rules=rules, layout=layout, config=cfg, tensors=tuple(results)
  )


def _check_imatrix_matches(imatrix: Imatrix | None, plan: Plan) -> None:
  if imatrix is None or not imatrix.entries:
    return
  names = {t.name for t in plan.tensors}
  if not names & set(imatrix.entries):
    some = ", ".join(sorted(imatrix.entries)[:3])
    raise ValueError(
      f"imatrix {imatrix.path}: none of its {len(imatrix.entries)} entries ({some}, ...) names a tensor of this "
      "deepseek2 model; is it for another model?"
    )
