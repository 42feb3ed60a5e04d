"""A missing optional dependency is bad input naming the extra, not an ImportError traceback."""

from __future__ import annotations

import sys

import pytest

from dq3jax import extras


def test_require_imports_what_is_there():
  assert extras.require("json", "anything").dumps([1]) == "[1]"


@pytest.mark.parametrize(
  ("module", "hint"),
  [
    ("matplotlib", "dq3jax[ablate]"),
    ("tokenizers", "dq3jax[ablate]"),
    ("no_such_module_here", "pip install no_such_module_here"),
  ],
)
def test_missing_module_names_what_needs_it_and_how_to_install(module, hint, monkeypatch):
  monkeypatch.setitem(sys.modules, module, None)  # import of a None entry raises ImportError
  with pytest.raises(extras.MissingExtra) as e:
    extras.require(module, "--plot")
  assert str(e.value).startswith(f"--plot needs {module}, which is not installed") and hint in str(e.value)
  assert isinstance(e.value, ValueError)  # the CLI's bad-input class: exit 2, one line
