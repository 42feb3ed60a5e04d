"""Reading goldens and engine dumps into name -> numpy array, with every defect reported as `BadInput`.

A dump is whatever an engine wrote: .npz, .safetensors, .npy (one array), a GGUF file, or a raw little-endian
float32 file (.bin, .f32, .raw: one array, e.g. logits written with fwrite). The format is recognised from the
file's magic bytes, the extension only breaks ties (a raw dump has no magic). Golden files are found in their
manifest (goldens/manifest.json, searched upwards from the file) and checked against its sha256 first; their
kind (kernel, model-outputs, model-gguf) comes from the manifest, else from the file's content (`open_golden`).
Candidate tensors are paired with the golden's by name and checked for shape and dtype (`match`).

Every message names the file, and the tensor where there is one, so an engine developer can act on it without
a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pathlib
import re
import struct
import zipfile
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

from dq3jax.io import gguf_read, safetensors_format

RAW_EXTENSIONS = (".bin", ".f32", ".raw")
_FLOATS = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64))


class BadInput(ValueError):
  """A file cannot be compared: unreadable, truncated, wrong names/shapes/dtypes, hash mismatch, unknown type."""


@dataclasses.dataclass(frozen=True)
class Dump:
  path: str
  format: str  # "npz", "safetensors", "npy", "raw", "gguf"
  tensors: Mapping[str, np.ndarray]  # empty for GGUF (its tensors are read on demand from `gguf`)
  metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)  # safetensors __metadata__
  gguf: gguf_read.GGUFFile | None = None


def sniff(path: str | os.PathLike) -> str:
  """The dump format of a file, from its first bytes (then its extension)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise BadInput(f"{path}: no such file")
  if os.path.isdir(path):
    raise BadInput(f"{path}: is a directory, not a golden or dump file")
  with open(path, "rb") as f:
    head = f.read(16)
  ext = os.path.splitext(path)[1].lower()
  if not head:
    raise BadInput(f"{path}: empty file")
  if head[:4] == gguf_read.MAGIC:
    return "gguf"
  if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
    return "npz"
  if head[:6] == b"\x93NUMPY":
    return "npy"
  if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1:
    return "safetensors"
  # No recognisable magic: a truncated/corrupt file of a known format, or a raw dump.
  by_ext = {".npz": "npz", ".npy": "npy", ".safetensors": "safetensors", ".gguf": "gguf"}
  if ext in by_ext:
    raise BadInput(f"{path}: corrupt {ext} file (its first bytes {head[:8]!r} are not the {ext} signature)")
  if ext in RAW_EXTENSIONS:
    return "raw"
  raise BadInput(
    f"{path}: unknown file type: not GGUF, safetensors, .npz or .npy (no known signature in the first bytes "
    f"{head[:8]!r}), and not a raw float32 dump ({', '.join(RAW_EXTENSIONS)})"
  )


def _load_npz(path: str) -> dict[str, np.ndarray]:
  try:
    z = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise BadInput(f"{path}: not a readable .npz archive, truncated or corrupt ({e})") from None
  out = {}
  with z:
    for name in z.files:
      try:
        out[name] = z[name]
      except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise BadInput(f"{path}: tensor {name!r} cannot be read, truncated or corrupt ({e})") from None
  return out


