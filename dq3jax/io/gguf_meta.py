"""deepseek2 GGUF metadata: written from a DeepseekV3Config, and read back into one.

Keys and their meaning follow llama.cpp's converter (conversion/deepseek.py + base.py) and its loader
(src/models/deepseek2.cpp, llama-model.cpp, llama-context.cpp) at 0c1e570. Two layouts (see gguf_layout):
  * split (MLA-aware files): head_count_kv 1, key_length r+dr, value_length r, plus key_length_mla dn+dr and
    value_length_mla dv. llama.cpp takes its MLA path exactly when the *_mla keys are present.
  * kv_b (older files): head_count_kv = head_count, key_length dn+dr, value_length dv, no *_mla keys.

llama.cpp's deepseek2 loader cannot express every config the oracle can (it ignores yarn_beta_*, assumes
mscale == mscale_all_dim, uses one norm epsilon); `metadata` refuses those instead of writing a file that
llama.cpp would run differently.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np

from dq3jax.model.config import DeepseekV3Config, RopeConfig, RopeKind

log = logging.getLogger(__name__)

ARCH = "deepseek2"
GATING_SOFTMAX, GATING_SIGMOID = 1, 2
# llama.cpp's deepseek2 loader hard-codes these (it never reads yarn_beta_* for this architecture).
LLAMA_BETA_FAST, LLAMA_BETA_SLOW = 32.0, 1.0


class GGUFMetadataError(ValueError):
  """Metadata missing, contradictory or not representable; the message names the file and key."""


def _k(key: str) -> str:
  return key.format(arch=ARCH)


def check_representable(cfg: DeepseekV3Config) -> None:
  """Raise ValueError when llama.cpp's deepseek2 would compute something else than the oracle for cfg."""

  def bad(msg: str) -> None:
    raise ValueError(f"cannot write a deepseek2 GGUF llama.cpp reads as this model: {msg}")

  if not cfg.rope_interleave:
    bad("rope_interleave=False (llama.cpp's deepseek2 always rotates consecutive pairs)")
  if cfg.latent_norm_eps != cfg.rms_norm_eps:
    bad(
      f"latent_norm_eps {cfg.latent_norm_eps} != rms_norm_eps {cfg.rms_norm_eps} (llama.cpp has one epsilon)"
    )
  r = cfg.rope
  if r.kind is RopeKind.YARN:
    if (r.beta_fast, r.beta_slow) != (LLAMA_BETA_FAST, LLAMA_BETA_SLOW):
      bad(f"yarn beta_fast/beta_slow {r.beta_fast}/{r.beta_slow} (llama.cpp's deepseek2 uses 32/1)")
    if not r.truncate:
      bad("yarn truncate=False")
    if r.attention_factor is not None:
      bad("yarn attention_factor is set")
    got = _llama_rope(r)
    if not (
      math.isclose(got.cos_sin_factor, r.cos_sin_factor, rel_tol=1e-6)
      and math.isclose(got.softmax_mscale, r.softmax_mscale, rel_tol=1e-6)
    ):
      bad(
        f"yarn mscale={r.mscale}, mscale_all_dim={r.mscale_all_dim} (llama.cpp derives mscale from mscale_all_dim)"
      )


def as_written(cfg: DeepseekV3Config) -> DeepseekV3Config:
  """The config `config_from_metadata` reads back from a file written for cfg: keeping every group is written
  as no grouping (the same routing)."""
  if cfg.n_group > 1 and cfg.topk_group == cfg.n_group:
    return dataclasses.replace(cfg, n_group=1, topk_group=1)
  return cfg


def _llama_rope(r: RopeConfig) -> RopeConfig:
  """The RoPE llama.cpp runs for the keys `metadata` writes (llama-context.cpp's yarn_attn_factor logic)."""
  mall = r.mscale_all_dim
  if not mall:
    return RopeConfig(
      kind=r.kind,
      theta=r.theta,
      factor=r.factor,
      original_max_position_embeddings=r.original_max_position_embeddings,
    )
  # llama.cpp assumes mscale = 1, except deepseek2 with mscale_all_dim != 1 where mscale = mscale_all_dim.
  mscale = mall if mall != 1.0 else 1.0
  return RopeConfig(
    kind=r.kind,
    theta=r.theta,
    factor=r.factor,
    original_max_position_embeddings=r.original_max_position_embeddings,
    mscale=mscale,
    mscale_all_dim=mall,
  )


