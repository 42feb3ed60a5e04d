"""Golden files: seeded inputs, their quantized bytes and dequantized floats, with a manifest.

`dq3jax goldens` regenerates `goldens/` (atomically: a failed run leaves the previous goldens intact);
`dq3jax goldens --check` verifies every file against the manifest's sha256 and against a fresh
regeneration, and names any file that differs. Two families: kernel goldens (one safetensors file per type
and mode, below) and model goldens (dq3jax/golden_models.py).

Everything is bit-exact by construction and regenerates identically on any machine: kernel goldens and the
model goldens' HF and GGUF files are integer/bit computations, and the model outputs are float64
evaluations rounded once to float32 (their manifest entries list the few points whose rounding another
machine could decide differently, dq3jax.model.undecided). v3-pydoc's weights, tokenizer and training record
are committed inputs: copied from the goldens directory being regenerated, listed with their sha256, never
regenerated here.
"""

from __future__ import annotations

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

from dq3jax.io import sigterm

FORMAT_VERSION = 2
KERNEL_DIR = "kernels"
ROWS_PER_KIND = 4
WIDTH = 512


def _kinds():
  # The same input families the cross-check uses (edge cases included).
  from dq3jax.quant import stress_inputs  # noqa: PLC0415

  return stress_inputs


def kernel_params() -> list[tuple[str, str]]:
  from dq3jax.qtypes import computable  # noqa: PLC0415

  return [(q.name, m) for q in computable() for m in (("ref", "imatrix") if q.uses_imatrix else ("ref",))]


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
  """What the manifest records of the generator: only what the code pins (format, generator version, the
  exactly pinned jax/jaxlib/gguf), so that a regeneration on another machine leaves the manifest unchanged
  too. Where it ran (CPU, XLA flags, numpy) is printed instead (`machine()`), not stored."""
  import gguf  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jaxlib  # noqa: PLC0415

  import dq3jax  # noqa: PLC0415

  return {
    "format_version": FORMAT_VERSION,
    "generator_version": dq3jax.__version__,
    "versions": {
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "gguf": getattr(gguf, "__version__", "unknown"),
    },
  }


def machine() -> str:
  """One line on where the goldens were computed (printed by `dq3jax goldens`, not part of any file)."""
  import jax  # noqa: PLC0415

  flags = os.environ.get("XLA_FLAGS", "")
  return f"{platform.machine()} {cpu_model()}, backend {jax.default_backend()}, numpy {np.__version__}" + (
    f", XLA_FLAGS={flags}" if flags else ""
  )


def _kernel_files(params: list[tuple[str, str]]) -> tuple[list[tuple[str, bytes, dict]], list[str]]:
  out = []
  for type_name, mode in params:
    tensors, entry = kernel_golden(type_name, mode)
    entry["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()}
    out.append((f"{KERNEL_DIR}/{type_name}-{mode}.safetensors", _serialize(tensors), entry))
  return out, []


def _model_files(model: str, root) -> tuple[list[tuple[str, bytes, dict]], list[str]]:
  from dq3jax import golden_models  # noqa: PLC0415

  notes: list[str] = []
  files = list(golden_models.model_goldens(model, progress=lambda m: m and notes.append(m), root=root))
  return files, notes


def _task(kind: str, arg, root):
  """One unit of work (run in a worker process when jobs > 1): (files, notes)."""
  return _kernel_files(arg) if kind == "kernels" else _model_files(arg, root)


def _tasks() -> list[tuple[str, object]]:
  """The work, longest first (v3-pydoc: quantizing and compiling; the k-quant kernel searches), kernels in
  two interleaved halves so that two workers finish together."""
  from dq3jax import golden_models  # noqa: PLC0415

  kp = kernel_params()
  models = [("model", m) for m in golden_models.MODELS]
  return models[:1] + [("kernels", kp[0::2]), ("kernels", kp[1::2])] + models[1:]


def build(
  progress: bool = True, root: str | pathlib.Path | None = None, jobs: int = 2
) -> tuple[dict[str, bytes], dict]:
  """All golden files (relative path -> bytes) and the manifest; v3-pydoc's committed inputs are read from
  `root` (default: the repository's goldens/). jobs: worker processes (the work is mostly single-threaded
  XLA compilation, so two workers on two cores take about half the time); 1 runs everything here. The
  files do not depend on it (each is computed the same way wherever it runs)."""
  from tqdm import tqdm  # noqa: PLC0415

  tasks = _tasks()
  results: dict[int, tuple[list, list]] = {}
  with tqdm(total=len(tasks), desc="goldens", disable=not progress) as bar:

    def done(k, res):
      results[k] = res
      for note in res[1]:
        (tqdm.write if progress else print)(note, file=sys.stderr)
      bar.update()

    if jobs <= 1:
      for k, (kind, arg) in enumerate(tasks):
        done(k, _task(kind, arg, root))
    else:
      import concurrent.futures  # noqa: PLC0415
      import multiprocessing  # noqa: PLC0415

      # spawn: fresh interpreters (a forked JAX runtime is not safe to use).
      ctx = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_task, kind, arg, root): k for k, (kind, arg) in enumerate(tasks)}
        for f in concurrent.futures.as_completed(futures):
          done(futures[f], f.result())
  files: dict[str, bytes] = {}
  entries = {}
  order = sorted(range(len(tasks)), key=lambda k: tasks[k][0] != "kernels")  # kernels first, as before
  for k in order:
    for rel, blob, entry in results[k][0]:
      files[rel] = blob
      entries[rel] = entry | {"sha256": hashlib.sha256(blob).hexdigest()}
  manifest = _environment() | {"files": entries, "undecided": undecided_summary(entries)}
  return files, manifest


