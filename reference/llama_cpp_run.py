"""llama.cpp (through llama-cpp-python's C bindings) evaluating a GGUF: the real engine the goldens are diffed
against, with its own per-layer intermediates and the settings people run it with.

`python -m reference.llama_cpp_run MODEL.gguf --outputs GOLDEN_OUTPUTS.safetensors --out CANDIDATE.npz
[--threads N] [--kv-cache f16|f32] [--flash-attn] [--ubatch N] [--no-intermediates]`
runs llama.cpp on the golden's tokens and writes a candidate dump in the format `dq3jax diff` reads
(docs/diff.md):

* `logits` [T, V] from the prefill over all T tokens (in chunks of `ubatch` tokens when set), and
* `decode_logits` [T-P, V] from a prefill of P tokens followed by one llama_decode per token,
* per layer, what llama.cpp's graph computed during the prefill, observed through the scheduler's eval
  callback (`cb_eval`): `blk.{i}.attn_latent` [T, r] (`kv_cmpr-{i}` after attn_kv_a_norm),
  `blk.{i}.hidden_after_attn` [T, d] (`ffn_inp-{i}`), `blk.{i}.hidden_after_mlp` [T, d] (`l_out-{i}`), and for
  MoE layers `blk.{i}.topk_ids` [T, K] (`ffn_moe_topk-{i}`), `blk.{i}.topk_weights` [T, K] (the last of
  `ffn_moe_weights{,_softmax,_norm,_scaled}-{i}` the graph has) and `blk.{i}.router_scores` [T, E]
  (`ffn_moe_probs_biased-{i}`: gating probabilities plus exp_probs_b, before group masking),
* `meta.llama_cpp`: a 0-d string array holding JSON of the settings and versions (diff ignores `meta.*`).

The model is loaded through the low-level API so that `llama_model_params.use_extra_bufts` can be turned off:
llama.cpp 0c1e570 aborts in ggml_backend_sched_split_graph (`GGML_ASSERT(*cur_backend_id != -1)`) on CPUs with
AMX when weights go to the AMX/repack extra buffer types, and repacked weights are another kernel path than the
one the goldens emulate. `load_model` checks from the struct's bytes that the flag is off and, from llama.cpp's
own load log, that no extra buffer type received weights.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

# ggml enum values (ggml/include/ggml.h of the bundled llama.cpp 0c1e570)
_GGML_F32, _GGML_F16, _GGML_I32, _GGML_BF16 = 0, 1, 26, 30
_KV_TYPES = {"f32": _GGML_F32, "f16": _GGML_F16}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The llama.cpp settings a run uses. Defaults: one thread, llama.cpp's default F16 KV cache, flash attention
  off, the whole prefill in one batch."""

  threads: int = 1
  kv_cache: str = "f16"  # "f16" (llama.cpp's default type_k/type_v) or "f32"
  flash_attn: bool = False
  ubatch: int | None = None  # None: n_batch = n_ubatch = T (one batch); N: the prefill in chunks of N tokens

  def __post_init__(self):
    if self.threads not in (1, 2):
      raise ValueError(f"threads must be 1 or 2 (the machines this runs on have 2 cores), not {self.threads}")
    if self.kv_cache not in _KV_TYPES:
      raise ValueError(f"kv_cache must be one of {sorted(_KV_TYPES)}, not {self.kv_cache!r}")
    if self.ubatch is not None and self.ubatch < 1:
      raise ValueError(f"ubatch must be None or >= 1, not {self.ubatch}")

  @property
  def label(self) -> str:
    ub = "all" if self.ubatch is None else str(self.ubatch)
    return f"t{self.threads}-{self.kv_cache}kv-fa{int(self.flash_attn)}-ub{ub}"


# A 2^(4-1) fractional factorial over threads {1, 2} x KV {f32, f16} x flash attention {off, on} x batching
# {one batch, ubatch 8}: the batching level is the parity of the other three, so every pair of the four
# factors appears in all four combinations in 8 runs (the full product would be 16). Row 1 is the
# plain-float32 reference (F32 KV, no flash attention, one thread, one batch).
CALIBRATION_SETTINGS: tuple[Settings, ...] = (
  Settings(threads=1, kv_cache="f32", flash_attn=False, ubatch=None),
  Settings(threads=1, kv_cache="f32", flash_attn=True, ubatch=8),
  Settings(threads=1, kv_cache="f16", flash_attn=False, ubatch=8),
  Settings(threads=1, kv_cache="f16", flash_attn=True, ubatch=None),
  Settings(threads=2, kv_cache="f32", flash_attn=False, ubatch=8),
  Settings(threads=2, kv_cache="f32", flash_attn=True, ubatch=None),
  Settings(threads=2, kv_cache="f16", flash_attn=False, ubatch=None),
  Settings(threads=2, kv_cache="f16", flash_attn=True, ubatch=8),
)


