"""Planted engine bugs: edited copies of a golden GGUF that make llama.cpp compute what a buggy DeepSeek-V3
engine would compute, so a judge (dq3jax diff) can be shown to catch each bug.

Every edit is made in place in a copy: a scalar metadata value is overwritten at its own offset (GGUF scalars
have fixed sizes), tensor bytes are rewritten within the tensor's data, so every other byte of the file stays
identical. `apply` writes the copy next to its destination and renames it into place only after reading it back
with gguf-py and checking each edit landed (value or bytes) and nothing else moved.

    from reference.planted_bugs import BUGS, apply
    edits = apply("rope_base_+10pct", "goldens/models/v3-pydoc/gguf/Q4_K_M.gguf", "/tmp/bug.gguf")

`python -m reference.planted_bugs measure GGUF --outputs GOLDEN` runs llama.cpp on the clean file and on every
applicable bug and prints the mean KLD of the logits and the worst per-layer intermediate NMSE against the
clean run.

How each bug maps to what llama.cpp 0c1e570 reads (src/models/deepseek2.cpp, src/llama-graph.cpp
build_moe_ffn, src/llama-context.cpp):
* deepseek2.expert_gating_func: 1 softmax, 2 sigmoid.
* deepseek2.expert_weights_scale multiplies the routed weights after normalisation (ggml_scale).
* deepseek2.expert_weights_norm divides the K selected weights by their sum.
* blk.N.exp_probs_b.bias is added to the probabilities for selection only.
* deepseek2.expert_group_count / expert_group_used_count: llama.cpp does implement DeepSeek-V3's group-limited
  routing (top-2 sum per group, keep the best expert_group_used_count groups, mask the rest) whenever
  expert_group_count > 1, and asserts expert_group_used_count < expert_group_count, so "used = count" aborts
  the load; group routing is switched off by declaring one group (expert_group_count = 1).
* YaRN: llama.cpp folds mscale = 1 + 0.1 * mscale_all_dim * ln(factor) into kq_scale (mscale^2 / sqrt(d_k));
  deepseek2.rope.scaling.yarn_log_multiplier (0.1 * mscale_all_dim) is where it reads mscale_all_dim from.
  Zeroing that key does not drop the scale: llama.cpp then applies the same mscale to the rotary magnitude
  instead (q_pe and k_pe each times mscale, kq_scale unchanged), so it is planted as its own bug
  (`yarn_mscale_on_rope`). `yarn_mscale_missing` (softmax scale 1/sqrt(d_k), no mscale^2) has no metadata
  knob in this llama.cpp (rope.scaling.attn_factor is absent from the goldens and cannot be added in place),
  so it scales every attn_q_a_norm weight (F32 in every recipe) by 1/mscale^2: q, hence every score, is then
  exactly 1/mscale^2 of the clean one.
* RoPE: deepseek2 uses LLAMA_ROPE_TYPE_NORM, pairs (2i, 2i+1). Moving row i of a head's rotary part to row 2i
  and row i + d/2 to 2i+1 (in attn_q_b per head and in attn_kv_a_mqa's trailing rotary rows, identically)
  makes llama.cpp rotate the original rows (i, i + d/2) with frequency i, which is NeoX pairing; q.k is
  unchanged by the common permutation. Rows are whole blocks, so this works for every ggml type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

# Byte range (offset, length) of the quant codes within one block of each k-quant (ggml-common.h: block_q2_K
# scales[16] qs[64] d dmin; q3_K hmask[32] qs[64] scales[12] d; q4_K d dmin scales[12] qs[128]; q5_K d dmin
# scales[12] qh[32] qs[128]; q6_K ql[128] qh[64] scales[16] d).
KQUANT_CODES = {"Q2_K": (16, 64), "Q3_K": (32, 64), "Q4_K": (16, 128), "Q5_K": (48, 128), "Q6_K": (0, 128)}
# The two code bytes a "lanes read wrongly" kernel swaps (adjacent lanes of the first code vector).
LANE_PAIR = (0, 1)


class NotApplicable(ValueError):
  """The GGUF lacks what the bug edits (e.g. no k-quant tensor in a recipe without one)."""


@dataclasses.dataclass(frozen=True)
class Edit:
  offset: int  # absolute byte offset in the file
  old: bytes
  new: bytes
  what: str
  key: str | None = None  # the metadata key whose value this is, or
  tensor: str | None = None  # the tensor whose data this lies in (read back by name to verify)

  @property
  def end(self) -> int:
    return self.offset + len(self.old)


# -------------------------------------------------------------------------------------------- reading


def _reader(path):
  from gguf import GGUFReader  # noqa: PLC0415

  return GGUFReader(os.fspath(path), "r")


def _abs(reader, arr: np.ndarray) -> int:
  """File offset of a memmap view of the reader's file."""
  return int(arr.ctypes.data - reader.data.ctypes.data)


