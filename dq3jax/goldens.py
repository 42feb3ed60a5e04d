"""Golden files: seeded inputs, their quantized bytes and dequantized floats, with a manifest.

`dq3jax goldens` regenerates `goldens/` from seeds (atomically: a failed run leaves the previous
goldens intact); `dq3jax goldens --check` verifies every file against the manifest's sha256 and
against a fresh regeneration, and names any file that differs. Two families: kernel goldens (one
safetensors file per type and mode, below) and model goldens (dq3jax/golden_models.py).

Kernel goldens and the model goldens' HF and GGUF files are bit-exact by construction and regenerate
identically on any machine. Model outputs are float32 XLA results: identical on the same CPU model, but a
different CPU may change the last bits (XLA picks vector widths per CPU), so the manifest records the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import zlib

import numpy as np

FORMAT_VERSION = 1
KERNEL_DIR = "kernels"
ROWS_PER_KIND = 4
WIDTH = 512


def _kinds():
  # The same input families the cross-check uses (edge cases included).
  from dq3jax.quant import stress_inputs  # noqa: PLC0415

  return stress_inputs


def kernel_params() -> list[tuple[str, str]]:
  from dq3jax.qtypes import REGISTRY  # noqa: PLC0415

  return [(q.name, m) for q in REGISTRY.values() for m in (("ref", "imatrix") if q.uses_imatrix else ("ref",))]


def seed_of(type_name: str, mode: str) -> int:
  return zlib.crc32(f"golden/{type_name}/{mode}".encode())


def kernel_golden(type_name: str, mode: str) -> tuple[dict[str, np.ndarray], dict]:
  """Tensors of one kernel golden file and its manifest entry (without the hash)."""
  import dq3jax  # noqa: PLC0415

  inputs = _kinds()
  seed = seed_of(type_name, mode)
  rng = np.random.default_rng(seed)
  parts = [inputs.KINDS[k](rng, ROWS_PER_KIND, WIDTH).astype(np.float32) for k in inputs.KINDS]
  x = np.concatenate(parts, axis=0)  # [kinds * ROWS_PER_KIND, WIDTH]
  tensors = {"x": x}
  imatrix = None
  if mode == "imatrix":
    imatrix = inputs.imatrix_for(rng, WIDTH, 2)  # heavy-tailed (log-normal) weights
    imatrix[rng.random(WIDTH) < 0.2] = 0.0  # and zeros
    tensors["imatrix"] = imatrix
  q = dq3jax.qtype_of(type_name)
  data = dq3jax.quantize(x, q, imatrix=imatrix)
  tensors["quantized"] = data
  tensors["dequantized"] = dq3jax.dequantize(data, q, x.shape)
  entry = {
      "kind": "kernel",
      "ggml_type": type_name,
      "ggml_type_id": q.id,
      "mode": mode,
      "seed": seed,
      "input_kinds": list(inputs.KINDS),
      "rows_per_kind": ROWS_PER_KIND,
      "generator": "dq3jax.goldens.kernel_golden",
  }
  return tensors, entry


def _serialize(tensors: dict[str, np.ndarray]) -> bytes:
  from safetensors.numpy import save  # noqa: PLC0415

  return save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _environment() -> dict:
  import gguf  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jaxlib  # noqa: PLC0415

  import dq3jax  # noqa: PLC0415

  return {
      "format_version": FORMAT_VERSION,
      "generator_version": dq3jax.__version__,
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
                   "gguf": getattr(gguf, "__version__", "unknown")},
      "platform": {"machine": platform.machine(), "system": platform.system(), "backend": jax.default_backend(),
                   "cpu": cpu_model()},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def build(progress: bool = True) -> tuple[dict[str, bytes], dict]:
  """All golden files (relative path -> bytes) and the manifest."""
  from tqdm import tqdm  # noqa: PLC0415

  from dq3jax import golden_models  # noqa: PLC0415

  files: dict[str, bytes] = {}
  entries = {}
  for type_name, mode in tqdm(kernel_params(), desc="kernel goldens", disable=not progress):
    tensors, entry = kernel_golden(type_name, mode)
    rel = f"{KERNEL_DIR}/{type_name}-{mode}.safetensors"
    blob = _serialize(tensors)
    files[rel] = blob
    entry["sha256"] = hashlib.sha256(blob).hexdigest()
    entry["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()}
    entries[rel] = entry
  steps = len(golden_models.MODELS) * len(golden_models.RECIPES)
  with tqdm(total=steps, desc="model goldens", disable=not progress) as bar:
    for model in golden_models.MODELS:
      for rel, blob, entry in golden_models.model_goldens(model, progress=lambda _: bar.update()):
        files[rel] = blob
        entries[rel] = entry | {"sha256": hashlib.sha256(blob).hexdigest()}
  manifest = _environment() | {"files": entries}
  return files, manifest


def _manifest_bytes(manifest: dict) -> bytes:
  return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write(out: pathlib.Path, progress: bool = True) -> None:
  """Regenerates `out` atomically: built in a sibling temp dir, then swapped in."""
  files, manifest = build(progress)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".goldens-new-", dir=out.parent))
  old = out.parent / f"{tmp.name.replace('-new-', '-old-')}"
  try:
    for rel, blob in files.items():
      (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
      (tmp / rel).write_bytes(blob)
    (tmp / "manifest.json").write_bytes(_manifest_bytes(manifest))
    # Two renames: the previous goldens move aside, the new ones take their place; if the second
    # rename fails the previous ones are moved back, so `out` is never left half-written.
    had_old = out.exists()
    if had_old:
      os.replace(out, old)
    try:
      os.replace(tmp, out)
    except BaseException:
      if had_old:
        os.rename(old, out)
      raise
    if had_old:
      shutil.rmtree(old)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def check(root: pathlib.Path, regenerate: bool = True, progress: bool = True) -> list[str]:
  """Problems found (empty when the goldens verify): hash mismatches, missing files, regeneration diffs."""
  root = pathlib.Path(root)
  problems = []
  mpath = root / "manifest.json"
  if not mpath.exists():
    return [f"{mpath}: missing"]
  manifest = json.loads(mpath.read_text())
  if manifest.get("format_version") != FORMAT_VERSION:
    problems.append(f"{mpath}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
  for rel, entry in manifest["files"].items():
    p = root / rel
    if not p.exists():
      problems.append(f"{p}: missing")
      continue
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
      problems.append(f"{p}: sha256 {digest} does not match the manifest ({entry['sha256']})")
  if regenerate:
    files, fresh = build(progress)
    for rel, blob in files.items():
      if rel not in manifest["files"]:
        problems.append(f"{root / rel}: produced by the generator but not in the manifest")
      elif hashlib.sha256(blob).hexdigest() != manifest["files"][rel]["sha256"]:
        note = ""
        if manifest["files"][rel].get("kind") == "model-outputs" and manifest.get("platform", {}).get(
          "cpu"
        ) != fresh["platform"]["cpu"]:
          note = (f" (float32 model outputs; generated on {manifest['platform'].get('cpu')!r}, "
                  f"regenerated on {fresh['platform']['cpu']!r})")
        problems.append(f"{root / rel}: differs from a fresh regeneration{note}")
    for rel in manifest["files"]:
      if rel not in files:
        problems.append(f"{root / rel}: in the manifest but no longer generated")
  return problems


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser("goldens", help="regenerate goldens/ from seeds, or verify it (--check)")
  p.add_argument("--dir", default="goldens", help="goldens directory (default: goldens)")
  p.add_argument("--check", action="store_true", help="verify against the manifest and a fresh regeneration")
  p.add_argument("--no-regenerate", action="store_true", help="with --check: hashes only")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=run)
  return p


def run(args) -> int:
  root = pathlib.Path(args.dir)
  if args.check:
    problems = check(root, regenerate=not args.no_regenerate, progress=not args.no_progress)
    for line in problems:
      print(line, file=sys.stderr)
    print(f"{root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
  write(root, progress=not args.no_progress)
  print(f"wrote {root}")
  return 0
