"""llama.cpp importance matrices: both file formats, corrupt files, and which types ggml lets them change."""

import struct

import gguf
import numpy as np
import pytest

from dq3jax.io.imatrix import (
  ImatrixError,
  read_imatrix,
  write_gguf,
  write_imatrix,
  write_legacy,
)
from dq3jax.qtypes import REGISTRY

EXPS = "blk.3.ffn_down_exps.weight"
DENSE = "blk.0.attn_q_a.weight"


def _entries(rng):
  return {
    EXPS: (rng.random((4, 64), dtype=np.float32) * 10, np.array([5, 0, 7, 9])),
    DENSE: (rng.random((1, 32), dtype=np.float32), np.array([12])),
  }


def test_gguf_round_trip(tmp_path):
  ents = _entries(np.random.default_rng(0))
  p = tmp_path / "imatrix.gguf"
  write_gguf(p, ents, datasets=("wiki.train.raw",), chunk_count=3, chunk_size=512)
  im = read_imatrix(p)
  assert im.format == "gguf" and im.datasets == ("wiki.train.raw",)
  assert (im.chunk_count, im.chunk_size) == (3, 512)
  assert im.names() == sorted(ents)
  sums, counts = ents[EXPS]
  w = im.weights(EXPS)
  assert w.shape == (4, 64) and w.dtype == np.float32
  np.testing.assert_array_equal(w[0], sums[0] / np.float32(5))
  np.testing.assert_array_equal(w[1], np.ones(64, np.float32))  # expert without tokens -> 1
  np.testing.assert_array_equal(im.expert_weights(EXPS, 3), sums[3] / np.float32(9))
  np.testing.assert_array_equal(im.entries[EXPS].counts, counts)
  with pytest.raises(IndexError):
    im.expert_weights(EXPS, 4)
  # Writing it back is byte-identical.
  p2 = tmp_path / "again.gguf"
  write_imatrix(im, p2)
  assert p2.read_bytes() == p.read_bytes()


def test_gguf_written_by_us_reads_in_gguf_py(tmp_path):
  ents = _entries(np.random.default_rng(1))
  p = tmp_path / "imatrix.gguf"
  write_gguf(p, ents, datasets=("a", "b"), chunk_count=2)
  r = gguf.GGUFReader(p)
  t = {x.name: x for x in r.tensors}
  assert list(t[EXPS + ".in_sum2"].shape) == [64, 4]  # ggml ne order
  np.testing.assert_array_equal(np.asarray(t[EXPS + ".in_sum2"].data), ents[EXPS][0])
  assert r.fields["general.type"].contents() == "imatrix"
  assert r.fields["imatrix.datasets"].contents() == ["a", "b"]