def _field(reader, key: str):
  f = reader.fields.get(key)
  if f is None:
    raise NotApplicable(f"no metadata key {key!r}")
  return f


def _scalar_edit(reader, key: str, fn: Callable, what: str) -> Edit:
  """Overwrite a scalar metadata value (u32, f32, bool, ...) with fn(old value), same type and size."""
  f = _field(reader, key)
  if len(f.types) != 1 or not f.data:
    raise NotApplicable(f"{key} is not a scalar")
  part = f.parts[f.data[0]]
  old_v = part[0]
  new_v = np.array([fn(old_v.item())], dtype=part.dtype)
  if new_v.tobytes() == part.tobytes():
    raise NotApplicable(f"{key} = {old_v.item()}: the edit would not change it")
  return Edit(
    _abs(reader, part),
    part.tobytes(),
    new_v.tobytes(),
    f"{key}: {old_v.item()} -> {new_v[0].item()}",
    key=key,
  )


def _arch(reader) -> str:
  f = _field(reader, "general.architecture")
  return bytes(f.parts[f.data[0]]).decode()


def _kv(reader, key: str):
  f = _field(reader, f"{_arch(reader)}.{key}")
  return f.parts[f.data[0]][0].item()


def _tensors(reader) -> dict:
  return {t.name: t for t in reader.tensors}


def _type_name(t) -> str:
  return t.tensor_type.name


def _raw(reader, t) -> tuple[int, bytes]:
  """(file offset, bytes) of a tensor's data, located from gguf-py's own memmap view of it."""
  off = _abs(reader, t.data)
  if off != int(t.data_offset):
    raise AssertionError(f"{t.name}: gguf-py puts its data at {off} and at {t.data_offset}")
  return off, bytes(reader.data[off : off + int(t.n_bytes)])


def _row_bytes(t) -> tuple[int, int]:
  """(bytes per row, rows) of a GGUF tensor: rows are ne0 elements, whole ggml blocks."""
  from gguf import GGML_QUANT_SIZES  # noqa: PLC0415

  blk, size = GGML_QUANT_SIZES[t.tensor_type]
  ne = [int(x) for x in t.shape]
  rb = ne[0] // blk * size
  return rb, int(t.n_bytes) // rb


def _layers(reader) -> int:
  return int(_kv(reader, "block_count"))


# ------------------------------------------------------------------------------------------ the bugs


def _gating_softmax(r):
  return [_scalar_edit(r, f"{_arch(r)}.expert_gating_func", lambda v: 1, "softmax gating")]


def _scale(factor):
  def plan(r):
    return [
      _scalar_edit(r, f"{_arch(r)}.expert_weights_scale", lambda v: np.float32(v) * np.float32(factor), "")
    ]

  return plan


def _topk_norm_off(r):
  return [_scalar_edit(r, f"{_arch(r)}.expert_weights_norm", lambda v: False, "")]


def _group_limit_ignored(r):
  if int(_kv(r, "expert_group_count")) <= 1:
    raise NotApplicable("the model has no expert groups (expert_group_count <= 1)")
  return [_scalar_edit(r, f"{_arch(r)}.expert_group_count", lambda v: 1, "")]


def _rope_base(r):
  return [_scalar_edit(r, f"{_arch(r)}.rope.freq_base", lambda v: np.float32(v) * np.float32(1.1), "")]


