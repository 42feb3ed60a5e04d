"""GGUF files holding the dequantize-only i-quants, made by llama.cpp itself, read, run and diffed by dq3jax.

A seeded mini DeepSeek-V3 (every row a multiple of 256 except attn_k_b's 32) is written as an F32 GGUF, and
llama.cpp's llama_model_quantize turns it into i-quant files with an importance matrix (llama.cpp requires
one for its IQ1 and IQ2 ftypes; every file gets it), so the files hold what published DeepSeek i-quant GGUFs hold: the
ftype's i-quant for most weights, with llama.cpp's own choices (k-quants, IQ4_NL fallbacks, ...) elsewhere.
On each file:

- the header holds the ftype's i-quant, and over all files every dequantize-only type of the registry appears;
- every array `gguf_read.load` returns is, bit for bit, live ggml's `to_float` of the stored bytes (a split
  file's attn_k_b / attn_v_b are compared against the matching parts of the joined wkv_b);
- `dq3jax logits FILE.gguf` exits 0 and writes `runner.logits` of the loaded params;
- `dq3jax diff FILE FILE` passes (exit 0), and one flipped bit in an i-quant tensor fails it (exit 1) naming
  that tensor and block.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dq3jax import cli
from dq3jax.convert.quantize import quantize_to_gguf
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import gguf_layout, gguf_read
from dq3jax.io.gguf_layout import Kind
from dq3jax.io.imatrix import read_imatrix, write_gguf
from dq3jax.model import runner
from dq3jax.model.random_init import init_params
from dq3jax.qtypes import REGISTRY, qtype_of
from reference import llama_quantize as llama_quantize_ref
from tests.io.gguf_llama_ref import mini_config
from tests.quant.compare import float_bits_report

pytestmark = pytest.mark.crosscheck

SEED = 3
# llama_ftype ids (llama.h) and the i-quant each ftype gives most weights. IQ3_M and IQ2_M are the ftypes
# built on IQ3_S and IQ2_S.
FTYPES = {
  "IQ2_XXS": (19, "IQ2_XXS"),
  "IQ3_XXS": (23, "IQ3_XXS"),
  "IQ1_S": (24, "IQ1_S"),
  "IQ2_XS": (20, "IQ2_XS"),
  "IQ3_M": (27, "IQ3_S"),
  "IQ2_M": (29, "IQ2_S"),
  "IQ1_M": (31, "IQ1_M"),
}
DEQUANT_ONLY = {q.name for q in REGISTRY.values() if q.storable and q.dequantizable and not q.computable}


def _llama_quantize(src, dst, ftype: int, imatrix: dict[str, np.ndarray]) -> None:
  """llama.cpp's llama_model_quantize with an llama_ftype id and an imatrix {name: flat float32}."""
  rc = llama_quantize_ref.quantize(src, dst, ftype, imatrix=imatrix)
  assert rc == 0, f"llama_model_quantize failed ({rc})"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """The F32 GGUF and a GGUF imatrix with random column weights for every matrix (per expert for 3-D)."""
  cfg = mini_config()
  d = tmp_path_factory.mktemp("iq")
  f32 = d / "f32.gguf"
  quantize_to_gguf(ParamsSource(init_params(cfg, SEED), cfg), f32, "F32", layout="split")
  rng = np.random.default_rng(SEED)
  ents = {}
  for name, t in gguf_read.read_gguf(f32).tensors.items():
    if len(t.ne) >= 2:
      n_mat = t.ne[2] if len(t.ne) > 2 else 1
      ents[name] = ((rng.random((n_mat, t.ne[0])) ** 4 * 20).astype(np.float32), np.full(n_mat, 9))
  write_gguf(d / "imatrix.gguf", ents, datasets=("random",), chunk_count=1, chunk_size=9)
  im = read_imatrix(d / "imatrix.gguf")
  return d, f32, {n: im.weights(n).reshape(-1) for n in im.entries}


@pytest.fixture(scope="module")
def files(source):
  """ftype -> path of llama.cpp's file, quantized on first use."""
  d, f32, imatrix = source
  made = {}

  def get(ftype: str):
    if ftype not in made:
      made[ftype] = d / f"{ftype}.gguf"
      _llama_quantize(f32, made[ftype], FTYPES[ftype][0], imatrix)
    return made[ftype]

  return get


def _types(path) -> dict[str, str]:
  return {n: t.type_name for n, t in gguf_read.read_gguf(path).tensors.items()}


@pytest.mark.parametrize("ftype", FTYPES)
def test_llama_cpp_files_hold_the_ftypes_iquant(files, ftype):
  main = FTYPES[ftype][1]
  weights = {n: t for n, t in gguf_read.read_gguf(files(ftype)).tensors.items() if len(t.ne) >= 2}
  types = {n: t.type_name for n, t in weights.items()}
  # Measured (llama.cpp 0c1e570): the ftype's type holds 17-19 of the 24 matrices, 85-92 % of the weights;
  # the rest are llama.cpp's promotions (output, token_embd, attn_output) and attn_k_b's IQ4_NL fallback.
  assert all(types[n] == main for n in weights if "_exps" in n), types
  elems = {n: int(np.prod(t.ne)) for n, t in weights.items()}
  share = sum(e for n, e in elems.items() if types[n] == main) / sum(elems.values())
  assert share > 0.8, f"{ftype}: {main} holds {share:.1%} of the weights: {types}"


