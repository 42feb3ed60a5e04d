"""The curated package faces: every listed name resolves to a documented object of the named module."""

from __future__ import annotations

import importlib
import inspect

import pytest

FACES = ["dq3jax", "dq3jax.model", "dq3jax.io", "dq3jax.recipes"]


@pytest.mark.parametrize("face", FACES)
def test_every_name_of_a_face_resolves_and_is_documented(face):
  mod = importlib.import_module(face)
  undocumented = []
  for name in mod.__all__:
    obj = getattr(mod, name)
    if name.startswith("__") or not (inspect.isclass(obj) or callable(obj)):
      continue
    doc = (inspect.getdoc(obj) or "").strip()
    # A dataclass without a docstring gets its signature as one ("Plan(recipe: ...)"): not documentation.
    if not doc or doc.startswith(f"{getattr(obj, '__name__', name)}("):
      undocumented.append(name)
  assert undocumented == []


@pytest.mark.parametrize("face", ["dq3jax.model", "dq3jax.io"])
def test_an_unknown_name_is_an_attribute_error(face):
  mod = importlib.import_module(face)
  with pytest.raises(AttributeError, match="no attribute 'not_there'"):
    mod.not_there  # noqa: B018


def test_submodules_still_import_through_a_lazy_face():
  from dq3jax.io import gguf_read  # a submodule, not a face name
  from dq3jax.model import runner

  assert gguf_read.load.__module__ == "dq3jax.io.gguf_read"
  assert runner.logits is importlib.import_module("dq3jax.model").logits
