"""HF checkpoint writing and lazy loading: formats, FP8 block scales, laziness, memory, error messages."""

from __future__ import annotations

import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from dq3jax.io import fp8, hf_names, hf_writer, safetensors_ckpt, safetensors_format
from dq3jax.io.safetensors_format import CheckpointError, ReadLog
from dq3jax.model import random_init


def leaves(params):
  import jax

  return jax.tree_util.tree_leaves_with_path(params)


def assert_params_equal(a, b, **kw):
  la, lb = leaves(a), leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb, strict=True):
    np.testing.assert_allclose(x, y, err_msg=str(path), **kw)


@pytest.fixture(scope="module")
def tiny():
  cfg = random_init.tiny_config()
  return cfg, random_init.init_params(cfg, 0)


@pytest.mark.parametrize("shards", [1, 3])
def test_float32_roundtrip_is_exact(tmp_path, tiny, shards):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params, shards=shards)
  loaded_cfg, loaded = safetensors_ckpt.load(str(tmp_path))
  assert loaded_cfg == cfg
  assert_params_equal(loaded, params, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, np_dtype", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_half_storage_rounds_once(tmp_path, tiny, dtype, np_dtype):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params, dtype=dtype, shards=2)
  _, loaded = safetensors_ckpt.load(str(tmp_path))
  for (path, x), (_, y) in zip(leaves(loaded), leaves(params), strict=True):
    want = y if "router_bias" in str(path) else y.astype(np_dtype).astype(np.float32)
    np.testing.assert_array_equal(x, want, err_msg=str(path))


def test_reads_files_written_by_the_safetensors_package(tmp_path, tiny):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params)
  tensors = hf_names.flatten_hf(params, cfg)
  tensors = {k: (v.astype(np.float16) if v.ndim == 2 else v) for k, v in tensors.items()}
  os.remove(tmp_path / "model.safetensors")
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  _, loaded = safetensors_ckpt.load(str(tmp_path))
  np.testing.assert_array_equal(loaded["lm_head"], tensors["lm_head.weight"].astype(np.float32))
  np.testing.assert_array_equal(
    loaded["layers"][2]["mlp"]["experts"]["w_down"][5],
    tensors["model.layers.2.mlp.experts.5.down_proj.weight"].astype(np.float32),
  )


def test_written_files_readable_by_the_safetensors_package(tmp_path, tiny):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params)
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    np.testing.assert_array_equal(
      f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias"),
      params["layers"][1]["mlp"]["router_bias"],
    )
    assert len(list(f.keys())) == len(hf_names.tensor_specs(cfg))


@pytest.mark.crosscheck
def test_fp8_files_readable_by_safetensors_torch(tmp_path, tiny):
  import torch
  from safetensors.torch import load_file

  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params, fp8=True)
  t = load_file(str(tmp_path / "model.safetensors"))
  q = t["model.layers.0.self_attn.q_a_proj.weight"]
  assert q.dtype == torch.float8_e4m3fn
  ours, _ = fp8.quantize(params["layers"][0]["attn"]["wq_a"])
  np.testing.assert_array_equal(q.view(torch.uint8).numpy(), ours.view(np.uint8))


def dequantize_by_blocks(q, scale):
  """Independent FP8 decode: e4m3 bits decoded by hand, one 128x128 block at a time."""
  bits = q.view(np.uint8).astype(np.int64)
  sign = np.where(bits & 0x80, -1.0, 1.0)
  exp, man = (bits >> 3) & 0xF, bits & 0x7
  value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7)) * sign
  out = np.empty(q.shape, np.float64)
  for i in range(scale.shape[0]):
    for j in range(scale.shape[1]):
      blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
      out[blk] = value[blk] * np.float64(scale[i, j])
  return out


