"""NaN / Inf weights are refused by both loaders, naming the file, the tensor, the first bad element (or the
quantized block it is in) and its byte offset; with on_nonfinite they are reported and loaded as they are."""

from __future__ import annotations

import re
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

import dq3jax
from dq3jax.convert.quantize import quantize_to_gguf
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import finite, gguf_read, hf_writer, safetensors_ckpt
from dq3jax.io.finite import NonFiniteError
from dq3jax.io.gguf_write import TensorJob, write_gguf
from dq3jax.io.safetensors_format import read_header
from dq3jax.model.random_init import init_params, tiny_config

CFG = tiny_config()
F16_INF, F16_NINF, F16_NAN = 0x7C00, 0xFC00, 0x7E00


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, 3)


def _copy(params):
  return jax.tree_util.tree_map(np.array, params)


def _error(fn, *a, **k) -> NonFiniteError:
  with pytest.raises(NonFiniteError) as e:
    fn(*a, **k)
  return e.value


def _patch(path, offset: int, data: bytes) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def _read(path, offset: int, n: int) -> bytes:
  with open(path, "rb") as f:
    f.seek(offset)
    return f.read(n)


# ------------------------------------------------------------------------------------------------ scan


def test_scan_finds_first_and_counts_across_chunks(monkeypatch):
  monkeypatch.setattr(finite, "_CHUNK", 7)  # several chunks, the bad values in different ones
  a = np.zeros((5, 6), np.float32)
  assert finite.scan(a) is None
  a[4, 5], a[2, 1], a[3, 0] = np.inf, np.nan, -np.inf
  got = finite.scan(a)
  assert (got.count, got.flat, got.index, np.isnan(got.value)) == (3, 13, (2, 1), True)
  assert got.element() == "element [2, 1] (flat 13) = nan"


# ------------------------------------------------------------------------------------------------ safetensors


def test_hf_float32_nan_names_shard_tensor_element_and_offset(params, tmp_path):
  p = _copy(params)
  p["layers"][1]["attn"]["wq_b"][5, 7] = np.nan
  p["layers"][1]["attn"]["wq_b"][9, 0] = np.inf
  hf_writer.save(str(tmp_path), CFG, p)
  shard = str(tmp_path / "model.safetensors")
  name = "model.layers.1.self_attn.q_b_proj.weight"
  info = read_header(shard)[name]
  flat = 5 * CFG.q_lora_rank + 7
  offset = info.begin + 4 * flat
  e = _error(safetensors_ckpt.load, str(tmp_path))
  assert str(e) == (
    f"{shard}: tensor {name!r} (F32, shape {list(info.shape)}): 2 non-finite value(s); the first is element "
    f"[5, 7] (flat {flat}) = nan, at byte offset {offset}"
  )
  assert (e.path, e.tensor, e.finding.index) == (shard, name, (5, 7))
  assert np.isnan(np.frombuffer(_read(shard, offset, 4), np.float32)[0])

  seen = []
  _, loaded = safetensors_ckpt.load(str(tmp_path), on_nonfinite=seen.append)
  assert [x.tensor for x in seen] == [name]
  np.testing.assert_array_equal(loaded["layers"][1]["attn"]["wq_b"], p["layers"][1]["attn"]["wq_b"])


def test_hf_bf16_routed_expert_inf_in_a_shard_and_truncation(params, tmp_path):
  p = _copy(params)
  p["layers"][1]["mlp"]["experts"]["w_up"][6, 3, 4] = -np.inf
  hf_writer.save(str(tmp_path), CFG, p, dtype="bfloat16", shards=2)
  name = "model.layers.1.mlp.experts.6.up_proj.weight"
  e = _error(safetensors_ckpt.load, str(tmp_path))
  info = read_header(e.path)[name]
  flat = 3 * CFG.hidden_size + 4
  offset = info.begin + 2 * flat
  assert e.path.startswith(str(tmp_path / "model-0000")) and e.tensor == name
  assert str(e) == (
    f"{e.path}: tensor {name!r} (BF16, shape [16, 32]): 1 non-finite value(s); the first is element [3, 4] "
    f"(flat {flat}) = -inf, at byte offset {offset}"
  )
  assert np.frombuffer(_read(e.path, offset, 2), ml_dtypes.bfloat16)[0] == -np.inf
  safetensors_ckpt.load(str(tmp_path), experts=4)  # expert 6 is not loaded: nothing to refuse


