"""The golden recomputed with a candidate's expert choices: what the oracle gives after the same near-tie
decisions, so that everything downstream of an explained expert flip is judged at the tight bound.

The golden's GGUF (its manifest entry's `gguf`) is run again by the generator's own function, with the same
emulation and KV cache type, and with the forced experts; unforced positions give the golden's values bit for
bit (same float64 evaluation, same single rounding), forced ones what the model computes with those experts.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping

import numpy as np

from dq3jax.compare.dumps import BadInput, Golden
from dq3jax.compare.routing import RouterSpec


def router_spec(golden: Golden) -> RouterSpec | None:
  config = (golden.entry or {}).get("config")
  if not isinstance(config, Mapping) or "num_experts_per_tok" not in config:
    return None
  return RouterSpec.from_hf_config(config)


def _gguf_path(golden: Golden) -> pathlib.Path | None:
  rel = (golden.entry or {}).get("gguf")
  if not rel or not golden.manifest:
    return None
  path = pathlib.Path(golden.manifest["path"]).parent / rel
  return path if path.is_file() else None


def available(golden: Golden) -> bool:
  return _gguf_path(golden) is not None and "tokens" in golden.dump.tensors


@functools.lru_cache(maxsize=4)
def _verified(path: str, sha256: str | None) -> None:
  from dq3jax.compare.dumps import sha256_of  # noqa: PLC0415

  if sha256 is not None and sha256_of(path) != sha256:
    raise BadInput(f"{path}: sha256 does not match its manifest; cannot recompute the golden from it")


def with_experts(golden: Golden, forced: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
  """The golden's tensors recomputed with forced[layer] [T, K] expert ids (-1: the model's own choice)."""
  from dq3jax import golden_models  # noqa: PLC0415

  path = _gguf_path(golden)
  if path is None:
    raise BadInput(f"{golden.dump.path}: no GGUF to recompute the golden from")
  import json  # noqa: PLC0415

  manifest = json.loads(pathlib.Path(golden.manifest["path"]).read_text())
  rel = golden.entry["gguf"]
  _verified(str(path), manifest.get("files", {}).get(rel, {}).get("sha256"))
  tokens = np.asarray(golden.dump.tensors["tokens"], np.int32)
  return golden_models.recompute_outputs(
    path,
    tokens,
    prefill=int(golden.info["prefill"]),
    emulation=golden.info.get("emulation", "none"),
    kv_cache=golden.info.get("kv_cache", "f32"),
    route_override={int(k): np.asarray(v, np.int32) for k, v in forced.items()},
  )