@pytest.mark.parametrize("shape", [(576, 200), (130, 129), (64, 300), (128, 128)])
def test_fp8_block_scales_with_ragged_edges(shape):
  rng = np.random.default_rng(1)
  w = (rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, shape))).astype(np.float32)
  q, scale = fp8.quantize(w)
  assert q.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
  deq = fp8.dequantize(q, scale)
  # The product of an e4m3 value (4 significant bits) and a float32 scale is exact in float32.
  np.testing.assert_array_equal(deq, dequantize_by_blocks(q, scale).astype(np.float32))
  assert np.all(
    np.abs(deq - w)
    <= 2.0**-4 * np.abs(w) + 2.0**-10 * np.repeat(np.repeat(scale, 128, 0), 128, 1)[: shape[0], : shape[1]]
  )
  bf = fp8.dequantize(q, scale, round_bf16=True)
  np.testing.assert_array_equal(bf, deq.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_fp8_sharded_checkpoint_loads_dequantised(tmp_path):
  cfg = random_init.tiny_config(hidden_size=160, q_lora_rank=136)
  params = random_init.init_params(cfg, 2)
  hf_writer.save(str(tmp_path), cfg, params, fp8=True, shards=3)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
  name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
  assert index[name] != index[hf_names.scale_name(name)]  # weight and scale in different shards
  _, loaded = safetensors_ckpt.load(str(tmp_path))
  q, s = fp8.quantize(params["layers"][0]["attn"]["wkv_a"])
  np.testing.assert_array_equal(loaded["layers"][0]["attn"]["wkv_a"], fp8.dequantize(q, s))
  np.testing.assert_array_equal(loaded["lm_head"], params["lm_head"])  # never FP8
  np.testing.assert_array_equal(loaded["layers"][1]["mlp"]["router"], params["layers"][1]["mlp"]["router"])


def test_truncated_load_reads_only_needed_tensors(tmp_path, monkeypatch):
  cfg = random_init.tiny_config(num_hidden_layers=3, n_routed_experts=8)
  params = random_init.init_params(cfg, 3)
  hf_writer.save(str(tmp_path), cfg, params, fp8=True, shards=4)
  # Independent of ReadLog: record every memory map the reader opens, by (file, offset).
  maps = []
  real_memmap = np.memmap

  def recording_memmap(path, *args, **kwargs):
    maps.append((os.path.basename(path), kwargs["offset"]))
    return real_memmap(path, *args, **kwargs)

  monkeypatch.setattr(safetensors_format.np, "memmap", recording_memmap)
  log = ReadLog()
  small_cfg, small = safetensors_ckpt.load(str(tmp_path), layers=2, experts=4, log=log)

  small_ref = random_init.truncate_params(params, cfg, small_cfg)
  expected = set()
  for spec in hf_names.tensor_specs(small_cfg):
    expected.add(spec.hf_name)
    if spec.fp8:
      expected.add(hf_names.scale_name(spec.hf_name))
  assert {name for _, name in log.reads} == expected
  assert len(log.reads) == len(expected)  # each read once
  assert not any(".layers.2." in n or ".experts.4." in n or ".experts.7." in n for _, n in log.reads)
  # The raw maps correspond one-to-one to those tensors' data offsets.
  ckpt = safetensors_ckpt.HFCheckpoint(str(tmp_path))
  want_maps = set()
  for name in expected:
    path, info = ckpt.info(name)
    want_maps.add((os.path.basename(path), info.begin))
  assert set(maps) == want_maps and len(maps) == len(want_maps)
  # Values: the FP8-dequantised slice of the full model.
  _, full = safetensors_ckpt.load(str(tmp_path))
  assert_params_equal(small, random_init.truncate_params(full, cfg, small_cfg), rtol=0, atol=0)
  assert small["layers"][1]["mlp"]["router"].shape == (4, cfg.hidden_size)
  assert small_ref["layers"][1]["mlp"]["router_bias"].shape == small["layers"][1]["mlp"]["router_bias"].shape


@pytest.mark.parametrize("fp8_storage", [False, True], ids=["bf16", "fp8"])
def test_truncated_load_peak_memory_near_kept(tmp_path, fp8_storage):
  cfg = random_init.tiny_config(
    hidden_size=256,
    moe_intermediate_size=256,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    num_hidden_layers=4,
    vocab_size=256,
    q_lora_rank=64,
    kv_lora_rank=64,
  )
  hf_writer.save(
    str(tmp_path), cfg, random_init.init_params(cfg, 4), dtype="bfloat16", shards=3, fp8=fp8_storage
  )
  total = sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  tracemalloc.start()
  try:
    _, small = safetensors_ckpt.load(str(tmp_path), layers=2, experts=4)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  kept = sum(x.nbytes for _, x in leaves(small))
  largest = max(x[0].nbytes if x.ndim == 3 else x.nbytes for _, x in leaves(small))
  assert kept < total  # bf16 on disk, float32 in memory, and still less than the file
  assert peak <= kept + 2 * largest + 1_000_000, (peak, kept, largest)


# ---------------------------------------------------------------- error reporting


@pytest.fixture
def sharded(tmp_path, tiny):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params, shards=3)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  return tmp_path, index


def _rewrite_without(path, name):
  header = safetensors_format.read_header(str(path))
  keep = {
    n: np.array(safetensors_format.read_tensor(str(path), n, i)) for n, i in header.items() if n != name
  }
  safetensors_format.write_file(str(path), keep)


def test_missing_tensor_names_tensor_and_file(sharded):
  root, index = sharded
  name = "model.layers.1.mlp.experts.3.up_proj.weight"
  _rewrite_without(root / index["weight_map"][name], name)
  with pytest.raises(CheckpointError, match=f"{index['weight_map'][name]}.*{name}.*absent"):
    safetensors_ckpt.load(str(root))
  del index["weight_map"][name]
  (root / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=f"model.safetensors.index.json.*{name}.*not found"):
    safetensors_ckpt.load(str(root))


