"""Bad input: every defect is reported with the file, the tensor or key, and the byte offset (GGUF), or the
imatrix file and tensor (imatrix for another model); nothing is written when the input is bad."""

from __future__ import annotations

import dataclasses
import os
import re
import struct

import numpy as np
import pytest

from dq3jax.convert.quantize import get_recipe, make_jobs, plan_for, quantize_to_gguf
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import gguf_layout, gguf_meta, gguf_read
from dq3jax.io.gguf_read import GGUFError
from dq3jax.io.gguf_write import write_gguf
from dq3jax.io.imatrix import read_imatrix
from dq3jax.io.imatrix import write_gguf as write_imatrix
from dq3jax.model.random_init import init_params, tiny_config


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  cfg = tiny_config(vocab_size=96)
  params = init_params(cfg, 1)
  path = tmp_path_factory.mktemp("good") / "good.gguf"
  quantize_to_gguf(ParamsSource(params, cfg), path, "F32")
  return cfg, params, path, path.read_bytes()


def _variant(tmp_path, data: bytes, name="bad.gguf"):
  p = tmp_path / name
  p.write_bytes(data)
  return str(p)


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
  assert len(old) == len(new) and data.count(old) >= 1
  return data.replace(old, new, 1)


def test_wrong_magic(good, tmp_path):
  p = _variant(tmp_path, b"GGUX" + good[3][4:])
  with pytest.raises(GGUFError, match=re.escape(f"{p}: not a GGUF file: magic b'GGUX' at offset 0")):
    gguf_read.load(p)


def test_empty_and_tiny_files(tmp_path):
  for data in (b"", b"GG"):
    p = _variant(tmp_path, data)
    with pytest.raises(GGUFError, match=re.escape(p)):
      gguf_read.read_gguf(p)


def test_unsupported_version(good, tmp_path):
  p = _variant(tmp_path, good[3][:4] + struct.pack("<I", 7) + good[3][8:])
  with pytest.raises(GGUFError, match=r"unsupported GGUF version 7 .*at offset 4"):
    gguf_read.read_gguf(p)


def test_truncated_data_names_tensor_and_offsets(good, tmp_path):
  data = good[3]
  f = gguf_read.read_gguf(good[2])
  last = max(f.tensors.values(), key=lambda t: t.offset)
  p = _variant(tmp_path, data[: last.offset + 3])
  with pytest.raises(GGUFError) as e:
    gguf_read.load(p)
  msg = str(e.value)
  assert (
    p in msg and f"tensor {last.name!r}" in msg and f"[{last.offset}, {last.offset + last.nbytes})" in msg
  )
  assert f"file ends at offset {last.offset + 3}" in msg


def test_truncated_header(good, tmp_path):
  p = _variant(tmp_path, good[3][:200])
  with pytest.raises(GGUFError, match=re.escape(p) + r": truncated file: .* at offset \d+"):
    gguf_read.read_gguf(p)


def _type_field(f, name) -> int:
  t = f.tensors[name]
  return t.info_offset + 8 + len(name.encode()) + 4 + 8 * len(t.ne)


def test_unknown_tensor_type(good, tmp_path):
  f = gguf_read.read_gguf(good[2])
  at = _type_field(f, "output_norm.weight")
  data = bytearray(good[3])
  data[at : at + 4] = struct.pack("<I", 99)
  p = _variant(tmp_path, bytes(data))
  with pytest.raises(
    GGUFError, match=re.escape(f"{p}: tensor 'output_norm.weight' has unknown ggml type id 99 at offset {at}")
  ):
    gguf_read.read_gguf(p)


def test_type_outside_the_registry(good, tmp_path):
  # F64 is a ggml type gguf-py knows, but the registry states no block geometry for it (no DeepSeek file holds
  # one), so the data's extent is unknown: the header parser refuses it (no fall back to gguf-py's table).
  f = gguf_read.read_gguf(good[2])
  at = _type_field(f, "output_norm.weight")
  data = bytearray(good[3])
  data[at : at + 4] = struct.pack("<I", 28)
  p = _variant(tmp_path, bytes(data))
  with pytest.raises(
    GGUFError,
    match=re.escape(
      f"{p}: tensor 'output_norm.weight' has ggml type F64 (id 28), which dq3jax's type registry does not "
      f"know at offset {at}"
    ),
  ):
    gguf_read.read_gguf(p)


def test_type_dq3jax_cannot_dequantize(tmp_path):
  # TQ1_0 is a real ggml type (ternary): the registry knows its size, so the header parses, not its kernels.
  from dq3jax.io.gguf_write import TensorJob  # noqa: PLC0415
  from dq3jax.qtypes import qtype_of  # noqa: PLC0415

  p = tmp_path / "tq.gguf"
  job = TensorJob(name="t", ne=(256, 2), qtype=qtype_of("TQ1_0"), produce=lambda: np.zeros(2 * 54, np.uint8))
  write_gguf(p, lambda w: None, [job], arch="test")
  f = gguf_read.read_gguf(p)
  info = f.tensors["t"].info_offset
  with pytest.raises(
    GGUFError, match=re.escape(f"'t' (header entry at offset {info}) has type TQ1_0 (id 34)")
  ):
    f.array("t")


def test_missing_tensor(good, tmp_path):
  p = _variant(tmp_path, _replace_once(good[3], b"blk.2.ffn_up_exps.weight", b"blk.2.ffn_up_exps.weighX"))
  with pytest.raises(
    GGUFError, match=re.escape(f"{p}: required tensor 'blk.2.ffn_up_exps.weight' is missing")
  ):
    gguf_read.load(p)


