"""Each planted bug (reference/planted_bugs.py) edits exactly what it claims: checked here independently of the
module's own Edit offsets, through gguf-py's parse of the source and the copy (field values, tensor arrays) and
a byte diff of the two files, whose differing bytes must all lie inside the claimed key or tensor."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from gguf import GGUFReader

from reference import planted_bugs as B

MODELS = pathlib.Path(__file__).resolve().parents[2] / "goldens" / "models"
TINY_F32 = MODELS / "v3-tiny" / "gguf" / "F32.gguf"
TINY_Q4 = MODELS / "v3-tiny" / "gguf" / "Q4_K_M.gguf"  # no k-quant tensor: every width < 256
MINI_Q4 = MODELS / "v3-pydoc" / "gguf" / "Q4_K_M.gguf"  # every row a multiple of 256: k-quant tensors
ARCH = "deepseek2"


def _value(r, key):
  f = r.fields[key]
  return f.parts[f.data[0]][0].item()


def _ranges(r, keys=(), tensors=()):
  """File byte ranges of metadata values and tensor data, as gguf-py locates them."""
  base = r.data.ctypes.data
  out = []
  for k in keys:
    p = r.fields[k].parts[r.fields[k].data[0]]
    out.append((p.ctypes.data - base, p.nbytes))
  by = {t.name: t for t in r.tensors}
  for n in tensors:
    t = by[n]
    out.append((t.data.ctypes.data - base, int(t.n_bytes)))
  return out


def _changed_only_inside(src, dst, ranges):
  a, b = np.fromfile(src, np.uint8), np.fromfile(dst, np.uint8)
  assert a.size == b.size
  diff = np.flatnonzero(a != b)
  assert diff.size, "the copy is identical to the source"
  inside = np.zeros(a.size, bool)
  for off, n in ranges:
    inside[off : off + n] = True
  assert inside[diff].all(), f"bytes changed outside the claimed ranges: {diff[~inside[diff]][:10]}"
  return diff


def _apply(name, src, tmp_path):
  dst = tmp_path / f"{name}.gguf"
  edits = B.apply(name, src, dst)
  return GGUFReader(str(src)), GGUFReader(str(dst)), dst, edits


def _tensor(r, name):
  return next(t for t in r.tensors if t.name == name)


def _same_except(rs, rd, keys=(), tensors=()):
  """Every other field value and tensor is identical (as gguf-py reads them)."""
  for k, f in rs.fields.items():
    if k not in keys:
      g = rd.fields[k]
      assert all(np.array_equal(x, y) for x, y in zip(f.parts, g.parts, strict=True)), k
  for t in rs.tensors:
    if t.name not in tensors:
      assert np.array_equal(np.asarray(t.data), np.asarray(_tensor(rd, t.name).data)), t.name


METADATA = {
  # bug: (key, expected new value from the old one)
  "gating_softmax": ("expert_gating_func", lambda v: 1),
  "routed_scale_x2.5": ("expert_weights_scale", lambda v: np.float32(v) * np.float32(2.5)),
  "routed_scale_+5pct": ("expert_weights_scale", lambda v: np.float32(v) * np.float32(1.05)),
  "topk_norm_off": ("expert_weights_norm", lambda v: False),
  "group_limit_ignored": ("expert_group_count", lambda v: 1),
  "yarn_mscale_on_rope": ("rope.scaling.yarn_log_multiplier", lambda v: 0.0),
  "rope_base_+10pct": ("rope.freq_base", lambda v: np.float32(v) * np.float32(1.1)),
}


@pytest.mark.parametrize("src", [TINY_F32, MINI_Q4], ids=["tiny-F32", "pydoc-Q4_K_M"])
@pytest.mark.parametrize("bug", sorted(METADATA))
def test_metadata_bug_changes_one_value(bug, src, tmp_path):
  key, fn = METADATA[bug]
  key = f"{ARCH}.{key}"
  rs, rd, dst, _ = _apply(bug, src, tmp_path)
  old, new = _value(rs, key), _value(rd, key)
  assert new == pytest.approx(float(fn(old)), rel=0, abs=0) and new != old
  assert rd.fields[key].types == rs.fields[key].types
  _changed_only_inside(src, dst, _ranges(rs, keys=[key]))
  _same_except(rs, rd, keys=[key])


def test_group_limit_is_a_real_change():
  # llama.cpp asserts expert_group_used_count < expert_group_count; declaring one group is the way to switch
  # group-limited routing off, and the goldens do use group limiting.
  r = GGUFReader(str(TINY_F32))
  assert _value(r, f"{ARCH}.expert_group_count") == 4 and _value(r, f"{ARCH}.expert_group_used_count") == 2


def test_selection_bias_zeroed(tmp_path):
  rs, rd, dst, _ = _apply("selection_bias_ignored", TINY_F32, tmp_path)
  names = [t.name for t in rs.tensors if t.name.endswith("exp_probs_b.bias")]
  assert len(names) == 3
  for n in names:
    assert np.asarray(_tensor(rs, n).data).any() and not np.asarray(_tensor(rd, n).data).any()
  _changed_only_inside(TINY_F32, dst, _ranges(rs, tensors=names))
  _same_except(rs, rd, tensors=names)


@pytest.mark.parametrize("src", [TINY_F32, MINI_Q4], ids=["tiny-F32", "pydoc-Q4_K_M"])
def test_yarn_mscale_missing_scales_q_a_norm(src, tmp_path):
  rs, rd, dst, _ = _apply("yarn_mscale_missing", src, tmp_path)
  m = 1 + _value(rs, f"{ARCH}.rope.scaling.yarn_log_multiplier") * math.log(
    _value(rs, f"{ARCH}.rope.scaling.factor")
  )
  c = np.float32(1 / (m * m))
  names = [t.name for t in rs.tensors if t.name.endswith("attn_q_a_norm.weight")]
  assert len(names) == _value(rs, f"{ARCH}.block_count")
  for n in names:
    np.testing.assert_array_equal(np.asarray(_tensor(rd, n).data), np.asarray(_tensor(rs, n).data) * c)
  _changed_only_inside(src, dst, _ranges(rs, tensors=names))
  _same_except(rs, rd, tensors=names)


def _rows(t):
  """gguf-py's array of a tensor as [rows, row bytes or elements] (its last axis is ne0)."""
  a = np.asarray(t.data)
  return a.reshape(-1, a.shape[-1])