# ------------------------------------------------------------------------------------------ the libraries


def _lc():
  from llama_cpp import llama_cpp as lc  # noqa: PLC0415  (optional dependency: the `reference` extra)

  return lc


class GgmlTensor(ctypes.Structure):
  """struct ggml_tensor of ggml 0.25.3 / llama.cpp 0c1e570 (ggml/include/ggml.h; GGML_MAX_DIMS 4,
  GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64). `_check_tensor_layout` verifies it against the
  library before the first read."""

  _fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.c_void_p * 10),
    ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
  ]


class _GgmlInitParams(ctypes.Structure):
  _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@functools.cache
def _ggml() -> ctypes.CDLL:
  from reference.ggml_ref import library_path  # noqa: PLC0415

  g = ctypes.CDLL(str(library_path()))
  g.ggml_backend_tensor_get.restype = None
  g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
  g.ggml_nbytes.restype = ctypes.c_size_t
  g.ggml_nbytes.argtypes = [ctypes.c_void_p]
  g.ggml_op_name.restype = ctypes.c_char_p
  g.ggml_op_name.argtypes = [ctypes.c_int]
  g.ggml_type_name.restype = ctypes.c_char_p
  g.ggml_type_name.argtypes = [ctypes.c_int]
  g.ggml_tensor_overhead.restype = ctypes.c_size_t
  g.ggml_get_name.restype = ctypes.c_void_p
  g.ggml_get_name.argtypes = [ctypes.c_void_p]
  g.ggml_get_data.restype = ctypes.c_void_p
  g.ggml_get_data.argtypes = [ctypes.c_void_p]
  g.ggml_init.restype = ctypes.c_void_p
  g.ggml_init.argtypes = [_GgmlInitParams]
  g.ggml_free.argtypes = [ctypes.c_void_p]
  g.ggml_new_tensor.restype = ctypes.c_void_p
  g.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
  g.ggml_set_name.restype = ctypes.c_void_p
  g.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
  g.ggml_view_2d.restype = ctypes.c_void_p
  g.ggml_view_2d.argtypes = [
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_size_t,
    ctypes.c_size_t,
  ]
  g.ggml_commit.restype = ctypes.c_char_p
  g.ggml_version.restype = ctypes.c_char_p
  _check_tensor_layout(g)
  return g


def _check_tensor_layout(g: ctypes.CDLL) -> None:
  """GgmlTensor must be this ggml's struct: same size (ggml_tensor_overhead = object header 32 + tensor), and
  every field we read where ggml's own accessors and strides put it, on a probe view tensor."""
  if ctypes.sizeof(GgmlTensor) + 32 != g.ggml_tensor_overhead():
    raise RuntimeError(
      f"struct ggml_tensor layout changed: {ctypes.sizeof(GgmlTensor)} + 32 bytes here, "
      f"ggml_tensor_overhead() = {g.ggml_tensor_overhead()}"
    )
  ctx = g.ggml_init(_GgmlInitParams(mem_size=1 << 16, mem_buffer=None, no_alloc=True))
  try:
    ne = (ctypes.c_int64 * 4)(6, 5, 3, 2)
    base = g.ggml_new_tensor(ctx, _GGML_F16, 4, ne)
    view = g.ggml_view_2d(ctx, base, 4, 3, 6 * 2, 2 * 2)  # 4 of every 6 halves, from the third
    g.ggml_set_name(view, b"layout-probe")
    t = GgmlTensor.from_address(view)
    ok = (
      t.type == _GGML_F16
      and list(t.ne) == [4, 3, 1, 1]
      and list(t.nb[:2]) == [2, 12]
      and t.name == b"layout-probe"
      and t.view_src == base
      and t.view_offs == 4
      and g.ggml_get_name(view) == view + GgmlTensor.name.offset
      and g.ggml_nbytes(view) == 2 * 12 + 4 * 2
      and g.ggml_op_name(t.op) == b"VIEW"
      and t.src[0] == base
    )
    if not ok:
      raise RuntimeError(
        "struct ggml_tensor layout does not match this ggml (fields read at the wrong offsets)"
      )
  finally:
    g.ggml_free(ctx)


