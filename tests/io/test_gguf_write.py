"""Streaming tensor jobs: a tensor written piece by piece is the same file as one written at once."""

from __future__ import annotations

import numpy as np
import pytest

import dq3jax
from dq3jax.convert import quantize as convert_quantize
from dq3jax.io import gguf_read
from dq3jax.io.gguf_write import TensorJob, write_gguf
from dq3jax.qtypes import qtype_of

Q4_K = qtype_of("Q4_K")
NE = (512, 12)  # 12 rows of 2 blocks


def _bytes(seed=0):
  x = (np.random.default_rng(seed).standard_normal((NE[1], NE[0])) * 0.02).astype(np.float32)
  return dq3jax.quantize(x, Q4_K)  # [rows, row_bytes]


def _write(path, jobs):
  write_gguf(path, lambda w: None, jobs)
  return path.read_bytes()


def test_pieces_write_the_same_file_as_one_array(tmp_path):
  b = _bytes()
  whole = _write(tmp_path / "a.gguf", [TensorJob(name="t", ne=NE, qtype=Q4_K, produce=lambda: b.reshape(-1))])
  split = [b[:1], b[1:5], b[5:]]  # uneven whole-row pieces
  streamed = _write(tmp_path / "b.gguf", [TensorJob(name="t", ne=NE, qtype=Q4_K, pieces=lambda: iter(split))])
  assert whole == streamed
  assert np.array_equal(gguf_read.read_gguf(tmp_path / "b.gguf").raw("t").reshape(b.shape), b)


@pytest.mark.parametrize(
  "pieces, message",
  [
    (lambda b: [b[:5]], "produced 1440 bytes"),
    (lambda b: [b, b[:1]], "produced at least"),
    (lambda b: [b.reshape(-1)[:100], b.reshape(-1)[100:]], "not whole rows"),
  ],
)
def test_wrong_pieces_name_the_tensor_and_leave_no_file(tmp_path, pieces, message):
  b = _bytes()
  path = tmp_path / "bad.gguf"
  job = TensorJob(name="blk.0.ffn_down.weight", ne=NE, qtype=Q4_K, pieces=lambda: iter(pieces(b)))
  with pytest.raises(ValueError, match=message) as e:
    write_gguf(path, lambda w: None, [job])
  assert "blk.0.ffn_down.weight" in str(e.value)
  assert list(tmp_path.iterdir()) == []


def test_a_whole_array_of_the_wrong_size_names_the_tensor(tmp_path):
  b = _bytes()
  job = TensorJob(name="t", ne=NE, qtype=Q4_K, produce=lambda: b.reshape(-1)[:-7])
  with pytest.raises(ValueError, match=r"tensor t: produced 3449 bytes, Q4_K ne \[512, 12\] needs 3456"):
    write_gguf(tmp_path / "bad.gguf", lambda w: None, [job])
  assert list(tmp_path.iterdir()) == []


def test_a_job_has_exactly_one_source():
  with pytest.raises(TypeError, match="exactly one"):
    TensorJob(name="t", ne=NE, qtype=Q4_K)
  with pytest.raises(TypeError, match="exactly one"):
    TensorJob(name="t", ne=NE, qtype=Q4_K, produce=lambda: None, pieces=lambda: iter(()))


def test_data_assembles_pieces():
  b = _bytes(1)
  job = TensorJob(name="t", ne=NE, qtype=Q4_K, pieces=lambda: iter([b[:7], b[7:]]))
  assert np.array_equal(job.data(), b.reshape(-1))


def test_convert_yields_row_chunks_whose_bytes_do_not_depend_on_the_chunk(monkeypatch):
  """The quantizer's pieces are bounded by CHUNK_ELEMS; smaller chunks give the same bytes in more pieces."""
  x = (np.random.default_rng(2).standard_normal((3, 40, 256)) * 0.02).astype(
    np.float32
  )  # [slices, rows, ne0]

  monkeypatch.setattr(convert_quantize, "slices", lambda source, name, ne: (x[k] for k in range(ne[2])))
  ne = (256, 40, 3)

  def run(chunk):
    monkeypatch.setattr(convert_quantize, "CHUNK_ELEMS", chunk)
    produce = convert_quantize._producer(None, "t", ne, Q4_K, None, None, None)
    return list(produce())

  few, many = run(1 << 22), run(256 * 7)
  assert len(few) == 3 and len(many) == 3 * 6  # one piece per slice; 7-row chunks of 40 rows
  assert max(p.size for p in many) == 7 * Q4_K.row_bytes(256)
  assert np.array_equal(np.concatenate(few), np.concatenate(many))
  assert np.array_equal(np.concatenate(few), dq3jax.quantize(x.reshape(-1, 256), Q4_K).reshape(-1))