def test_shape_contradicting_config(sharded):
  root, _ = sharded
  hf = json.loads((root / "config.json").read_text())
  hf["moe_intermediate_size"] = 12
  (root / "config.json").write_text(json.dumps(hf))
  with pytest.raises(
    CheckpointError, match=r"model-0000\d-of-00003.safetensors: tensor 'model.layers.1.mlp.*shape"
  ):
    safetensors_ckpt.load(str(root))


def test_truncated_file(sharded):
  root, index = sharded
  shard = index["weight_map"]["lm_head.weight"]
  path = root / shard
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 100])
  with pytest.raises(CheckpointError, match=f"{shard}: tensor '.*'.*truncated"):
    safetensors_ckpt.load(str(root))


@pytest.mark.parametrize("damage", ["header_json", "header_length", "empty"])
def test_corrupt_header(sharded, damage):
  root, index = sharded
  shard = index["weight_map"]["model.norm.weight"]
  path = root / shard
  data = bytearray(path.read_bytes())
  if damage == "header_json":
    data[10:20] = b"\xff" * 10
  elif damage == "header_length":
    data[:8] = (10**12).to_bytes(8, "little")
  else:
    data = b""
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=f"{shard}:.*(corrupt|truncated)"):
    safetensors_ckpt.load(str(root))


def test_index_naming_missing_shard(sharded):
  root, index = sharded
  name = "model.layers.0.self_attn.o_proj.weight"
  index["weight_map"][name] = "model-00009-of-00009.safetensors"
  (root / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(
    CheckpointError, match=f"index.json: tensor '{name}'.*'model-00009-of-00009.safetensors'.*does not exist"
  ):
    safetensors_ckpt.load(str(root))


def test_fp8_without_scale(tmp_path, tiny):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params, fp8=True)
  name = "model.layers.2.mlp.shared_experts.down_proj.weight"
  _rewrite_without(tmp_path / "model.safetensors", hf_names.scale_name(name))
  with pytest.raises(CheckpointError, match=f"model.safetensors: FP8 tensor '{name}' has no"):
    safetensors_ckpt.load(str(tmp_path))


def test_bad_quantization_config(tmp_path, tiny):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params, fp8=True)
  hf = json.loads((tmp_path / "config.json").read_text())
  hf["quantization_config"]["weight_block_size"] = [64, 64]
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(
    CheckpointError, match="config.json: config key 'quantization_config.weight_block_size'"
  ):
    safetensors_ckpt.load(str(tmp_path))


def test_bad_config_names_file_and_key(tmp_path, tiny):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params)
  hf = json.loads((tmp_path / "config.json").read_text())
  hf["scoring_func"] = "softmax"
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(CheckpointError, match="config.json: config key 'scoring_func'"):
    safetensors_ckpt.load(str(tmp_path))


def test_mtp_layer_tensors_are_ignored_and_never_read(tmp_path, tiny):
  cfg, params = tiny
  hf_writer.save(str(tmp_path), cfg, params, fp8=True, shards=2)
  hf = json.loads((tmp_path / "config.json").read_text())
  hf["num_nextn_predict_layers"] = 1
  (tmp_path / "config.json").write_text(json.dumps(hf))
  # An MTP module stored as layer L (= num_hidden_layers), as in DeepSeek's release.
  mtp = f"model.layers.{cfg.num_hidden_layers}"
  shard = tmp_path / "model-00002-of-00002.safetensors"
  header = safetensors_format.read_header(str(shard))
  tensors = {n: np.array(safetensors_format.read_tensor(str(shard), n, i)) for n, i in header.items()}
  tensors[f"{mtp}.eh_proj.weight"] = np.ones((cfg.hidden_size, 2 * cfg.hidden_size), np.float32)
  tensors[f"{mtp}.enorm.weight"] = np.ones(cfg.hidden_size, np.float32)
  safetensors_format.write_file(str(shard), tensors)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  index["weight_map"].update({f"{mtp}.eh_proj.weight": shard.name, f"{mtp}.enorm.weight": shard.name})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  log = ReadLog()
  loaded_cfg, loaded = safetensors_ckpt.load(str(tmp_path), log=log)
  assert loaded_cfg == cfg and len(loaded["layers"]) == cfg.num_hidden_layers
  assert not any(name.startswith(mtp) for _, name in log.reads)


@pytest.mark.crosscheck
def test_loads_checkpoint_saved_by_transformers(tmp_path, tiny):
  # transformers 5 writes `rope_parameters` and its own tensor layout; we must read both back exactly.
  from reference import hf_deepseek

  cfg, params = tiny
  hf_writer.save(str(tmp_path / "ours"), cfg, params)
  hf_deepseek.load_model(str(tmp_path / "ours")).save_pretrained(str(tmp_path / "theirs"))
  hf = json.loads((tmp_path / "theirs" / "config.json").read_text())
  assert "rope_parameters" in hf
  loaded_cfg, loaded = safetensors_ckpt.load(str(tmp_path / "theirs"))
  assert loaded_cfg == cfg
  assert_params_equal(loaded, params, rtol=0, atol=0)