def _dtype(ggml_type: int) -> np.dtype:
  import ml_dtypes  # noqa: PLC0415

  table = {_GGML_F32: np.float32, _GGML_F16: np.float16, _GGML_I32: np.int32, _GGML_BF16: ml_dtypes.bfloat16}
  if ggml_type not in table:
    raise ValueError(f"graph tensor of ggml type {_ggml().ggml_type_name(ggml_type).decode()} cannot be read")
  return np.dtype(table[ggml_type])


def read_tensor(ptr: int) -> np.ndarray:
  """A graph tensor's values as numpy, in ggml's index order reversed ([ne3, ne2, ne1, ne0], row-major).

  The bytes are copied with ggml_backend_tensor_get, which works wherever the tensor lives (CPU or device
  buffer); for a view it copies ggml_nbytes from the view's start, which covers every strided element, and the
  strides nb pick them out. F16/BF16 become float32, I32 stays int32."""
  g = _ggml()
  t = GgmlTensor.from_address(ptr)
  dt = _dtype(t.type)
  n = g.ggml_nbytes(ptr)
  raw = np.empty(n, np.uint8)
  if n:
    g.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, n)
  shape = tuple(int(x) for x in t.ne)[::-1]
  strides = tuple(int(x) for x in t.nb)[::-1]
  a = np.ndarray(shape, dtype=dt, buffer=raw, strides=strides).copy()
  return a.astype(np.float32) if dt.kind == "f" and dt != np.float32 else a


# --------------------------------------------------------------------------------- model and context


class _Log:
  """llama.cpp's log, kept (the load log is where llama.cpp says which buffer type holds the weights)."""

  def __init__(self):
    self.lines: list[str] = []
    self.echo = False
    lc = _lc()

    @lc.llama_log_callback
    def cb(level, text, user_data):
      s = text.decode("utf-8", "replace")
      self.lines.append(s)
      if self.echo:
        print(s, end="", flush=True)

    self._cb = cb  # keep the C callback alive
    lc.llama_log_set(cb, ctypes.c_void_p(0))

  def since(self, k: int) -> str:
    return "".join(self.lines[k:])


@functools.cache
def _backend() -> _Log:
  log = _Log()
  _lc().llama_backend_init()
  return log


_EXTRA_BUFT = re.compile(r"(AMX|REPACK|KLEIDIAI|CPU_AARCH64)", re.I)


@dataclasses.dataclass
class Model:
  ptr: int
  path: str
  n_vocab: int
  n_layer: int
  buffer_lines: tuple[str, ...]  # llama.cpp's "<buffer type> model buffer size" lines of this load

  def close(self):
    if self.ptr:
      _lc().llama_model_free(self.ptr)
      self.ptr = 0


def model_params():
  """llama_model_params for a CPU run without extra buffer types, checked from the struct's bytes."""
  lc = _lc()
  p = lc.llama_model_default_params()
  # The six bools sit together at the end of the struct (include/llama.h: vocab_only, check_tensors,
  # use_extra_bufts, no_host, no_alloc, load_mtp); llama.cpp's defaults are F, F, T, F, F, F, so reading them
  # there proves the ctypes layout is the library's before we write one.
  off = type(p).vocab_only.offset
  raw = bytes((ctypes.c_ubyte * 6).from_buffer_copy(bytes(p)[off : off + 6]))
  if raw != b"\x00\x00\x01\x00\x00\x00" or type(p).use_extra_bufts.offset != off + 2:
    raise RuntimeError(f"llama_model_params layout is not the one this runner knows (bools {raw.hex()})")
  p.n_gpu_layers = 0
  p.use_extra_bufts = False
  if bytes(p)[off + 2] != 0:
    raise RuntimeError("use_extra_bufts did not land in llama_model_params")
  return p


def load_model(path) -> Model:
  lc = _lc()
  log = _backend()
  k = len(log.lines)
  ptr = lc.llama_model_load_from_file(os.fspath(path).encode(), model_params())
  if not ptr:
    raise RuntimeError(f"llama.cpp could not load {path}:\n{log.since(k)[-2000:]}")
  text = log.since(k)
  bufs = tuple(ln.strip() for ln in text.splitlines() if "model buffer size" in ln)
  extra = [ln for ln in bufs if _EXTRA_BUFT.search(ln)]
  if extra:
    lc.llama_model_free(ptr)
    raise RuntimeError(f"weights went to an extra buffer type although use_extra_bufts is off: {extra}")
  vocab = lc.llama_model_get_vocab(ptr)
  return Model(
    ptr=ptr,
    path=os.fspath(path),
    n_vocab=int(lc.llama_vocab_n_tokens(vocab)),
    n_layer=int(lc.llama_model_n_layer(ptr)),
    buffer_lines=bufs,
  )