def _load_npy(path: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise BadInput(f"{path}: not a readable .npy array, truncated or corrupt ({e})") from None


def _safetensors_metadata(path: str) -> dict[str, str]:
  # The header was already validated by read_header; this only picks up __metadata__.
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    meta = json.loads(f.read(n)).get("__metadata__") or {}
  if not isinstance(meta, dict):
    raise BadInput(f"{path}: safetensors __metadata__ is not a JSON object")
  return {str(k): str(v) for k, v in meta.items()}


def _load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  try:
    header = safetensors_format.read_header(path)
  except safetensors_format.CheckpointError as e:
    raise BadInput(str(e)) from None
  tensors = {name: safetensors_format.read_tensor(path, name, info) for name, info in header.items()}
  return tensors, _safetensors_metadata(path)


def _load_raw(path: str, raw: tuple[str, tuple[int, ...]] | None) -> dict[str, np.ndarray]:
  if raw is None:
    raise BadInput(f"{path}: a raw float32 dump can only stand for logits or dequantized values")
  name, shape = raw
  want = int(np.prod(shape)) * 4
  size = os.path.getsize(path)
  if size != want:
    raise BadInput(
      f"{path}: raw float32 dump of {size} bytes; {name!r} {list(shape)} needs {want} bytes "
      f"({'truncated?' if size < want else 'too long'})"
    )
  return {name: np.fromfile(path, dtype="<f4").reshape(shape)}


def load(
  path: str | os.PathLike,
  *,
  single_name: Callable[[np.ndarray], str] | None = None,
  raw: tuple[str, tuple[int, ...]] | None = None,
) -> Dump:
  """Read a golden or a dump. single_name names the array of a .npy file; raw = (name, shape) of a raw dump."""
  path = os.fspath(path)
  fmt = sniff(path)
  if fmt == "gguf":
    try:
      return Dump(path=path, format=fmt, tensors={}, gguf=gguf_read.read_gguf(path))
    except gguf_read.GGUFError as e:
      raise BadInput(str(e)) from None
  if fmt == "npz":
    arrays = _load_npz(path)
    # `meta.NAME` string arrays carry the engine's settings (reference/llama_cpp_run.py writes meta.llama_cpp).
    meta = {
      n.removeprefix("meta."): str(a)
      for n, a in arrays.items()
      if n.startswith("meta.") and a.dtype.kind == "U"
    }
    tensors = {n: a for n, a in arrays.items() if not (n.startswith("meta.") and a.dtype.kind == "U")}
    return Dump(path=path, format=fmt, tensors=tensors, metadata=meta)
  if fmt == "safetensors":
    tensors, meta = _load_safetensors(path)
    return Dump(path=path, format=fmt, tensors=tensors, metadata=meta)
  if fmt == "npy":
    a = _load_npy(path)
    if single_name is None:
      raise BadInput(f"{path}: a single .npy array cannot be a golden file")
    return Dump(path=path, format=fmt, tensors={single_name(a): a})
  return Dump(path=path, format=fmt, tensors=_load_raw(path, raw))


# -------------------------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  manifest: str  # path of manifest.json
  relpath: str  # the golden's key in manifest["files"]
  entry: Mapping  # that entry: sha256, kind, tensors, kind-specific fields


def find_manifest_entry(path: str | os.PathLike) -> ManifestEntry | None:
  """The manifest entry of a golden file: the nearest manifest.json above it that lists it, else None."""
  p = pathlib.Path(path).resolve()
  for d in p.parents:
    m = d / "manifest.json"
    if not m.is_file():
      continue
    try:
      manifest = json.loads(m.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise BadInput(f"{m}: corrupt manifest ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    rel = p.relative_to(d).as_posix()
    if isinstance(files, dict) and rel in files:
      entry = files[rel]
      if not isinstance(entry, dict) or "sha256" not in entry:
        raise BadInput(f"{m}: entry {rel!r} has no sha256")
      return ManifestEntry(manifest=str(m), relpath=rel, entry=entry)
  return None


def sha256_of(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def verify_sha256(path: str | os.PathLike, hit: ManifestEntry) -> str:
  """The file's sha256, which must be the manifest's (else BadInput naming both files)."""
  digest = sha256_of(path)
  if digest != hit.entry["sha256"]:
    raise BadInput(
      f"{os.fspath(path)}: sha256 {digest} does not match {hit.manifest} ({hit.entry['sha256']} for "
      f"{hit.relpath!r}): the golden file was modified or damaged; restore or regenerate it"
    )
  return digest


# --------------------------------------------------------------------------------- matching to a golden


class Expect(enum.Enum):
  """What dtype a candidate tensor must have, given the golden tensor it is compared with."""

  BYTES = "uint8"  # ggml block bytes
  FLOAT32 = "float32"  # exact float32 results (kernel dequantization, inputs)
  FLOAT = "a float dtype"  # model values: float16, bfloat16, float32 or float64, read as float32
  INT = "an integer dtype"  # token and expert ids


@dataclasses.dataclass(frozen=True)
class Matched:
  tensors: Mapping[str, np.ndarray]  # candidate tensors with golden names, in golden shape, normalised dtype
  unknown: tuple[str, ...]  # candidate names the golden does not have
  not_supplied: tuple[str, ...]  # golden names the candidate does not have
  notes: Mapping[str, str]  # per tensor: what was normalised (batch axis dropped, dtype converted)


def _normalise(cand: Dump, name: str, a: np.ndarray, expect: Expect) -> tuple[np.ndarray, str | None]:
  def bad(why: str) -> BadInput:
    return BadInput(f"{cand.path}: tensor {name!r} has dtype {a.dtype}; {why}")

  if expect is Expect.BYTES:
    if a.dtype != np.uint8:
      raise bad("ggml block bytes must be uint8")
    return a, None
  if expect is Expect.FLOAT32:
    if a.dtype != np.float32:
      raise bad("bit-exact float32 values must be float32 (a conversion would change them)")
    return a, None
  if expect is Expect.FLOAT:
    if a.dtype not in _FLOATS:
      raise bad(f"expected one of {', '.join(str(d) for d in _FLOATS)}")
    if a.dtype == np.float32:
      return a, None
    return a.astype(np.float32), f"{a.dtype} read as float32"
  if a.dtype.kind not in "iu":
    raise bad("expected integer ids")
  return a.astype(np.int64), None


def match(cand: Dump, golden: Dump, expect: Callable[[str], Expect]) -> Matched:
  """Candidate tensors paired with the golden's by name, checked for shape and dtype.

  A leading batch axis of size 1 (as `runner.logits` and `dq3jax logits` produce) is dropped. At least one
  name must be shared; a shape or dtype that does not fit is BadInput.
  """
  tensors, notes, unknown = {}, {}, []
  for name, a in cand.tensors.items():
    if name not in golden.tensors:
      unknown.append(name)
      continue
    g = golden.tensors[name]
    a = np.asarray(a)
    note = []
    if a.ndim == g.ndim + 1 and a.shape[0] == 1 and a.shape[1:] == g.shape:
      a = a[0]
      note.append("batch axis of 1 dropped")
    if a.shape != g.shape:
      raise BadInput(
        f"{cand.path}: tensor {name!r} has shape {list(a.shape)}; the golden {golden.path} has "
        f"{list(g.shape)} ({g.dtype})"
      )
    a, conv = _normalise(cand, name, a, expect(name))
    if conv:
      note.append(conv)
    tensors[name] = a
    if note:
      notes[name] = "; ".join(note)
  if not tensors:
    raise BadInput(
      f"{cand.path}: no tensor to compare: it has {sorted(cand.tensors) or 'no tensors'}, the golden "
      f"{golden.path} has {sorted(golden.tensors)}"
    )
  missing = tuple(n for n in golden.tensors if n not in tensors)
  return Matched(tensors=tensors, unknown=tuple(unknown), not_supplied=missing, notes=notes)


# ---------------------------------------------------------------------------------------------- goldens


class GoldenKind(enum.StrEnum):
  KERNEL = "kernel"
  MODEL_OUTPUTS = "model-outputs"
  MODEL_GGUF = "model-gguf"


_KERNEL_NAME = re.compile(r"^([A-Z0-9_]+)-(ref|imatrix)$")


@dataclasses.dataclass(frozen=True)
class Golden:
  dump: Dump
  kind: GoldenKind
  info: Mapping  # what it is: ggml type and mode, or model, recipe, prefill, emulation, kv_cache
  manifest: Mapping | None  # {"path", "relpath", "sha256"} when verified against a manifest
  entry: Mapping | None = None  # its manifest entry (config, gguf, ...) when listed in one


def _kernel_qtype(path: str, entry: Mapping | None, meta: Mapping):
  from dq3jax.qtypes import qtype_of  # noqa: PLC0415

  stem = os.path.basename(path).removesuffix(".safetensors")
  m = _KERNEL_NAME.match(stem)
  for key in ("ggml_type_id", "ggml_type"):
    for source in (entry or {}, meta):
      if key in source:
        try:
          return qtype_of(int(source[key]) if key == "ggml_type_id" else source[key]), source.get("mode")
        except (KeyError, ValueError) as e:
          raise BadInput(f"{path}: unknown ggml type {source[key]!r} ({e})") from None
  if m:
    try:
      return qtype_of(m.group(1)), m.group(2)
    except (KeyError, ValueError):
      pass
  raise BadInput(
    f"{path}: cannot tell the ggml type of this kernel golden (no manifest entry, no TYPE-mode name)"
  )


def open_golden(path: str | os.PathLike) -> Golden:
  """Read and identify a golden file, verifying it against its manifest first when it is listed in one."""
  path = os.fspath(path)
  hit = find_manifest_entry(path) if os.path.isfile(path) else None
  manifest = None
  kind = None
  if hit is not None:
    manifest = {"path": hit.manifest, "relpath": hit.relpath, "sha256": verify_sha256(path, hit)}
    kind = hit.entry.get("kind")
    if kind == "model-hf":
      raise BadInput(
        f"{path}: is a model's weights (kind model-hf in {hit.manifest}); diff compares outputs: use "
        "goldens/models/M/outputs/R.safetensors, or a golden GGUF goldens/models/M/gguf/R.gguf"
      )
    if kind not in {k.value for k in GoldenKind}:
      raise BadInput(f"{path}: manifest {hit.manifest} gives kind {kind!r}, which diff does not know")
  dump = load(path)
  if dump.format not in ("gguf", "safetensors"):
    raise BadInput(f"{path}: a golden is a safetensors or GGUF file, this is {dump.format}")
  if kind is None:
    if dump.format == "gguf":
      kind = GoldenKind.MODEL_GGUF
    elif dump.metadata.get("kind") in (GoldenKind.KERNEL, GoldenKind.MODEL_OUTPUTS):
      kind = dump.metadata["kind"]
    elif {"quantized", "dequantized"} <= set(dump.tensors):
      kind = GoldenKind.KERNEL
    elif "logits" in dump.tensors:
      kind = GoldenKind.MODEL_OUTPUTS
    else:
      raise BadInput(
        f"{path}: not a golden file diff knows (tensors {sorted(dump.tensors)}, no manifest entry)"
      )
  kind = GoldenKind(kind)
  if (kind is GoldenKind.MODEL_GGUF) != (dump.format == "gguf"):
    raise BadInput(f"{path}: the manifest says {kind}, but the file is {dump.format}")
  entry = hit.entry if hit else None
  info: dict = {}
  if kind is GoldenKind.KERNEL:
    q, mode = _kernel_qtype(path, entry, dump.metadata)
    info = {
      "ggml_type": q.name,
      "ggml_type_id": q.id,
      "mode": mode,
      "block_elems": q.block_elems,
      "block_bytes": q.block_bytes,
    }
    for name in ("quantized", "dequantized"):
      if name not in dump.tensors:
        raise BadInput(f"{path}: kernel golden without a {name!r} tensor")
    qd, dq = dump.tensors["quantized"], dump.tensors["dequantized"]
    if dq.ndim != 2 or qd.shape != (dq.shape[0], dq.shape[1] // q.block_elems * q.block_bytes):
      raise BadInput(
        f"{path}: quantized {list(qd.shape)} does not hold {q.name} rows of dequantized {list(dq.shape)}"
      )
  elif kind is GoldenKind.MODEL_OUTPUTS:
    if "logits" not in dump.tensors:
      raise BadInput(f"{path}: model-outputs golden without a 'logits' tensor")
    keys = ("model", "recipe", "prefill", "emulation", "kv_cache")
    info = {k: dump.metadata[k] for k in keys if k in dump.metadata}
    if entry:
      info |= {k: entry[k] for k in (*keys, "gguf") if k in entry and k not in info}
  else:
    info = {k: entry[k] for k in ("model", "recipe", "rules", "layout") if entry and k in entry}
  return Golden(dump=dump, kind=kind, info=info, manifest=manifest, entry=entry)


def open_candidate(path: str | os.PathLike, golden: Golden) -> Dump:
  path = os.fspath(path)
  fmt = sniff(path)
  if golden.kind is GoldenKind.MODEL_GGUF:
    if fmt != "gguf":
      raise BadInput(
        f"{path}: the golden {golden.dump.path} is a GGUF file, so the candidate must be one ({fmt})"
      )
    return load(path)
  if fmt == "gguf":
    raise BadInput(
      f"{path}: a GGUF candidate needs a golden GGUF (goldens/models/M/gguf/R.gguf); the golden "
      f"{golden.dump.path} is a {golden.kind} golden"
    )
  t = golden.dump.tensors
  if golden.kind is GoldenKind.KERNEL:
    return load(
      path,
      single_name=lambda a: "quantized" if a.dtype == np.uint8 else "dequantized",
      raw=("dequantized", t["dequantized"].shape),
    )
  return load(path, single_name=lambda a: "logits", raw=("logits", t["logits"].shape))
