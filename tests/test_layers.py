"""Layers point down: which dq3jax subpackages each one may import, read from the source's import statements."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dq3jax"

# `dq3jax` itself (the root package) is the public kernel face: quantize/dequantize/qtype_of.
ROOT = "quant"
# Root-level facts every layer may ask: the type registry and the kv_b layouts.
FACTS = {"qtypes", "layouts"}
ALLOWED = {
  "quant": FACTS | {"quant"},  # kernels know no model, no files, no recipes
  "model": FACTS | {"quant", "model"},  # the model knows no files
  "recipes": FACTS | {"recipes"},  # rules over tensor names: no kernels, no model, no files
  # Files sit above the model and the recipes' inventory: a GGUF holds the tensors the inventory lists, in its
  # order (llama-quantize's visiting order). The rules themselves are not the files' business.
  "io": FACTS | {"quant", "model", "io", "recipes.inventory"},
}


def _imports(path: pathlib.Path) -> set[str]:
  """The dq3jax modules `path` imports, as dotted names below dq3jax ("quant.api", "io")."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module]
      if node.module == "dq3jax":
        names = [f"dq3jax.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      continue
    for n in names:
      if n == "dq3jax":
        out.add(ROOT)
      elif n.startswith("dq3jax."):
        out.add(n.removeprefix("dq3jax."))
      elif n.split(".")[0] in ("reference", "tests"):
        out.add("!" + n)
  return out


def _allowed(target: str, allowed: set[str]) -> bool:
  return any(target == a or target.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer):
  bad = []
  for path in sorted((PACKAGE / layer).rglob("*.py")):
    for target in _imports(path):
      if not target.startswith("!") and not _allowed(target, ALLOWED[layer]):
        bad.append(f"{path.relative_to(PACKAGE.parent)} imports dq3jax.{target}")
  assert bad == [], "\n".join(bad)


def test_the_package_never_imports_reference_or_tests():
  bad = [
    f"{p.relative_to(PACKAGE.parent)} imports {t[1:]}"
    for p in sorted(PACKAGE.rglob("*.py"))
    for t in _imports(p)
    if t.startswith("!")
  ]
  assert bad == [], "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
  f = tmp_path / "m.py"
  f.write_text(
    "import dq3jax\nfrom dq3jax.io import gguf_read\nfrom dq3jax import recipes\nimport reference.ggml_ref\n"
  )
  assert _imports(f) == {"quant", "io", "recipes", "!reference.ggml_ref"}
  assert not _allowed("io", ALLOWED["model"]) and _allowed("recipes.inventory", ALLOWED["io"])
  assert not _allowed("recipes.rules", ALLOWED["io"])