class _Capture:
  """The eval callback: says which graph tensors it wants (ask) and copies them out when computed."""

  def __init__(self, want, record_all: bool = False):
    self.want = want  # (name, op name) -> bool
    self.record_all = record_all
    self.seen: list[dict] = []  # every node asked about, when record_all
    self.got: dict[str, list[np.ndarray]] = {}
    self.error: BaseException | None = None
    lc = _lc()

    @lc.ggml_backend_sched_eval_callback
    def cb(t, ask, user_data):
      try:
        ten = GgmlTensor.from_address(t)
        name = ten.name.decode()
        op = _ggml().ggml_op_name(ten.op).decode()
        if ask:
          if self.record_all:
            self.seen.append(
              {
                "name": name,
                "op": op,
                "type": _ggml().ggml_type_name(ten.type).decode(),
                "ne": [int(x) for x in ten.ne],
              }
            )
          return bool(self.want(name, op))
        self.got.setdefault(name, []).append(read_tensor(t))
        return True
      except BaseException as e:  # an exception must not cross the C boundary: stop the graph, re-raise later
        self.error = e
        return False

    self.cb = cb


@dataclasses.dataclass
class Context:
  ptr: int
  n_batch: int
  n_vocab: int

  def close(self):
    if self.ptr:
      _lc().llama_free(self.ptr)
      self.ptr = 0


def new_context(model: Model, settings: Settings, n_ctx: int, n_batch: int, capture: _Capture | None = None):
  lc = _lc()
  p = lc.llama_context_default_params()
  p.n_ctx = max(64, n_ctx)
  p.n_batch = p.n_ubatch = n_batch
  p.n_seq_max = 1
  p.n_threads = p.n_threads_batch = settings.threads
  p.type_k = p.type_v = _KV_TYPES[settings.kv_cache]
  p.flash_attn_type = (
    lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
  )
  p.no_perf = True
  if capture is not None:
    p.cb_eval = capture.cb
    p.cb_eval_user_data = None
  k = len(_backend().lines)
  ptr = lc.llama_init_from_model(model.ptr, p)
  if not ptr:
    raise RuntimeError(f"llama.cpp could not create a context ({settings}):\n{_backend().since(k)[-2000:]}")
  return Context(ptr=ptr, n_batch=n_batch, n_vocab=model.n_vocab)


def _decode(ctx: Context, tokens: Sequence[int], pos0: int, capture: _Capture | None = None) -> np.ndarray:
  """One llama_decode of `tokens` at positions pos0.. (every position an output) -> logits [n, V]."""
  lc = _lc()
  n = len(tokens)
  assert 0 < n <= ctx.n_batch
  batch = lc.llama_batch_init(n, 0, 1)
  try:
    for k, tok in enumerate(tokens):
      batch.token[k] = int(tok)
      batch.pos[k] = pos0 + k
      batch.n_seq_id[k] = 1
      batch.seq_id[k][0] = 0
      batch.logits[k] = 1
    batch.n_tokens = n
    rc = lc.llama_decode(ctx.ptr, batch)
    if capture is not None and capture.error is not None:
      raise capture.error
    if rc != 0:
      raise RuntimeError(f"llama_decode returned {rc}")
    ptr = lc.llama_get_logits(ctx.ptr)
    return np.ctypeslib.as_array(ptr, shape=(n, ctx.n_vocab)).astype(np.float32, copy=True)
  finally:
    lc.llama_batch_free(batch)


def _chunks(n: int, size: int | None) -> Iterable[tuple[int, int]]:
  size = size or n
  for a in range(0, n, size):
    yield a, min(n, a + size)


# ------------------------------------------------------------------------------------------ intermediates

# llama.cpp graph name (cb name, "-{il}" appended) -> dump name. kv_cmpr-{i} names two nodes: the VIEW of
# kv_cmpr_pe before the norm and the MUL by attn_kv_a_norm after it; the latent is the MUL.
_LAYER_TENSORS = {
  "kv_cmpr": "attn_latent",
  "ffn_inp": "hidden_after_attn",
  "l_out": "hidden_after_mlp",
  "ffn_moe_topk": "topk_ids",
  "ffn_moe_probs_biased": "router_scores",
}
# build_moe_ffn's weight pipeline in order; the routed weights are the last stage the graph has (scaled only
# when expert_weights_scale is neither 0 nor 1, norm only when expert_weights_norm is set).
_WEIGHT_STAGES = (
  "ffn_moe_weights",
  "ffn_moe_weights_softmax",
  "ffn_moe_weights_norm",
  "ffn_moe_weights_scaled",
)
_NAME = re.compile(r"^(.+)-(\d+)$")