def _yarn_mscale_on_rope(r):
  return [_scalar_edit(r, f"{_arch(r)}.rope.scaling.yarn_log_multiplier", lambda v: 0.0, "")]


def _yarn_mscale(r) -> float:
  """DeepSeek's YaRN softmax mscale as llama.cpp computes it: 1 + 0.1 * mscale_all_dim * ln(factor)."""
  log_mul = float(_kv(r, "rope.scaling.yarn_log_multiplier"))  # 0.1 * mscale_all_dim
  factor = float(_kv(r, "rope.scaling.factor"))
  if log_mul == 0 or factor <= 1:
    raise NotApplicable("no YaRN mscale to drop (yarn_log_multiplier 0 or factor <= 1)")
  return 1.0 + log_mul * math.log(factor)


def _yarn_mscale_missing(r):
  m = _yarn_mscale(r)
  c = np.float32(1.0 / (m * m))
  edits = []
  for name, t in _tensors(r).items():
    if not re.fullmatch(r"blk\.\d+\.attn_q_a_norm\.weight", name):
      continue
    if _type_name(t) != "F32":
      raise NotApplicable(f"{name} is {_type_name(t)}, not F32")
    off, old = _raw(r, t)
    new = (np.frombuffer(old, "<f4") * c).astype("<f4").tobytes()
    edits.append(Edit(off, old, new, f"{name} x {float(c):.6g} (1/mscale^2, mscale {m:.6g})", tensor=name))
  if not edits:
    raise NotApplicable("no attn_q_a_norm tensors (a model without q_lora_rank)")
  return edits


def _selection_bias_ignored(r):
  edits = []
  for name, t in _tensors(r).items():
    if name.endswith("exp_probs_b.bias"):
      if _type_name(t) != "F32":
        raise NotApplicable(f"{name} is {_type_name(t)}")
      off, old = _raw(r, t)
      new = bytes(len(old))
      if new != old:
        edits.append(Edit(off, old, new, f"{name} zeroed", tensor=name))
  if not edits:
    raise NotApplicable("no non-zero exp_probs_b tensors")
  return edits


def _permute_rows(r, t, perm_rows: dict[int, int], what: str) -> Edit:
  """Edit of tensor t whose row dst takes the bytes of row src for every dst -> src in perm_rows."""
  off, old = _raw(r, t)
  rb, _ = _row_bytes(t)
  buf = bytearray(old)
  for dst, src in perm_rows.items():
    buf[dst * rb : (dst + 1) * rb] = old[src * rb : (src + 1) * rb]
  return Edit(off, old, bytes(buf), what, tensor=t.name)


def _neox_order(d: int) -> list[int]:
  """New rotary row 2i <- old row i, 2i+1 <- old row i + d/2."""
  order = [0] * d
  for i in range(d // 2):
    order[2 * i], order[2 * i + 1] = i, i + d // 2
  return order


def _rope_pairing_neox(r):
  n_rot = int(_kv(r, "rope.dimension_count"))
  n_head = int(_kv(r, "attention.head_count"))
  k_mla = int(_kv(r, "attention.key_length_mla"))  # nope + rope per head
  r_kv = int(_kv(r, "attention.kv_lora_rank"))
  nope = k_mla - n_rot
  order = _neox_order(n_rot)
  ts = _tensors(r)
  edits = []
  for il in range(_layers(r)):
    q = ts.get(f"blk.{il}.attn_q_b.weight") or ts.get(f"blk.{il}.attn_q.weight")
    kv = ts[f"blk.{il}.attn_kv_a_mqa.weight"]
    qmap = {h * k_mla + nope + j: h * k_mla + nope + order[j] for h in range(n_head) for j in range(n_rot)}
    edits.append(_permute_rows(r, q, qmap, f"{q.name}: rotary rows of every head in NeoX order"))
    kmap = {r_kv + j: r_kv + order[j] for j in range(n_rot)}
    edits.append(_permute_rows(r, kv, kmap, f"{kv.name}: rotary rows in NeoX order"))
  return edits


def _mla_heads_swapped(r):
  n_head = int(_kv(r, "attention.head_count"))
  if n_head < 2:
    raise NotApplicable("one attention head: nothing to swap")
  t = _tensors(r)["blk.0.attn_k_b.weight"]  # ne [nope, kv_lora_rank, n_head]: one contiguous chunk per head
  off, old = _raw(r, t)
  hb = len(old) // n_head
  new = old[hb : 2 * hb] + old[:hb] + old[2 * hb :]
  return [Edit(off, old, new, f"{t.name}: heads 0 and 1 swapped", tensor=t.name)]


def _swap_lanes(block: bytes, type_name: str) -> bytes:
  start, _ = KQUANT_CODES[type_name]
  a, b = start + LANE_PAIR[0], start + LANE_PAIR[1]
  out = bytearray(block)
  out[a], out[b] = block[b], block[a]
  return bytes(out)


def _block_size(type_name: str) -> int:
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: PLC0415

  return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]


