"""goldens/: the committed files match their manifest, regenerate identically, and agree with ggml."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from dq3jax import goldens
from reference import ggml_ref

ROOT = pathlib.Path(__file__).resolve().parents[1] / "goldens"
MANIFEST = json.loads((ROOT / "manifest.json").read_text())
KERNEL_FILES = sorted(k for k, v in MANIFEST["files"].items() if v["kind"] == "kernel")


def test_manifest_covers_every_type_and_mode_and_hashes_verify():
  want = {f"{goldens.KERNEL_DIR}/{t}-{m}.safetensors" for t, m in goldens.kernel_params()}
  assert set(KERNEL_FILES) == want
  assert goldens.check(ROOT, regenerate=False) == []
  total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
  assert total < 100 * 2**20  # the budget for goldens/ (issue 10)


@pytest.mark.parametrize(
  "rel",
  ["kernels/Q4_K-imatrix.safetensors", "kernels/Q3_K-ref.safetensors", "kernels/Q4_0-imatrix.safetensors"],
)
def test_regeneration_reproduces_committed_bytes(rel):
  entry = MANIFEST["files"][rel]
  for _ in range(2):  # twice: regeneration is deterministic
    tensors, _ = goldens.kernel_golden(entry["ggml_type"], entry["mode"])
    assert hashlib.sha256(goldens._serialize(tensors)).hexdigest() == entry["sha256"]


@pytest.mark.crosscheck
@pytest.mark.parametrize("rel", KERNEL_FILES)
def test_golden_bytes_and_floats_agree_with_ggml(rel):
  entry = MANIFEST["files"][rel]
  t = load_file(str(ROOT / rel))
  x, q = t["x"], t["quantized"]
  assert np.array_equal(ggml_ref.quantize(x, entry["ggml_type_id"], t.get("imatrix")), q)
  ref = ggml_ref.dequantize(q, entry["ggml_type_id"], x.size).reshape(x.shape)
  assert np.array_equal(ref.view(np.uint32), t["dequantized"].view(np.uint32))


def test_check_names_a_tampered_file(tmp_path):
  copy = tmp_path / "g"
  shutil.copytree(ROOT, copy)
  victim = copy / KERNEL_FILES[0]
  blob = bytearray(victim.read_bytes())
  blob[-1] ^= 1
  victim.write_bytes(bytes(blob))
  problems = goldens.check(copy, regenerate=False)
  assert len(problems) == 1 and str(victim) in problems[0] and "sha256" in problems[0]


def test_failed_regeneration_leaves_previous_goldens_intact(tmp_path, monkeypatch):
  out = tmp_path / "g"
  out.mkdir()
  (out / "manifest.json").write_text("{}")

  def failing_build(progress=True, **_):
    raise RuntimeError("generator failed half way")

  monkeypatch.setattr(goldens, "build", failing_build)
  with pytest.raises(RuntimeError):
    goldens.write(out, progress=False)
  assert (out / "manifest.json").read_text() == "{}"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_failure_while_swapping_in_leaves_previous_goldens_intact(tmp_path, monkeypatch):
  out = tmp_path / "g"
  out.mkdir()
  (out / "manifest.json").write_text("old")
  monkeypatch.setattr(
    goldens, "build", lambda progress=True, **_: ({"kernels/a.safetensors": b"new"}, {"files": {}})
  )

  def failing_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(goldens.os, "replace", failing_replace)
  with pytest.raises(OSError):
    goldens.write(out, progress=False)
  assert (out / "manifest.json").read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