def test_hf_fp8_nan_element_and_inf_block_scale(params, tmp_path):
  hf_writer.save(str(tmp_path), CFG, params, fp8=True)
  shard = str(tmp_path / "model.safetensors")
  header = read_header(shard)
  w = "model.layers.0.self_attn.q_a_proj.weight"
  flat = 2 * CFG.hidden_size + 9
  _patch(shard, header[w].begin + flat, b"\x7f")  # e4m3fn NaN
  e = _error(safetensors_ckpt.load, str(tmp_path))
  assert str(e) == (
    f"{shard}: tensor {w!r} (F8_E4M3, shape [24, 32]): 1 non-finite value(s) after FP8 dequantization; the "
    f"first is element [2, 9] (flat {flat}) = nan, at byte offset {header[w].begin + flat}"
  )
  _patch(shard, header[w].begin + flat, b"\x00")

  w = "model.layers.2.self_attn.o_proj.weight"
  scale = w + "_scale_inv"
  _patch(shard, header[scale].begin, struct.pack("<f", np.inf))  # the only block: scales all of w
  q0 = np.float32(np.frombuffer(_read(shard, header[w].begin, 1), ml_dtypes.float8_e4m3fn)[0])
  with np.errstate(invalid="ignore"):
    v0 = float(np.float32(np.inf) * q0)  # inf * 0 is nan
  e = _error(safetensors_ckpt.load, str(tmp_path))
  assert str(e) == (
    f"{shard}: tensor {w!r} (F8_E4M3, shape [32, 32]): 1024 non-finite value(s) after FP8 dequantization; "
    f"the first is element [0, 0] (flat 0) = {v0}, whose stored FP8 value is finite, so the cause is its "
    f"block scale {scale!r} [0, 0] = inf in {shard} (byte offset {header[scale].begin})"
  )


# ------------------------------------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def ggufs(params, tmp_path_factory):
  root = tmp_path_factory.mktemp("gguf")
  out = {}
  for recipe in ("F32", "F16", "Q8_0"):
    out[recipe] = root / f"{recipe}.gguf"
    quantize_to_gguf(ParamsSource(params, CFG), out[recipe], recipe)
  return out


def _variant(src, tmp_path, name: str, at, data: bytes):
  """A copy of GGUF `src` with `data` written at byte `at` of tensor `name`'s data: (path, tensor entry)."""
  dst = tmp_path / "bad.gguf"
  dst.write_bytes(src.read_bytes())
  t = gguf_read.read_gguf(dst).tensors[name]
  _patch(dst, t.offset + at, data)
  return str(dst), t


def test_gguf_f32_nan_in_an_expert_and_truncation(ggufs, tmp_path):
  name = "blk.1.ffn_up_exps.weight"  # torch shape [8, 16, 32]
  flat = (5 * 16 + 3) * 32 + 4
  path, t = _variant(ggufs["F32"], tmp_path, name, 4 * flat, struct.pack("<f", np.nan))
  e = _error(gguf_read.load, path)
  assert str(e) == (
    f"{path}: tensor {name!r} (F32, ne [32, 16, 8]): 1 non-finite value(s); the first is element [5, 3, 4] "
    f"(flat {flat}) = nan, at byte offset {t.offset + 4 * flat}"
  )
  gguf_read.load(path, experts=4)  # the first 4 experts are read: finite


def test_gguf_f16_negative_inf(ggufs, tmp_path):
  name = "blk.2.attn_q_a.weight"  # torch shape [24, 32]
  flat = 7 * 32 + 31
  path, t = _variant(ggufs["F16"], tmp_path, name, 2 * flat, struct.pack("<H", F16_NINF))
  assert t.type_name == "F16"
  e = _error(gguf_read.load, path)
  assert str(e) == (
    f"{path}: tensor {name!r} (F16, ne [32, 24]): 1 non-finite value(s); the first is element [7, 31] "
    f"(flat {flat}) = -inf, at byte offset {t.offset + 2 * flat}"
  )