def undecided_summary(entries: dict) -> dict:
  """Totals of the model outputs' undecided points (dq3jax.model.undecided) and the files that have any."""
  internal = output = 0
  where = {}
  for rel, e in entries.items():
    u = e.get("undecided")
    if u and (u["internal_count"] or u["output_count"]):
      internal, output = internal + u["internal_count"], output + u["output_count"]
      where[rel] = {"internal": u["internal_count"], "outputs": u["output_count"]}
  return {"internal": internal, "outputs": output, "files": where}


def _manifest_bytes(manifest: dict) -> bytes:
  return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def write(out: pathlib.Path, progress: bool = True, jobs: int = 2) -> None:
  """Regenerates `out` atomically: built in a sibling temp dir, then swapped in."""
  out = pathlib.Path(out)
  files, manifest = build(progress, root=out, jobs=jobs)
  _note_changed_inputs(out, manifest)
  out.parent.mkdir(parents=True, exist_ok=True)
  with sigterm.as_exception():  # SIGTERM, like Ctrl-C, reaches the cleanup below
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".goldens-new-", dir=out.parent))
    old = out.parent / f"{tmp.name.replace('-new-', '-old-')}"
    swapped = False
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
      swapped = True
      if had_old:
        shutil.rmtree(old)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
      if swapped and old.exists():  # replaced goldens whose removal an interruption cut short
        shutil.rmtree(old, ignore_errors=True)


def _note_changed_inputs(out: pathlib.Path, manifest: dict) -> None:
  """Says which committed inputs differ from the ones the previous manifest listed (new training outputs)."""
  try:
    old = json.loads((out / "manifest.json").read_text())["files"]
  except (OSError, ValueError, KeyError):
    return
  for rel, e in manifest["files"].items():
    inputs = e["kind"] in ("model-hf-trained", "model-train")
    if inputs and rel in old and old[rel].get("sha256") != e["sha256"]:
      print(f"{out / rel}: committed input changed since the previous goldens (sha256 {e['sha256'][:12]})")


def check(root: pathlib.Path, regenerate: bool = True, progress: bool = True, jobs: int = 2) -> list[str]:
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
    files, _ = build(progress, root=root, jobs=jobs)
    for rel, blob in files.items():
      if rel not in manifest["files"]:
        problems.append(f"{root / rel}: produced by the generator but not in the manifest")
      elif hashlib.sha256(blob).hexdigest() != manifest["files"][rel]["sha256"]:
        problems.append(f"{root / rel}: differs from a fresh regeneration")
    for rel in manifest["files"]:
      if rel not in files:
        problems.append(f"{root / rel}: in the manifest but no longer generated")
  return problems
