"""Model goldens: a built-in seeded mini DeepSeek-V3 as an HF directory and as GGUF per recipe, with the
oracle's outputs for each GGUF (prefill and decode logits, per-layer intermediates).

Layout under goldens/models/<model>/ (documented for engine developers in docs/diff.md):
  hf/config.json, hf/model.safetensors   the weights (bf16 values, stored as bf16)
  gguf/<RECIPE>.gguf                     deepseek2 GGUF, split MLA layout, current llama.cpp rules; bytes
                                         identical to llama.cpp's converter + llama-quantize
  outputs/<RECIPE>.safetensors           what dq3jax computes from that GGUF (float32):
    tokens [T] int32; logits [T, V] (one prefill over all T positions); decode_logits [T-P, V]
    (positions P..T-1: a prefill of P tokens, then one token at a time through the latent KV cache);
    blk.<i>.attn_latent [T, kv_lora_rank], blk.<i>.hidden_after_attn [T, d], blk.<i>.hidden_after_mlp [T, d];
    on MoE layers blk.<i>.topk_ids [T, K] int32 (descending biased score) and blk.<i>.topk_weights [T, K];
    logits_q8act [T, V] and decode_logits_q8act [T-P, V]: the same with llama.cpp's CPU activation
    quantization emulated (dq3jax.model.act_quant: each matmul's input rounded through the weight type's
    vec_dot_type, attention in the file's layout order), the golden a llama.cpp-style engine is held to.

The outputs are computed from the GGUF as written (read back through dq3jax.io.gguf_read), so they are what
an engine that loads that file should produce, up to its own rounding.
"""

from __future__ import annotations

import pathlib
import tempfile
import zlib

import numpy as np

RECIPES = ("F32", "Q8_0", "Q4_K_M", "Q3_K_M", "DQ3_K_M", "Q2_K")
MODELS = ("v3-mini-256", "v3-tiny")
TOKENS = 32  # T
PREFILL = 24  # P: decode_logits cover positions P..T-1
MODEL_DIR = "models"
LAYOUT = "split"
RULES = "current"


def tokens_for(model: str, vocab: int) -> np.ndarray:
  """The golden token ids [T] of a model: seeded uniform draws over the vocabulary."""
  rng = np.random.default_rng(zlib.crc32(f"golden-tokens/{model}".encode()))
  return rng.integers(0, vocab, TOKENS).astype(np.int32)


def outputs_of(gguf_path, tokens: np.ndarray) -> dict[str, np.ndarray]:
  """The oracle's float32 outputs for one GGUF file on tokens [T]."""
  from dq3jax.io import gguf_read  # noqa: PLC0415
  from dq3jax.model import runner  # noqa: PLC0415
  from dq3jax.model.act_quant import act_quant_from_gguf  # noqa: PLC0415

  cfg, params = gguf_read.load(gguf_path)
  batch = tokens[None]  # [1, T]
  logits, inter = runner.logits(params, batch, cfg, intermediates=True)
  decode = runner.incremental_logits(params, batch, cfg, prefill=PREFILL)
  out = {
    "tokens": tokens.astype(np.int32),
    "logits": np.asarray(logits[0], np.float32),
    "decode_logits": np.asarray(decode[0, PREFILL:], np.float32),
  }
  aq = act_quant_from_gguf(gguf_path)
  out["logits_q8act"] = np.asarray(runner.logits(params, batch, cfg, act_quant=aq)[0], np.float32)
  decode_aq = runner.incremental_logits(params, batch, cfg, prefill=PREFILL, act_quant=aq)
  out["decode_logits_q8act"] = np.asarray(decode_aq[0, PREFILL:], np.float32)
  for i, rec in enumerate(inter):
    for key in ("attn_latent", "hidden_after_attn", "hidden_after_mlp", "topk_ids", "topk_weights"):
      if key in rec:
        a = np.asarray(rec[key][0])
        out[f"blk.{i}.{key}"] = a.astype(np.int32 if key == "topk_ids" else np.float32)
  return out


def model_goldens(model: str, progress=None, recipes: tuple[str, ...] = RECIPES):
  """Yields (relative path, bytes, manifest entry without hash) for every golden file of one model (of the
  given recipes)."""
  from dq3jax.convert.quantize import quantize_to_gguf  # noqa: PLC0415
  from dq3jax.convert.sources import ParamsSource  # noqa: PLC0415
  from dq3jax.io import hf_writer  # noqa: PLC0415
  from dq3jax.io.safetensors_format import to_bytes  # noqa: PLC0415
  from dq3jax.model import presets  # noqa: PLC0415

  p = presets.preset(model)
  cfg, params = presets.params_of(model)
  hf_config = cfg.to_hf_config()
  base = {"model": model, "seed": p.seed, "config": hf_config, "description": p.description}
  prefix = f"{MODEL_DIR}/{model}"
  tokens = tokens_for(model, cfg.vocab_size)
  with tempfile.TemporaryDirectory(prefix="dq3jax-golden-") as tmp:
    tmp = pathlib.Path(tmp)
    hf_writer.save(str(tmp / "hf"), cfg, params, dtype="bfloat16")
    for name in ("config.json", "model.safetensors"):
      entry = base | {"kind": "model-hf", "generator": "dq3jax.io.hf_writer.save(dtype=bfloat16)"}
      yield f"{prefix}/hf/{name}", (tmp / "hf" / name).read_bytes(), entry
    for recipe in recipes:
      path = tmp / f"{recipe}.gguf"
      res = quantize_to_gguf(ParamsSource(params, cfg), path, recipe, rules=RULES, layout=LAYOUT, name=model)
      types = {t.name: t.type for t in res.tensors}
      yield (
        f"{prefix}/gguf/{recipe}.gguf",
        path.read_bytes(),
        base
        | {
          "kind": "model-gguf",
          "recipe": recipe,
          "rules": RULES,
          "layout": LAYOUT,
          "bits_per_weight": 8 * res.total_bytes / res.total_params,
          "tensor_types": types,
          "generator": "dq3jax.convert.quantize.quantize_to_gguf",
        },
      )
      out = outputs_of(path, tokens)
      meta = {"kind": "model-outputs", "model": model, "recipe": recipe, "prefill": str(PREFILL)}
      yield (
        f"{prefix}/outputs/{recipe}.safetensors",
        to_bytes(out, meta),
        base
        | {
          "kind": "model-outputs",
          "recipe": recipe,
          "gguf": f"{prefix}/gguf/{recipe}.gguf",
          "prefill": PREFILL,
          "tokens_seed": zlib.crc32(f"golden-tokens/{model}".encode()),
          "dtype": "float32",
          "generator": "dq3jax.golden_models.outputs_of",
          "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in out.items()},
        },
      )
      if progress is not None:
        progress(f"{model} {recipe}")
