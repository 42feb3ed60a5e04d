"""One table per fact: a ggml type's facts (block geometry, kernels, family, vec_dot type) are stated only in
dq3jax/qtypes.py's REGISTRY. These tests read the package's source and fail where another module restates
one: a read of gguf-py's size table, a literal per-type table, or a kernel named outside the registry.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from dq3jax.qtypes import REGISTRY, GGMLType, computable

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dq3jax"
REGISTRY_FILE = PACKAGE / "qtypes.py"
TYPE_NAMES = frozenset(t.name for t in GGMLType)


def _sources() -> list[tuple[pathlib.Path, ast.Module]]:
  return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py")) if p != REGISTRY_FILE]


def _where(p: pathlib.Path, node: ast.AST) -> str:
  return f"{p.relative_to(PACKAGE.parent)}:{node.lineno}"


def _kernel_refs() -> set[tuple[str, str]]:
  """(module, function) of every kernel the registry names."""
  refs = set()
  for q in computable():
    for ref in (q.kernels.quantize, q.kernels.dequantize):
      module, _, fn = ref.partition(":")
      refs.add((module, fn))
  return refs


def test_gguf_py_size_table_is_read_only_by_the_registry():
  found = [
    _where(p, n)
    for p, tree in _sources()
    for n in ast.walk(tree)
    if (isinstance(n, ast.Attribute) and n.attr == "GGML_QUANT_SIZES")
    or (isinstance(n, ast.Name) and n.id == "GGML_QUANT_SIZES")
    or (isinstance(n, ast.ImportFrom) and any(a.name == "GGML_QUANT_SIZES" for a in n.names))
  ]
  assert found == [], f"gguf.GGML_QUANT_SIZES read outside dq3jax/qtypes.py (ask the registry): {found}"


def _type_key(k: ast.expr | None) -> bool:
  """A dict key naming a ggml type: "Q4_K" or an enum member such as GGMLType.Q4_K / T.Q4_K."""
  if isinstance(k, ast.Constant) and isinstance(k.value, str):
    return k.value in TYPE_NAMES
  return isinstance(k, ast.Attribute) and k.attr in TYPE_NAMES


def _per_type_fact(v: ast.expr) -> bool:
  """A value that states a fact about its key's type: a number (block size, bytes, id), another type's name
  (vec_dot type), or a function reference (a kernel)."""
  if isinstance(v, ast.Constant):
    return isinstance(v.value, int) or v.value in TYPE_NAMES
  return isinstance(v, (ast.Attribute, ast.Name, ast.Lambda))


# Per-type tables that state something other than a fact of the type, each stated nowhere else:
_ALLOWED_TABLES = {
  # the llama.cpp emulation's round trips: ggml-cpu's x86 `from_float` routines for the activation types
  # (not ggml_quantize_chunk's kernels);
  ("dq3jax/model/act_quant.py", ("BF16", "F16", "Q8_0", "Q8_1", "Q8_K")),
  # llama.cpp's shape fallbacks, which differ between the llama.cpp versions a rule set follows;
  ("dq3jax/recipes/rules.py", ("Q4_K", "Q5_K", "Q6_K")),
  # token_embd's type per llama.cpp *preset* (the IQ1/IQ2 preset names coincide with type names);
  ("dq3jax/recipes/builtin.py", ("IQ1_M", "IQ1_S", "IQ2_S", "IQ2_XS", "IQ2_XXS")),
  # the GGUF general.file_type llama-quantize writes for an all-plain file (a file fact, per recipe).
  ("dq3jax/convert/quantize.py", ("BF16", "F16", "F32")),
}


def test_no_literal_per_type_tables_outside_the_registry():
  # A dict literal whose keys are all ggml types (two or more) and whose values are numbers, type names or
  # functions restates registry facts: e.g. {"Q4_K": 256, "Q8_0": 32}, {T.F32: floats.f32, ...}.
  found = []
  for p, tree in _sources():
    for n in ast.walk(tree):
      if not isinstance(n, ast.Dict) or len(n.keys) < 2 or not all(_type_key(k) for k in n.keys):
        continue
      keys = tuple(sorted(k.value if isinstance(k, ast.Constant) else k.attr for k in n.keys))
      allowed = (str(p.relative_to(PACKAGE.parent)), keys) in _ALLOWED_TABLES
      if all(_per_type_fact(v) for v in n.values) and not allowed:
        found.append(_where(p, n))
  assert found == [], f"per-type tables outside dq3jax/qtypes.py (make them registry fields): {found}"


def _named(tree: ast.Module) -> set[tuple[str, str]]:
  """(module, name) pairs a source refers to: `module.name` attributes and `from ...module import name`."""
  out = set()
  for n in ast.walk(tree):
    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
      out.add((n.value.id, n.attr))
    elif isinstance(n, ast.ImportFrom) and n.module:
      out |= {(n.module.rpartition(".")[2], a.name) for a in n.names}
  return out


def test_kernels_are_named_only_by_the_registry():
  refs = _kernel_refs()
  found = [f"{p.relative_to(PACKAGE.parent)}: {m}.{f}" for p, t in _sources() for m, f in _named(t) & refs]
  assert found == [], f"kernels named outside dq3jax/qtypes.py: {found}"


def test_every_kernel_module_function_is_reachable():
  # Dead kernels (defined, named by no registry entry and called by nothing) are how the tables drifted.
  refs = _kernel_refs()
  used = set().union(*(_named(tree) for _, tree in _sources()))
  dead = []
  for module in sorted({m for m, _ in refs}):
    for node in ast.parse((PACKAGE / "quant" / f"{module}.py").read_text()).body:
      if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
        if (module, node.name) not in refs | used:
          dead.append(f"{module}.{node.name}")
  assert dead == [], f"kernel module functions nothing reaches: {dead}"


@pytest.mark.parametrize("q", computable(), ids=lambda q: q.name)
def test_registry_kernels_resolve(q):
  assert callable(q.kernels.quantizer()) and callable(q.kernels.dequantizer())


def test_registry_is_keyed_by_ggml_id_and_closed_under_vec_dot_type():
  for type_id, q in REGISTRY.items():
    assert type_id == q.id
    assert q.vec_dot_type is None or int(q.vec_dot_type) in REGISTRY
  dequantize_only = {"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ3_S", "IQ2_S", "IQ1_M"}
  size_only = {"TQ1_0", "TQ2_0"}
  assert {q.name for q in REGISTRY.values() if q.dequantizable and not q.computable} == dequantize_only
  assert {q.name for q in REGISTRY.values() if q.storable and not q.dequantizable} == size_only