def _vocab(w: gguf.GGUFWriter, n: int) -> None:
  # A minimal SentencePiece-style vocabulary: llama.cpp needs a tokenizer to load a model, dq3jax and the
  # crosschecks feed token ids directly. DeepSeek's BOS/EOS ids are 0/1; byte tokens when there is room, so
  # llama.cpp finds a newline token and every byte can be tokenized. ASCII only: llama.cpp's log lines carry
  # token text, and llama-cpp-python's log callback fails on multi-byte characters split across lines.
  tokens, types = ["<s>", "</s>"], [gguf.TokenType.CONTROL] * 2
  if n >= 258:
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
  tokens += [f"t{i}" for i in range(len(tokens), n)]
  types += [gguf.TokenType.NORMAL] * (n - len(types))
  tokens, types = tokens[:n], types[:n]
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_scores([0.0] * n)
  w.add_token_types(types)
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  w.add_add_bos_token(False)
  w.add_add_eos_token(False)


def metadata(
  w: gguf.GGUFWriter,
  cfg: DeepseekV3Config,
  layout: str,
  *,
  name: str = "dq3jax",
  file_type: int | None = None,
) -> None:
  """Add the deepseek2 keys llama.cpp needs for cfg (see module doc) plus a minimal vocabulary."""
  check_representable(cfg)
  w.add_name(name)
  if file_type is not None:
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  h = cfg.num_attention_heads
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(h)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_leading_dense_block_count(cfg.first_k_dense_replace)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.q_lora_rank is not None:
    w.add_q_lora_rank(cfg.q_lora_rank)
  w.add_kv_lora_rank(cfg.kv_lora_rank)
  if layout == "split":
    w.add_head_count_kv(1)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
  else:
    w.add_head_count_kv(h)
    w.add_key_length(cfg.qk_head_dim)
    w.add_value_length(cfg.v_head_dim)
  w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
  w.add_expert_count(cfg.n_routed_experts)
  w.add_expert_used_count(cfg.num_experts_per_tok)
  w.add_expert_shared_count(cfg.n_shared_experts)
  # llama.cpp asserts expert_group_used_count < expert_group_count; keeping all groups limits nothing, so the
  # keys are left out then (read back as one group).
  if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
  w.add_expert_weights_scale(cfg.routed_scaling_factor)
  w.add_expert_weights_norm(cfg.norm_topk_prob)
  w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
  w.add_rope_dimension_count(cfg.qk_rope_head_dim)
  r = cfg.rope
  w.add_rope_freq_base(r.theta)
  if r.kind is RopeKind.YARN:
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(r.factor)
    w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings)
    w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
    w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
    if r.mscale_all_dim is not None:
      # The converter stores 0.1 * mscale_all_dim; llama.cpp divides by 0.1 again [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX].
      w.add_rope_scaling_yarn_log_mul(0.1 * r.mscale_all_dim)
  _vocab(w, cfg.vocab_size)


# --------------------------------------------------------------------------------------------- reading


K_LLM, K_ATTN, K_ROPE = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope


class _Meta:
  """A file's key/values, read by gguf-py's key templates ("{arch}.block_count") with errors naming the file."""

  def __init__(self, kv: Mapping[str, Any], path: str):
    self.kv, self.path = kv, path

  def has(self, key: str) -> bool:
    return _k(key) in self.kv

  def get(self, key: str, default: Any = KeyError) -> Any:
    full = _k(key)
    if full in self.kv:
      v = self.kv[full]
      # GGUF floats are float32; the shortest decimal that rounds to it gives back the config's 1e-06, 40.0, ...
      return float(str(np.float32(v))) if isinstance(v, float) else v
    if default is KeyError:
      raise GGUFMetadataError(f"{self.path}: required metadata key {full!r} is missing")
    return default