def test_gguf_q8_0_inf_block_scale_names_block_and_bytes(ggufs, tmp_path):
  name = "blk.1.ffn_up_exps.weight"  # Q8_0, one 32-element block per row
  block = 5 * 16 + 3
  path, t = _variant(ggufs["Q8_0"], tmp_path, name, 34 * block, struct.pack("<H", F16_INF))
  assert t.type_name == "Q8_0"
  start = t.offset + 34 * block
  qs = np.frombuffer(_read(path, start + 2, 32), np.int8)
  with np.errstate(invalid="ignore"):
    first = float(np.float32(np.inf) * np.float32(qs[0]))
  e = _error(gguf_read.load, path)
  assert str(e) == (
    f"{path}: tensor {name!r} (Q8_0, ne [32, 16, 8]): 32 non-finite value(s) after dequantization; the "
    f"first, element [5, 3, 0] (flat {32 * block}) = {first}, is in block {block} (bytes [{start}, "
    f"{start + 34}) of the file): its quants are integers, so an fp16 scale of that block (d, dmin) is Inf "
    "or NaN"
  )
  seen = []
  _, loaded = gguf_read.load(path, on_nonfinite=seen.append)
  assert [x.tensor for x in seen] == [name]
  assert not np.isfinite(loaded["layers"][1]["mlp"]["experts"]["w_up"][5, 3]).any()
  gguf_read.load(path, experts=4)


# Where each type keeps its fp16 scales (ggml's block structs); every other byte holds integer quants.
SCALES = {
  "Q4_0": (0,),
  "Q4_1": (0, 2),
  "Q5_0": (0,),
  "Q5_1": (0, 2),
  "Q8_0": (0,),
  "Q2_K": (80, 82),
  "Q3_K": (108,),
  "Q4_K": (0, 2),
  "Q5_K": (0, 2),
  "Q6_K": (208,),
}
CASES = [(ty, at, bits) for ty, ats in SCALES.items() for at in ats for bits in (F16_INF, F16_NAN)]


@pytest.mark.parametrize("ty, at, bits", CASES, ids=[f"{t}@{a}-{b:#x}" for t, a, b in CASES])
def test_every_quantized_type_bad_scale_is_found_in_its_block(tmp_path, ty, at, bits):
  q = dq3jax.qtype_of(ty)
  rows, per_row, bad = 2, 4, 6
  rng = np.random.default_rng(at + bits)
  blocks = rng.integers(0, 256, (rows * per_row, q.block_bytes), dtype=np.uint8)
  for s in SCALES[ty]:  # random quants, finite scales
    blocks[:, s : s + 2] = np.frombuffer(struct.pack("<H", 0x3400), np.uint8)  # 0.25
  good = blocks.copy()
  blocks[bad, at : at + 2] = np.frombuffer(struct.pack("<H", bits), np.uint8)
  ne = (per_row * q.block_elems, rows)
  jobs = [
    TensorJob(name="good", ne=ne, qtype=q, produce=lambda: good.reshape(-1)),
    TensorJob(name="bad", ne=ne, qtype=q, produce=lambda: blocks.reshape(-1)),
  ]
  path = tmp_path / "q.gguf"
  write_gguf(path, lambda w: None, jobs)
  f = gguf_read.read_gguf(path)
  assert f.check_finite("good", f.array("good")) is None
  a = f.array("bad")
  e = f.check_finite("bad", a)
  first = int(np.flatnonzero(~np.isfinite(a))[0])
  assert first // q.block_elems == bad and e.finding.flat == first
  assert not np.isfinite(a.reshape(-1, q.block_elems)[bad]).all()
  assert np.isfinite(np.delete(a.reshape(-1, q.block_elems), bad, axis=0)).all()
  start = f.tensors["bad"].offset + bad * q.block_bytes
  assert re.search(rf"is in block {bad} \(bytes \[{start}, {start + q.block_bytes}\) of the file\)", str(e))
  assert str(e).startswith(f"{path}: tensor 'bad' ({ty}, ne {list(ne)}): ")