@pytest.mark.parametrize(
  "key", ["deepseek2.expert_count", "deepseek2.attention.kv_lora_rank", "general.architecture"]
)
def test_missing_metadata_key(good, tmp_path, key):
  p = _variant(tmp_path, _replace_once(good[3], key.encode(), key[:-1].encode() + b"_"))
  with pytest.raises(
    gguf_meta.GGUFMetadataError, match=re.escape(f"{p}: required metadata key {key!r} is missing")
  ):
    gguf_read.load(p)


def test_missing_gating_func_is_refused_unless_v3_defaults(good, tmp_path):
  p = _variant(
    tmp_path, _replace_once(good[3], b"deepseek2.expert_gating_func", b"deepseek2.expert_gating_fun_")
  )
  with pytest.raises(gguf_meta.GGUFMetadataError, match="softmax"):
    gguf_read.load(p)
  cfg, _ = gguf_read.load(p, v3_defaults=True)
  assert cfg == good[0]


def test_tensor_shape_contradicting_metadata(good, tmp_path):
  cfg, params, _, _ = good
  other = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size * 2)
  jobs = make_jobs(ParamsSource(params, cfg), plan_for(cfg, get_recipe("F32"), "current", "split"))
  p = tmp_path / "bad.gguf"
  write_gguf(p, lambda w: gguf_meta.metadata(w, other, "split"), jobs)
  with pytest.raises(
    GGUFError,
    match=r"tensor 'blk.0.ffn_down.weight' \(header entry at offset \d+\) has ne \[48, 32\], the metadata implies \[96, 32\]",
  ):
    gguf_read.load(p)


def _imatrix(tmp_path, ents, name="imatrix.gguf"):
  path = tmp_path / name
  write_imatrix(path, ents, datasets=("x",), chunk_count=1, chunk_size=4)
  return read_imatrix(path)


def test_imatrix_for_another_model_size_mismatch(good, tmp_path):
  cfg, params, _, _ = good
  ones = lambda n, k=1: (np.ones((k, n), np.float32), np.full(k, 4))  # noqa: E731
  # Right name, wrong width (as from a model with another hidden size).
  im = _imatrix(tmp_path, {"blk.0.attn_q_a.weight": ones(64), "blk.1.ffn_up_exps.weight": ones(32, 8)})
  out = tmp_path / "out.gguf"
  with pytest.raises(
    ValueError, match=re.escape(str(im.path)) + r".*blk\.0\.attn_q_a\.weight.*another model"
  ):
    quantize_to_gguf(ParamsSource(params, cfg), out, "Q4_K_M", imatrix=im)
  assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_imatrix_with_no_matching_tensor(good, tmp_path):
  cfg, params, _, _ = good
  im = _imatrix(
    tmp_path, {"model.layers.0.mlp.gate_proj.weight": (np.ones((1, 32), np.float32), np.full(1, 4))}
  )
  with pytest.raises(ValueError, match=r"none of its 1 entries .* names a tensor of this deepseek2 model"):
    quantize_to_gguf(ParamsSource(params, cfg), tmp_path / "out.gguf", "Q4_K_M", imatrix=im)


def test_q2_k_s_without_imatrix_is_refused_before_writing(tmp_path):
  from tests.io.gguf_llama_ref import (
    mini_config,  # rows of 256: Q2_K_S gives real Q2_K tensors, which need an imatrix
  )

  cfg = mini_config()
  params = init_params(cfg, 0)
  out = tmp_path / "out.gguf"
  with pytest.raises(ValueError, match="needs an importance matrix"):
    quantize_to_gguf(ParamsSource(params, cfg), out, "Q2_K_S")
  assert os.listdir(tmp_path) == []


def test_legacy_fallback_to_iq4_nl_is_written_as_ggml_quantizes_it(good, tmp_path):
  cfg, params, _, _ = good
  # Legacy rules send Q3_K targets with rows not a multiple of 256 to IQ4_NL; each such tensor's bytes are
  # what live ggml makes of the same float32 rows.
  from reference import ggml_ref  # noqa: PLC0415

  out = tmp_path / "out.gguf"
  res = quantize_to_gguf(ParamsSource(params, cfg), out, "Q3_K_M", rules="legacy")
  fell = [t for t in res.tensors if t.type == "IQ4_NL"]
  assert fell and {t.fallback_from for t in fell} <= {"Q3_K", "Q2_K"}
  f = gguf_read.read_gguf(out)
  for t in fell:
    m = gguf_layout.mapping(t.name)
    assert m.kind in (gguf_layout.Kind.LEAF, gguf_layout.Kind.EXPERTS), t.name
    node = params
    for key in m.path:
      node = node[int(key)] if key.isdigit() else node[key]
    rows = np.asarray(node, np.float32).reshape(-1, t.ne[0])
    want = ggml_ref.quantize(rows, 20).reshape(-1)
    got = f.raw(t.name)
    assert got.size == want.size and np.array_equal(got, want), t.name


def test_imatrix_token_embd_of_wrong_size_is_ignored_like_llama_quantize(good, tmp_path):
  cfg, params, _, _ = good
  im = _imatrix(
    tmp_path, {"token_embd.weight": (np.ones((1, 2 * cfg.hidden_size), np.float32), np.full(1, 4))}
  )
  a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
  quantize_to_gguf(ParamsSource(params, cfg), a, "Q4_K_M")
  res = quantize_to_gguf(ParamsSource(params, cfg), b, "Q4_K_M", imatrix=im)
  assert not any(t.imatrix for t in res.tensors)
  assert a.read_bytes() == b.read_bytes()