@pytest.mark.parametrize("src", [TINY_F32, MINI_Q4], ids=["tiny-F32", "pydoc-Q4_K_M"])
def test_rope_pairing_neox_permutes_rotary_rows_only(src, tmp_path):
  rs, rd, dst, _ = _apply("rope_pairing_neox", src, tmp_path)
  n_rot = _value(rs, f"{ARCH}.rope.dimension_count")
  k_mla = _value(rs, f"{ARCH}.attention.key_length_mla")
  heads = _value(rs, f"{ARCH}.attention.head_count")
  r_kv = _value(rs, f"{ARCH}.attention.kv_lora_rank")
  nope = k_mla - n_rot
  neox = [i // 2 + (n_rot // 2) * (i % 2) for i in range(n_rot)]  # new row 2i <- i, 2i+1 <- i + d/2
  touched = []
  for il in range(_value(rs, f"{ARCH}.block_count")):
    q = f"blk.{il}.attn_q_b.weight"
    a, b = _rows(_tensor(rs, q)).reshape(heads, k_mla, -1), _rows(_tensor(rd, q)).reshape(heads, k_mla, -1)
    np.testing.assert_array_equal(b[:, :nope], a[:, :nope])
    np.testing.assert_array_equal(b[:, nope:], a[:, nope:][:, neox])
    kv = f"blk.{il}.attn_kv_a_mqa.weight"
    a, b = _rows(_tensor(rs, kv)), _rows(_tensor(rd, kv))
    assert a.shape[0] == r_kv + n_rot
    np.testing.assert_array_equal(b[:r_kv], a[:r_kv])
    np.testing.assert_array_equal(b[r_kv:], a[r_kv:][neox])
    touched += [q, kv]
  _changed_only_inside(src, dst, _ranges(rs, tensors=touched))
  _same_except(rs, rd, tensors=touched)


@pytest.mark.parametrize("src", [TINY_F32, MINI_Q4], ids=["tiny-F32", "pydoc-Q4_K_M"])
def test_mla_heads_swapped(src, tmp_path):
  rs, rd, dst, _ = _apply("mla_heads_swapped", src, tmp_path)
  n = "blk.0.attn_k_b.weight"
  heads = _value(rs, f"{ARCH}.attention.head_count")
  a = np.asarray(_tensor(rs, n).data).reshape(heads, -1)  # ne [nope, r, H]: gguf-py's first axis is the head
  b = np.asarray(_tensor(rd, n).data).reshape(heads, -1)
  np.testing.assert_array_equal(b[0], a[1])
  np.testing.assert_array_equal(b[1], a[0])
  np.testing.assert_array_equal(b[2:], a[2:])
  assert not np.array_equal(a[0], a[1])
  _changed_only_inside(src, dst, _ranges(rs, tensors=[n]))
  _same_except(rs, rd, tensors=[n])


def _block_positions(diff, t_off, block_bytes):
  rel = diff - t_off
  return rel // block_bytes, rel % block_bytes


def test_kquant_lanes_one_block(tmp_path):
  rs, rd, dst, edits = _apply("kquant_lanes_one_block", MINI_Q4, tmp_path)
  (e,) = edits
  t = _tensor(rs, e.tensor)
  ty = t.tensor_type.name
  assert ty in B.KQUANT_CODES and e.tensor.split(".")[2] in B._EVERY_TOKEN
  diff = _changed_only_inside(MINI_Q4, dst, _ranges(rs, tensors=[e.tensor]))
  blocks, pos = _block_positions(diff, t.data.ctypes.data - rs.data.ctypes.data, B._block_size(ty))
  start = B.KQUANT_CODES[ty][0]
  assert len(set(blocks)) == 1 and sorted(pos) == [start, start + 1]  # two code bytes of one block, swapped
  a, b = np.fromfile(MINI_Q4, np.uint8), np.fromfile(dst, np.uint8)
  assert a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
  _same_except(rs, rd, tensors=[e.tensor])


def test_kquant_lanes_expert_tensor(tmp_path):
  rs, rd, dst, _ = _apply("kquant_lanes_expert_tensor", MINI_Q4, tmp_path)
  n = f"blk.{_value(rs, f'{ARCH}.block_count') - 1}.ffn_down_exps.weight"
  t = _tensor(rs, n)
  ty = t.tensor_type.name
  bs = B._block_size(ty)
  start = B.KQUANT_CODES[ty][0]
  diff = _changed_only_inside(MINI_Q4, dst, _ranges(rs, tensors=[n]))
  blocks, pos = _block_positions(diff, t.data.ctypes.data - rs.data.ctypes.data, bs)
  assert set(pos) == {start, start + 1}
  a = np.asarray(t.data).reshape(-1, bs)  # every block, swapped where its two lanes differ
  b = np.asarray(_tensor(rd, n).data).reshape(-1, bs)
  np.testing.assert_array_equal(b[:, start], a[:, start + 1])
  np.testing.assert_array_equal(b[:, start + 1], a[:, start])
  assert len(set(blocks)) == int((a[:, start] != a[:, start + 1]).sum()) > 0.9 * a.shape[0]
  _same_except(rs, rd, tensors=[n])


@pytest.mark.parametrize("bug", ["kquant_lanes_one_block", "kquant_lanes_expert_tensor"])
def test_kquant_bugs_need_a_kquant_tensor(bug, tmp_path):
  with pytest.raises(B.NotApplicable, match="k-quant"):
    B.apply(bug, TINY_Q4, tmp_path / "x.gguf")
  assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.iterdir())


def test_every_bug_is_registered_with_a_description():
  assert len(B.BUGS) >= 12
  for name, bug in B.BUGS.items():
    assert bug.name == name and bug.description and bug.kind in ("metadata", "tensor")
  with pytest.raises(KeyError, match="unknown bug"):
    B.apply("no_such_bug", TINY_F32, "/nonexistent")


def test_apply_is_atomic_on_a_failed_check(tmp_path, monkeypatch):
  """A copy that fails its read-back check never reaches dst (and leaves no temp file)."""
  dst = tmp_path / "bug.gguf"
  dst.write_bytes(b"previous")

  def bad(*a, **k):
    raise AssertionError("read-back failed")

  monkeypatch.setattr(B, "verify", bad)
  with pytest.raises(AssertionError, match="read-back"):
    B.apply("rope_base_+10pct", TINY_F32, dst)
  assert dst.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["bug.gguf"]
