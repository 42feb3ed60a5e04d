"""A model given by one path: a deepseek2 GGUF file or an HF checkpoint directory.

Which one is decided from the path itself (a directory, or a file's magic), and anything else is refused
with what was found there, since a wrong path otherwise fails deep inside one of the two loaders.
"""

from __future__ import annotations

import os

from dq3jax.io import finite

EXPECTED = "a deepseek2 .gguf file or an HF checkpoint directory (config.json + *.safetensors)"


def is_gguf(path: str | os.PathLike) -> bool:
  """True for a GGUF file, False for a directory (an HF checkpoint: its loader checks the contents); anything
  else raises ValueError describing it."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return False
  if not os.path.exists(path):
    raise ValueError(f"checkpoint {path}: no such file or directory; expected {EXPECTED}")
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint {path}: not a regular file or directory; expected {EXPECTED}")
  from dq3jax.io import gguf_file

  with open(path, "rb") as f:
    head = f.read(8)
  if head[:4] == gguf_file.MAGIC:
    return True
  found = (
    "an empty file"
    if not head
    else f"a {os.path.getsize(path)}-byte file starting with {head!r} (no {gguf_file.MAGIC!r} magic)"
  )
  hint = ""
  if path.endswith((".safetensors", ".json")):
    hint = (
      f"; for an HF checkpoint give the directory that holds it ({os.path.dirname(os.path.abspath(path))})"
    )
  raise ValueError(f"checkpoint {path}: expected {EXPECTED}, found {found}{hint}")


def load(
  path: str | os.PathLike,
  *,
  layers: int | None = None,
  experts: int | None = None,
  progress: bool = False,
  round_fp8_to_bf16: bool = False,
  on_nonfinite: finite.OnNonFinite = None,
):
  """(config, float32 numpy params) of either kind, as gguf_read.load / safetensors_ckpt.load return them.
  round_fp8_to_bf16 concerns FP8 checkpoint weights; a GGUF holds none, so it has no effect there."""
  if is_gguf(path):
    from dq3jax.io import gguf_read

    return gguf_read.load(path, layers=layers, experts=experts, progress=progress, on_nonfinite=on_nonfinite)
  from dq3jax.io import safetensors_ckpt

  return safetensors_ckpt.load(
    os.fspath(path),
    layers=layers,
    experts=experts,
    progress=progress,
    round_fp8_to_bf16=round_fp8_to_bf16,
    on_nonfinite=on_nonfinite,
  )