def config_from_metadata(
  kv: Mapping[str, Any],
  tensor_names: set[str],
  *,
  path: str,
  vocab_rows: int | None = None,
  v3_defaults: bool = False,
) -> tuple[DeepseekV3Config, str]:
  """(config, layout) of a deepseek2 GGUF from its key/values and tensor names.

  Keys old files may lack: expert_group_* (then no group limiting, as llama.cpp does), expert_gating_func
  (llama.cpp then uses softmax, which DeepSeek-V3 routing is not: refused unless v3_defaults=True, which
  assumes sigmoid and logs it), expert_weights_scale (1.0, as llama.cpp), expert_weights_norm (False, as
  llama.cpp), leading_dense_block_count (0). YaRN's beta_fast/beta_slow are always llama.cpp's 32/1.
  """
  m = _Meta(kv, path)
  _check_architecture(m)
  layout, qk_head, v_head = _attention_layout(m, tensor_names)
  _check_gating(m, v3_defaults)
  rope_dim = int(m.get(K_ROPE.DIMENSION_COUNT))
  eps = float(m.get(K_ATTN.LAYERNORM_RMS_EPS))
  n_group = int(m.get(K_LLM.EXPERT_GROUP_COUNT, 1))
  q_lora = m.get(K_ATTN.Q_LORA_RANK, None)
  try:
    cfg = DeepseekV3Config(
      vocab_size=_vocab_size(m, vocab_rows),
      hidden_size=int(m.get(K_LLM.EMBEDDING_LENGTH)),
      intermediate_size=int(m.get(K_LLM.FEED_FORWARD_LENGTH)),
      moe_intermediate_size=int(m.get(K_LLM.EXPERT_FEED_FORWARD_LENGTH)),
      # MTP (nextn) layers are counted in block_count but are not part of the forward.
      num_hidden_layers=int(m.get(K_LLM.BLOCK_COUNT)) - int(m.get(K_LLM.NEXTN_PREDICT_LAYERS, 0)),
      num_attention_heads=int(m.get(K_ATTN.HEAD_COUNT)),
      q_lora_rank=None if not q_lora else int(q_lora),
      kv_lora_rank=int(m.get(K_ATTN.KV_LORA_RANK)),
      qk_nope_head_dim=qk_head - rope_dim,
      qk_rope_head_dim=rope_dim,
      v_head_dim=v_head,
      n_routed_experts=int(m.get(K_LLM.EXPERT_COUNT)),
      n_shared_experts=int(m.get(K_LLM.EXPERT_SHARED_COUNT)),
      num_experts_per_tok=int(m.get(K_LLM.EXPERT_USED_COUNT)),
      n_group=n_group,
      topk_group=int(m.get(K_LLM.EXPERT_GROUP_USED_COUNT, 1 if n_group == 1 else n_group)),
      routed_scaling_factor=float(m.get(K_LLM.EXPERT_WEIGHTS_SCALE, 1.0)),
      norm_topk_prob=bool(m.get(K_LLM.EXPERT_WEIGHTS_NORM, False)),
      first_k_dense_replace=int(m.get(K_LLM.LEADING_DENSE_BLOCK_COUNT, 0)),
      rms_norm_eps=eps,
      latent_norm_eps=eps,
      rope=_rope(m),
      max_position_embeddings=int(m.get(K_LLM.CONTEXT_LENGTH)),
      use_router_bias=any(n.endswith("exp_probs_b.bias") for n in tensor_names),
    )
  except ValueError as e:
    raise GGUFMetadataError(f"{path}: metadata describes an invalid model: {e}") from None
  return cfg, layout


def _check_architecture(m: _Meta) -> None:
  arch = m.kv.get(gguf.Keys.General.ARCHITECTURE)
  if arch is None:
    raise GGUFMetadataError(f"{m.path}: required metadata key {gguf.Keys.General.ARCHITECTURE!r} is missing")
  if arch != ARCH:
    raise GGUFMetadataError(f"{m.path}: general.architecture is {arch!r}, dq3jax reads only {ARCH!r}")


