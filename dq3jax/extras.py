"""Optional dependencies: the `ablate` extra (matplotlib for plots, tokenizers for `--text` and training).

The oracle itself (kernels, model, GGUF, goldens, diff) needs neither; a command that does says which extra
to install instead of failing with an ImportError traceback.
"""

from __future__ import annotations

import importlib
import types

# module -> (extra that provides it, what needs it)
_PROVIDED_BY = {"matplotlib": "ablate", "tokenizers": "ablate"}


class MissingExtra(ValueError):
  """An optional dependency is not installed (reported by the CLI as bad input: exit 2, one line)."""


def require(module: str, what: str) -> types.ModuleType:
  """import `module`, or raise MissingExtra naming `what` needs it and the pip extra that brings it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    extra = _PROVIDED_BY.get(module.split(".")[0])
    how = f"pip install 'dq3jax[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
    raise MissingExtra(f"{what} needs {module}, which is not installed ({how})") from None