def test_gguf_written_by_gguf_py_reads_here(tmp_path):
  p = tmp_path / "other.gguf"
  w = gguf.GGUFWriter(p, arch="imatrix")
  w.add_string("general.type", "imatrix")
  w.add_array("imatrix.datasets", ["d"])
  w.add_uint32("imatrix.chunk_count", 2)
  w.add_uint32("imatrix.chunk_size", 256)
  w.add_tensor("t.weight.in_sum2", np.arange(16, dtype=np.float32).reshape(2, 8))
  w.add_tensor("t.weight.counts", np.array([[2.0], [4.0]], np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  im = read_imatrix(p)
  np.testing.assert_array_equal(im.weights("t.weight", ne0=8)[1], np.arange(8, 16, dtype=np.float32) / 4)
  assert im.chunk_size == 256


def test_legacy_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  vals = rng.random(4 * 64, dtype=np.float32)
  p = tmp_path / "imatrix.dat"
  write_legacy(p, {EXPS: (vals, 10), DENSE: (np.ones(32, np.float32), 0)}, chunk_count=10, dataset="x.txt")
  im = read_imatrix(p)
  assert im.format == "legacy" and im.datasets == ("x.txt",) and im.chunk_count == 10
  np.testing.assert_array_equal(im.weights(EXPS).reshape(-1), vals / np.float32(10))
  per_expert = im.weights(EXPS, ne0=64)
  assert per_expert.shape == (4, 64)
  np.testing.assert_array_equal(im.expert_weights(EXPS, 2, ne0=64), vals[128:192] / np.float32(10))
  np.testing.assert_array_equal(im.weights(DENSE), np.ones((1, 32), np.float32))  # ncall 0: unchanged
  with pytest.raises(ValueError, match="multiple"):
    im.weights(EXPS, ne0=100)
  p2 = tmp_path / "again.dat"
  write_imatrix(im, p2)
  assert p2.read_bytes() == p.read_bytes()


def test_legacy_layout_is_llama_cpp(tmp_path):
  # Hand-built per tools/imatrix: n_entries, (len, name, ncall, nval, values)*, chunk count, dataset.
  name = b"output.weight"
  raw = (
    struct.pack("<i", 1)
    + struct.pack("<i", len(name))
    + name
    + struct.pack("<ii", 4, 2)
    + struct.pack("<2f", 8.0, 2.0)
  )
  p = tmp_path / "min.dat"
  p.write_bytes(raw)  # no trailer: optional
  im = read_imatrix(p)
  np.testing.assert_array_equal(im.weights("output.weight"), [[2.0, 0.5]])
  assert im.chunk_count == 0 and im.datasets == ()


def test_gguf_to_legacy_conversion_keeps_weights(tmp_path):
  ents = _entries(np.random.default_rng(3))
  write_gguf(tmp_path / "a.gguf", ents, chunk_count=3, chunk_size=4)
  g = read_imatrix(tmp_path / "a.gguf")
  write_imatrix(g, tmp_path / "a.dat", "legacy")
  d = read_imatrix(tmp_path / "a.dat")
  for name in ents:
    np.testing.assert_allclose(d.weights(name, ne0=g.weights(name).shape[1]), g.weights(name), rtol=1e-6)
  with pytest.raises(ValueError, match="cannot be written as GGUF"):
    write_imatrix(d, tmp_path / "b.gguf", "gguf")


@pytest.mark.parametrize("cut", [0, 2, 7, 20, 30, 40])
def test_truncated_legacy(tmp_path, cut):
  p = tmp_path / "t.dat"
  write_legacy(p, {EXPS: (np.ones(16, np.float32), 1)})
  data = p.read_bytes()
  body = 4 + 4 + len(EXPS) + 8 + 64
  q = tmp_path / "cut.dat"
  q.write_bytes(data[: min(cut, body - 1)])
  with pytest.raises(ImatrixError, match=r"cut\.dat: offset \d+: "):
    read_imatrix(q)


def test_corrupt_legacy(tmp_path):
  p = tmp_path / "c.dat"
  p.write_bytes(struct.pack("<i", 0))
  with pytest.raises(ImatrixError, match="offset 0: no data"):
    read_imatrix(p)
  p.write_bytes(struct.pack("<ii", 1, -5))
  with pytest.raises(ImatrixError, match="offset 4: entry 0: implausible name length"):
    read_imatrix(p)
  p.write_bytes(struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 0))
  with pytest.raises(ImatrixError, match="offset 13: a: value count 0"):
    read_imatrix(p)


def test_truncated_and_corrupt_gguf(tmp_path):
  p = tmp_path / "g.gguf"
  write_gguf(p, _entries(np.random.default_rng(4)), datasets=("d",))
  data = p.read_bytes()
  for cut in (6, 30, 100, 300, len(data) - 1):
    q = tmp_path / "cut.gguf"
    q.write_bytes(data[:cut])
    # The one GGUF header parser's wording: the file, what was cut, and the offset.
    with pytest.raises(ImatrixError, match=r"cut\.gguf: truncated .*offset \d+"):
      read_imatrix(q)
  bad = bytearray(data)
  bad[4:8] = struct.pack("<I", 9)
  (tmp_path / "v.gguf").write_bytes(bytes(bad))
  with pytest.raises(ImatrixError, match=r"v\.gguf: unsupported GGUF version 9 .*at offset 4"):
    read_imatrix(tmp_path / "v.gguf")


def test_gguf_missing_counts(tmp_path):
  p = tmp_path / "m.gguf"
  w = gguf.GGUFWriter(p, arch="imatrix")
  w.add_tensor("t.weight.in_sum2", np.ones((1, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ImatrixError, match="t.weight: has sums but no counts"):
    read_imatrix(p)


@pytest.mark.crosscheck
@pytest.mark.parametrize("t", [q.name for q in REGISTRY.values() if q.storable and q.computable])
def test_type_uses_imatrix_matches_ggml(t):
  # ggml_quantize_chunk with and without column weights: the bytes differ exactly for types that use them.
  from dq3jax.recipes.sizes import type_size
  from reference import ggml_ref

  rng = np.random.default_rng(5)
  nrow, ncol = 8, 512
  x = rng.standard_normal((nrow, ncol)).astype(np.float32)
  w = (rng.random(ncol).astype(np.float32) ** 8) * 100
  outs = [ggml_ref.quantize(x, type_size(t).id, imat).tobytes() for imat in (None, w)]
  assert len(outs[0]) == nrow * type_size(t).row_bytes(ncol)  # the registry's size agrees with ggml
  assert (outs[0] != outs[1]) == type_size(t).uses_imatrix