def test_the_files_cover_every_dequantize_only_type(files):
  held = {t for ftype in FTYPES for t in _types(files(ftype)).values()}
  assert DEQUANT_ONLY == {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"}
  assert DEQUANT_ONLY <= held, sorted(DEQUANT_ONLY - held)


def _leaf(params: dict, path: tuple[str, ...]):
  node = params
  for k in path:
    node = node[int(k)] if k.isdigit() else node[k]
  return node


def _leaf_paths(node, prefix=()):
  if isinstance(node, dict):
    return [p for k, v in node.items() for p in _leaf_paths(v, (*prefix, k))]
  if isinstance(node, list):
    return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*prefix, str(i)))]
  return [prefix]


@pytest.mark.parametrize("ftype", FTYPES)
def test_loaded_weights_are_ggmls_dequantization_of_the_stored_bytes(files, ftype):
  from reference import ggml_ref

  path = files(ftype)
  cfg, params = gguf_read.load(path)
  f = gguf_read.read_gguf(path)
  covered = set()
  for name, t in f.tensors.items():
    m = gguf_layout.mapping(name)
    ours = _leaf(params, m.path)
    if m.kind in (Kind.K_B, Kind.V_B):  # load joined the pair into wkv_b; split it back (a transpose)
      ours = gguf_layout.split_kv_b(ours, cfg)[0 if m.kind is Kind.K_B else 1]
    n = int(np.prod(t.ne))
    theirs = ggml_ref.dequantize(np.asarray(f.raw(name)), t.type_id, n)
    assert ours.shape == t.torch_shape, (name, ours.shape, t.torch_shape)
    msg = float_bits_report(ours.reshape(-1), theirs, REGISTRY[t.type_id].block_elems, f"{ftype}: {name}")
    assert msg is None, f"{msg} ({t.type_name})"
    covered.add(m.path)
  assert covered == {tuple(p) for p in _leaf_paths(params)}  # every loaded array was compared


@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ3_XXS", "IQ1_S"])
def test_logits_command_runs_the_file(files, ftype, tmp_path):
  path = files(ftype)
  tokens = np.random.default_rng(SEED).integers(0, 256, (1, 8))
  np.save(tmp_path / "tokens.npy", tokens)
  out = tmp_path / "logits.npy"
  argv = ["logits", str(path), "--tokens", str(tmp_path / "tokens.npy"), "--out", str(out), "--no-progress"]
  assert cli.main(argv) == 0
  cfg, params = gguf_read.load(path)
  want = runner.logits(params, tokens, cfg)
  got = np.load(out)
  assert got.shape == (1, 8, cfg.vocab_size) and np.isfinite(got).all()
  assert np.array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32))
  assert not np.array_equal(got, runner.logits(init_params(mini_config(), SEED), tokens, cfg))  # quantized


@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ3_XXS", "IQ1_S"])
def test_diff_of_the_file_against_itself_passes_and_a_flipped_bit_fails(files, ftype, tmp_path):
  path = files(ftype)
  assert cli.main(["diff", str(path), str(path)]) == 0
  f = gguf_read.read_gguf(path)
  name, t = next((n, t) for n, t in f.tensors.items() if t.type_name in DEQUANT_ONLY)
  q = qtype_of(t.type_id)
  row_bytes = q.row_bytes(t.ne[0])
  cand = tmp_path / "cand.gguf"
  shutil.copyfile(path, cand)
  with open(cand, "r+b") as fh:  # row 1, block 0, byte 5 of the block, bit 3
    fh.seek(t.offset + row_bytes + 5)
    b = fh.read(1)[0]
    fh.seek(t.offset + row_bytes + 5)
    fh.write(bytes([b ^ 0x08]))
  report = tmp_path / "report.json"
  assert cli.main(["diff", str(path), str(cand), "--report", str(report)]) == 1
  rows = {r["name"]: r for r in json.loads(report.read_text())["rows"]}
  bad = [n for n, r in rows.items() if r["status"] != "PASS"]
  assert bad == [name]
  first = rows[name]["metrics"]["first"]
  assert (first["row"], first["block"]) == (1, 0) and first["bytes"][0]["bits"] == [3]


def test_writing_a_type_without_a_quantizer_is_refused_before_any_output(tmp_path):
  # dq3jax reads IQ2_XXS but cannot write it yet: the converter says so, naming the tensor, before it creates
  # the output file (rows here are 256 wide, so no shape fallback hides the type).
  cfg = mini_config()
  out = tmp_path / "iq2.gguf"
  with pytest.raises(ValueError, match=r"blk\.\d+\.\S+ .*IQ2_XXS.*which dq3jax cannot quantize"):
    quantize_to_gguf(ParamsSource(init_params(cfg, SEED), cfg), out, "IQ2_XXS", layout="split")
  assert list(tmp_path.iterdir()) == []