def _attention_layout(m: _Meta, tensor_names: set[str]) -> tuple[str, int, int]:
  """(layout, query/key head dim, value head dim): llama.cpp takes its MLA path, the split layout, exactly when
  the *_mla keys are present; the tensors must agree."""
  mla = m.has(K_ATTN.KEY_LENGTH_MLA)
  has_split = any(n.endswith("attn_k_b.weight") for n in tensor_names)
  has_kv_b = any(n.endswith("attn_kv_b.weight") for n in tensor_names)
  if mla and has_kv_b and not has_split:
    raise GGUFMetadataError(
      f"{m.path}: metadata has {_k(K_ATTN.KEY_LENGTH_MLA)!r} (MLA layout) but the file holds "
      "attn_kv_b tensors, not attn_k_b/attn_v_b"
    )
  if not mla and has_split:
    raise GGUFMetadataError(
      f"{m.path}: the file holds attn_k_b/attn_v_b tensors but metadata key {_k(K_ATTN.KEY_LENGTH_MLA)!r} is missing"
    )
  if mla:
    return "split", int(m.get(K_ATTN.KEY_LENGTH_MLA)), int(m.get(K_ATTN.VALUE_LENGTH_MLA))
  return "kv_b", int(m.get(K_ATTN.KEY_LENGTH)), int(m.get(K_ATTN.VALUE_LENGTH))


def _check_gating(m: _Meta, v3_defaults: bool) -> None:
  key = _k(K_LLM.EXPERT_GATING_FUNC)
  gating = m.get(K_LLM.EXPERT_GATING_FUNC, None)
  if gating is None:
    if not v3_defaults:
      raise GGUFMetadataError(
        f"{m.path}: metadata key {key!r} is missing; llama.cpp then routes with "
        "softmax, which is not DeepSeek-V3's sigmoid routing (pass v3_defaults=True to assume sigmoid)"
      )
    log.warning("%s: %s missing, assuming sigmoid (V3 default)", m.path, key)
  elif int(gating) != GATING_SIGMOID:
    raise GGUFMetadataError(
      f"{m.path}: {key} = {gating} (1 = softmax); dq3jax models sigmoid (2) routing only"
    )


def _vocab_size(m: _Meta, vocab_rows: int | None) -> int:
  """vocab_size, else the token list's length, else the embedding's rows (as llama.cpp falls back)."""
  vocab = m.get(K_LLM.VOCAB_SIZE, None)
  if vocab is None:
    tokens = m.kv.get(gguf.Keys.Tokenizer.LIST)
    vocab = len(tokens) if tokens is not None else vocab_rows
  if vocab is None:
    raise GGUFMetadataError(f"{m.path}: cannot tell the vocabulary size (no {_k(K_LLM.VOCAB_SIZE)!r})")
  return int(vocab)


def _rope(m: _Meta) -> RopeConfig:
  theta = float(m.get(K_ROPE.FREQ_BASE, 10000.0))
  scaling = m.get(K_ROPE.SCALING_TYPE, "none")
  if scaling == "yarn":
    log_mul = m.get(K_ROPE.SCALING_YARN_LOG_MUL, None)
    # llama.cpp divides in float32 (so 0.1f / 0.1f is exactly 1).
    mall = None if log_mul is None else float(str(np.float32(log_mul) / np.float32(0.1)))
    return _llama_rope(
      RopeConfig(
        kind=RopeKind.YARN,
        theta=theta,
        factor=float(m.get(K_ROPE.SCALING_FACTOR)),
        original_max_position_embeddings=int(
          m.get(K_ROPE.SCALING_ORIG_CTX_LEN, int(m.get(K_LLM.CONTEXT_LENGTH)))
        ),
        mscale_all_dim=mall,
      )
    )
  if scaling in ("none", "linear") and float(m.get(K_ROPE.SCALING_FACTOR, 0.0)) in (0.0, 1.0):
    return RopeConfig(kind=RopeKind.DEFAULT, theta=theta)
  raise GGUFMetadataError(f"{m.path}: {_k(K_ROPE.SCALING_TYPE)} = {scaling!r} is not supported")