def _wanted(name: str, op: str) -> bool:
  m = _NAME.match(name)
  if not m:
    return False
  base = m.group(1)
  if base == "kv_cmpr":
    return op == "MUL"
  return base in _LAYER_TENSORS or base in _WEIGHT_STAGES


def _assemble(got: dict[str, list[np.ndarray]], chunk_sizes: Sequence[int]) -> dict[str, np.ndarray]:
  """Per-ubatch graph tensors -> dump tensors [T, ...] (ubatches concatenated over tokens)."""
  per_layer: dict[int, dict[str, np.ndarray]] = {}
  for name, parts in got.items():
    m = _NAME.match(name)
    base, il = m.group(1), int(m.group(2))
    if len(parts) != len(chunk_sizes):
      raise RuntimeError(f"{name}: observed {len(parts)} times in {len(chunk_sizes)} ubatches")
    rows = []
    for a, n in zip(parts, chunk_sizes, strict=True):
      # ggml's outermost non-trivial dimension is the token (ne1 of [E,T], ne2 of [1,K,T]); numpy's
      # reversed view puts it first, so a plain reshape gives [n, ...] rows in token order.
      if a.size % n:
        raise RuntimeError(f"{name}: {list(a.shape)} does not hold {n} token rows")
      rows.append(a.reshape(n, -1))
    per_layer.setdefault(il, {})[base] = np.concatenate(rows, axis=0)
  out: dict[str, np.ndarray] = {}
  for il in sorted(per_layer):
    d = per_layer[il]
    for base, dump_name in _LAYER_TENSORS.items():
      if base in d:
        a = d[base]
        out[f"blk.{il}.{dump_name}"] = a.astype(np.int32) if dump_name == "topk_ids" else a.astype(np.float32)
    stages = [s for s in _WEIGHT_STAGES if s in d]
    if stages:
      out[f"blk.{il}.topk_weights"] = d[stages[-1]].astype(np.float32)
  return out


# --------------------------------------------------------------------------------------------- the runs


def prefill(
  model: Model, tokens: Sequence[int], settings: Settings = Settings(), *, intermediates: bool = True
):
  """llama.cpp's prefill over tokens [T] -> (logits [T, V], {dump name: intermediate [T, ...]})."""
  tokens = [int(t) for t in tokens]
  n = len(tokens)
  cap = _Capture(_wanted) if intermediates else None
  ctx = new_context(model, settings, n, settings.ubatch or n, cap)
  try:
    spans = list(_chunks(n, settings.ubatch))
    logits = np.concatenate([_decode(ctx, tokens[a:b], a, cap) for a, b in spans])
  finally:
    ctx.close()
  inter = _assemble(cap.got, [b - a for a, b in spans]) if cap else {}
  return logits, inter


def decode(
  model: Model, tokens: Sequence[int], n_prefill: int, settings: Settings = Settings()
) -> np.ndarray:
  """Logits [T - P, V] for positions P..T-1: a prefill of P tokens (chunks of `ubatch`), then one llama_decode
  per token, each reading the KV cache."""
  tokens = [int(t) for t in tokens]
  ctx = new_context(model, settings, len(tokens), settings.ubatch or max(n_prefill, 1))
  try:
    for a, b in _chunks(n_prefill, settings.ubatch):
      _decode(ctx, tokens[a:b], a)
    return np.concatenate([_decode(ctx, [tokens[k]], k) for k in range(n_prefill, len(tokens))])
  finally:
    ctx.close()


def graph_nodes(path, tokens: Sequence[int], settings: Settings = Settings()) -> list[dict]:
  """Every node of llama.cpp's prefill graph as the scheduler evaluates it: {name, op, type, ne}. This is how
  the names in _LAYER_TENSORS / _WEIGHT_STAGES were found and how the tests check them."""
  model = load_model(path)
  try:
    cap = _Capture(lambda name, op: False, record_all=True)
    ctx = new_context(model, settings, len(tokens), settings.ubatch or len(tokens), cap)
    try:
      for a, b in _chunks(len(tokens), settings.ubatch):
        _decode(ctx, [int(t) for t in tokens[a:b]], a, cap)
    finally:
      ctx.close()
    return cap.seen
  finally:
    model.close()