# Tensors every token goes through, in order of preference (the first layer's attention and dense MLP).
_EVERY_TOKEN = ("attn_q_a", "attn_kv_a_mqa", "attn_q_b", "attn_output", "ffn_down", "ffn_gate", "ffn_up")


def _kquant_lanes_one_block(r):
  ts = _tensors(r)
  cands = [ts[n] for il in range(_layers(r)) for w in _EVERY_TOKEN if (n := f"blk.{il}.{w}.weight") in ts]
  for t in cands:
    ty = _type_name(t)
    if ty not in KQUANT_CODES:
      continue
    off, old = _raw(r, t)
    bs = _block_size(ty)
    for k in range(len(old) // bs):
      blk = old[k * bs : (k + 1) * bs]
      new = _swap_lanes(blk, ty)
      if new != blk:  # the first block whose two lanes differ, so the swap is visible
        return [
          Edit(
            off + k * bs,
            blk,
            new,
            f"{t.name} ({ty}) block {k}: code bytes {LANE_PAIR} swapped",
            tensor=t.name,
          )
        ]
  raise NotApplicable(
    f"no k-quant ({'/'.join(KQUANT_CODES)}) tensor among the dense/attention weights "
    f"({', '.join(sorted({_type_name(t) for t in cands}))})"
  )


def _kquant_lanes_expert_tensor(r):
  t = _tensors(r).get(f"blk.{_layers(r) - 1}.ffn_down_exps.weight")
  if t is None:
    raise NotApplicable("the last layer has no ffn_down_exps")
  ty = _type_name(t)
  if ty not in KQUANT_CODES:
    raise NotApplicable(f"{t.name} is {ty}, not a k-quant ({'/'.join(KQUANT_CODES)})")
  off, old = _raw(r, t)
  bs = _block_size(ty)
  new = b"".join(_swap_lanes(old[k : k + bs], ty) for k in range(0, len(old), bs))
  return [
    Edit(off, old, new, f"{t.name} ({ty}): code bytes {LANE_PAIR} swapped in every block", tensor=t.name)
  ]


@dataclasses.dataclass(frozen=True)
class Bug:
  name: str
  description: str
  plan: Callable  # GGUFReader -> list[Edit]; raises NotApplicable
  kind: str  # "metadata" or "tensor"

  def edits(self, src) -> list[Edit]:
    return self.plan(_reader(src))

  def applies_to(self, src) -> bool:
    try:
      self.edits(src)
    except NotApplicable:
      return False
    return True

  def apply(self, src, dst) -> list[Edit]:
    """Write dst = src with this bug's edits (atomically: a temp file in dst's folder, renamed when verified)."""
    edits = self.edits(src)
    dst = os.fspath(dst)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-bug-", suffix=".gguf", dir=os.path.dirname(os.path.abspath(dst)))
    os.close(fd)
    try:
      shutil.copyfile(src, tmp)
      with open(tmp, "r+b") as f:
        for e in edits:
          f.seek(e.offset)
          f.write(e.new)
      verify(src, tmp, edits)
      os.replace(tmp, dst)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
    return edits


def verify(src, dst, edits: list[Edit]) -> None:
  """dst differs from src exactly by the edits: same size, every byte outside them identical, and, read back by
  gguf-py through its own parse of dst, every edited metadata value and tensor holds the new bytes (so an edit
  at a wrong offset cannot pass), with the same keys and tensors as src."""
  a = np.fromfile(src, np.uint8)
  b = np.fromfile(dst, np.uint8)
  if a.size != b.size:
    raise AssertionError(f"{dst}: size {b.size}, source {a.size}")
  inside = np.zeros(a.size, bool)
  for e in edits:
    if bytes(a[e.offset : e.end]) != e.old:
      raise AssertionError(f"{dst}: edit '{e.what}' does not start from the source's bytes at {e.offset}")
    inside[e.offset : e.end] = True
  if (a[~inside] != b[~inside]).any():
    raise AssertionError(f"{dst}: bytes outside the edits changed")
  ra, rd = _reader(src), _reader(dst)
  if list(ra.fields) != list(rd.fields) or [t.name for t in ra.tensors] != [t.name for t in rd.tensors]:
    raise AssertionError(f"{dst}: keys or tensors changed")
  tensors = _tensors(rd)
  for e in edits:
    if e.key is not None:
      f = rd.fields[e.key]
      got, start = f.parts[f.data[0]].tobytes(), _abs(rd, f.parts[f.data[0]])
    elif e.tensor is not None:
      t = tensors[e.tensor]
      start = _abs(rd, t.data)
      got = bytes(rd.data[start : start + int(t.n_bytes)])
      rel = e.offset - start
      if not 0 <= rel <= len(got) - len(e.new):
        raise AssertionError(f"{dst}: edit '{e.what}' lies outside {e.tensor}'s data")
      got, start = got[rel : rel + len(e.new)], start + rel
    else:
      raise AssertionError(f"edit '{e.what}' names neither a key nor a tensor")
    if got != e.new or start != e.offset:
      raise AssertionError(
        f"{dst}: edit '{e.what}' did not land where gguf-py reads {e.key or e.tensor} ({start} vs {e.offset})"
      )


BUGS: dict[str, Bug] = {
  b.name: b
  for b in (
    Bug(
      "gating_softmax",
      "expert gating softmax instead of sigmoid (expert_gating_func 2 -> 1)",
      _gating_softmax,
      "metadata",
    ),
    Bug(
      "routed_scale_x2.5",
      "routed_scaling_factor applied twice (expert_weights_scale x 2.5)",
      _scale(2.5),
      "metadata",
    ),
    Bug(
      "routed_scale_+5pct",
      "routed_scaling_factor 5 % too large (expert_weights_scale x 1.05)",
      _scale(1.05),
      "metadata",
    ),
    Bug(
      "topk_norm_off",
      "top-k routed weights not normalised to sum 1 (expert_weights_norm false)",
      _topk_norm_off,
      "metadata",
    ),
    Bug(
      "selection_bias_ignored",
      "e_score_correction_bias ignored in expert selection (exp_probs_b zeroed)",
      _selection_bias_ignored,
      "tensor",
    ),
    Bug(
      "group_limit_ignored",
      "group-limited routing off: top-k over all experts (expert_group_count -> 1)",
      _group_limit_ignored,
      "metadata",
    ),
    Bug(
      "yarn_mscale_missing",
      "YaRN softmax mscale^2 missing: scores scaled by 1/sqrt(d_k) only (attn_q_a_norm x 1/mscale^2)",
      _yarn_mscale_missing,
      "tensor",
    ),
    Bug(
      "yarn_mscale_on_rope",
      "YaRN mscale applied to the rotary magnitude instead of only the softmax scale "
      "(yarn_log_multiplier -> 0, as llama.cpp reads it)",
      _yarn_mscale_on_rope,
      "metadata",
    ),
    Bug("rope_base_+10pct", "RoPE base 10 % too large (rope.freq_base x 1.1)", _rope_base, "metadata"),
    Bug(
      "rope_pairing_neox",
      "RoPE pairs (i, i+d/2) instead of (2i, 2i+1): rotary rows of attn_q_b and attn_kv_a_mqa permuted",
      _rope_pairing_neox,
      "tensor",
    ),
    Bug("mla_heads_swapped", "MLA heads 0 and 1 swapped in blk.0.attn_k_b", _mla_heads_swapped, "tensor"),
    Bug(
      "kquant_lanes_one_block",
      "k-quant kernel reads two code lanes swapped in one block of one every-token weight",
      _kquant_lanes_one_block,
      "tensor",
    ),
    Bug(
      "kquant_lanes_expert_tensor",
      "k-quant kernel reads two code lanes swapped in every block of the last layer's ffn_down_exps",
      _kquant_lanes_expert_tensor,
      "tensor",
    ),
  )
}


def apply(name: str, src, dst) -> list[Edit]:
  if name not in BUGS:
    raise KeyError(f"unknown bug {name!r}; known: {', '.join(BUGS)}")
  return BUGS[name].apply(src, dst)


# -------------------------------------------------------------------------------------------- measuring


def effect(clean: dict, bugged: dict) -> dict:
  """How far a bugged llama.cpp run is from the clean one: mean/max KLD of logits and decode_logits, the
  worst NMSE of any float intermediate (and where), the fraction of positions whose expert set changed."""
  from dq3jax.compare.logit_stats import per_position_kld  # noqa: PLC0415
  from dq3jax.compare.metrics import nmse, topk_set_differs  # noqa: PLC0415

  out = {}
  for k in ("logits", "decode_logits"):
    kld = per_position_kld(clean[k], bugged[k])
    out[f"{k}_mean_kld"] = float(kld.mean())
  worst, where, flips = 0.0, None, 0.0
  for k, a in clean.items():
    if not k.startswith("blk."):
      continue
    if k.endswith("topk_ids"):
      flips = max(flips, float(topk_set_differs(a, bugged[k]).mean()))
      continue
    v = nmse(a, bugged[k])
    if v > worst:
      worst, where = v, k
  out |= {"max_intermediate_nmse": worst, "at": where, "max_expert_set_changed": flips}
  return out


def measure(gguf, outputs, names=None, settings=None) -> dict[str, dict]:
  """{bug: effect(clean, bugged)} for every bug that applies to gguf (NotApplicable ones: {'n/a': why})."""
  from reference import llama_cpp_run as R  # noqa: PLC0415

  settings = settings or R.Settings()
  tokens, n_prefill = R.golden_tokens(outputs)
  clean = R.run(gguf, tokens, n_prefill, settings)
  res = {}
  with tempfile.TemporaryDirectory() as d:
    for name in names or BUGS:
      dst = os.path.join(d, f"{name}.gguf")
      try:
        apply(name, gguf, dst)
      except NotApplicable as e:
        res[name] = {"n/a": str(e)}
        continue
      res[name] = effect(clean, R.run(dst, tokens, n_prefill, settings))
      os.unlink(dst)
  return res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="planted DeepSeek engine bugs as edited GGUF copies")
  sub = p.add_subparsers(dest="cmd", required=True)
  sub.add_parser("list")
  a_ = sub.add_parser("apply")
  a_.add_argument("bug")
  a_.add_argument("src")
  a_.add_argument("dst")
  m_ = sub.add_parser("measure")
  m_.add_argument("gguf")
  m_.add_argument("--outputs", required=True)
  m_.add_argument("--bug", action="append")
  m_.add_argument("--kv-cache", default="f16")
  m_.add_argument("--json")
  a = p.parse_args(argv)
  if a.cmd == "list":
    for b in BUGS.values():
      print(f"{b.name:28s} {b.kind:8s} {b.description}")
  elif a.cmd == "apply":
    for e in apply(a.bug, a.src, a.dst):
      print(f"{e.offset:>10d} +{len(e.old):<8d} {e.what}")
  else:
    from reference.llama_cpp_run import Settings  # noqa: PLC0415

    res = measure(a.gguf, a.outputs, a.bug, Settings(kv_cache=a.kv_cache))
    for k, v in res.items():
      if "n/a" in v:
        print(f"{k:28s} n/a: {v['n/a']}")
      else:
        print(
          f"{k:28s} KLD {v['logits_mean_kld']:.3e} decode KLD {v['decode_logits_mean_kld']:.3e} "
          f"max NMSE {v['max_intermediate_nmse']:.3e} ({v['at']}) experts changed "
          f"{v['max_expert_set_changed']:.1%}"
        )
    if a.json:
      with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