def llama_logits(path, tokens, settings: Settings | None = None) -> np.ndarray:
  """llama.cpp's logits [T, V] for every position of one prefill over tokens [T] (F32 KV unless told)."""
  settings = settings or Settings(kv_cache="f32")
  model = load_model(path)
  try:
    return prefill(model, tokens, settings, intermediates=False)[0]
  finally:
    model.close()


def llama_decode_logits(path, tokens, prefill_len: int, settings: Settings | None = None) -> np.ndarray:
  settings = settings or Settings(kv_cache="f32")
  model = load_model(path)
  try:
    return decode(model, tokens, prefill_len, settings)
  finally:
    model.close()


def versions() -> dict:
  import llama_cpp  # noqa: PLC0415

  g = _ggml()
  return {
    "llama_cpp_python": llama_cpp.__version__,
    "llama_cpp_commit": g.ggml_commit().decode(),
    "ggml": g.ggml_version().decode(),
    "system": _lc().llama_print_system_info().decode().strip(),
  }


def run(gguf_path, tokens, n_prefill: int, settings: Settings = Settings(), *, intermediates: bool = True):
  """Everything a dump holds: {tokens, logits, decode_logits, blk.* intermediates, meta.llama_cpp}."""
  _backend()
  model = load_model(gguf_path)
  try:
    logits, inter = prefill(model, tokens, settings, intermediates=intermediates)
    dec = decode(model, tokens, n_prefill, settings)
    bufs = model.buffer_lines
  finally:
    model.close()
  meta = (
    dataclasses.asdict(settings)
    # With flash attention llama.cpp casts F32 K and V to F16 before ggml_flash_attn_ext (llama-graph.cpp
    # build_attn_mha), so the attention then sees an F16 cache whatever kv_cache says (bit-identical runs).
    | {"kv_effective": "f16" if settings.flash_attn else settings.kv_cache}
    | {"intermediates": intermediates, "use_extra_bufts": False, "model_buffers": list(bufs)}
    | versions()
  )
  return {
    "tokens": np.asarray(tokens, np.int32),  # diff checks them against the golden's
    "logits": logits,
    "decode_logits": dec,
    **inter,
    "meta.llama_cpp": np.array(json.dumps(meta)),
  }


def write_npz(out_path, arrays: dict[str, np.ndarray]) -> None:
  out_path = os.fspath(out_path)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(os.path.abspath(out_path)))
  try:
    with os.fdopen(fd, "wb") as fh:
      np.savez(fh, **arrays)
    os.replace(tmp, out_path)
  except BaseException:
    os.unlink(tmp)
    raise


def golden_tokens(outputs_path) -> tuple[np.ndarray, int]:
  from safetensors import safe_open  # noqa: PLC0415

  with safe_open(os.fspath(outputs_path), "np") as f:
    return f.get_tensor("tokens"), int(f.metadata()["prefill"])


def dump(gguf_path, outputs_path, out_path, settings: Settings = Settings(), *, intermediates: bool = True):
  """Run llama.cpp on a golden GGUF with the tokens of its golden outputs; write the candidate .npz atomically."""
  tokens, n_prefill = golden_tokens(outputs_path)
  arrays = run(gguf_path, tokens, n_prefill, settings, intermediates=intermediates)
  write_npz(out_path, arrays)
  return arrays


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("gguf")
  p.add_argument("--outputs", required=True, help="the golden outputs file whose tokens to run")
  p.add_argument("--out", required=True, help="candidate .npz to write")
  p.add_argument("--threads", type=int, default=1, choices=(1, 2))
  p.add_argument(
    "--kv-cache", default="f16", choices=sorted(_KV_TYPES), help="KV cache type (llama.cpp: f16)"
  )
  p.add_argument("--flash-attn", action="store_true")
  p.add_argument(
    "--ubatch", type=int, default=None, help="prefill in batches of N tokens (n_batch = n_ubatch)"
  )
  p.add_argument("--no-intermediates", action="store_true", help="logits only (no eval callback)")
  a = p.parse_args(argv)
  s = Settings(threads=a.threads, kv_cache=a.kv_cache, flash_attn=a.flash_attn, ubatch=a.ubatch)
  arrays = dump(a.gguf, a.outputs, a.out, s, intermediates=not a.no_intermediates)
  shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items() if not k.startswith("meta."))
  print(f"wrote {a.out} ({s.label}): {shapes}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
