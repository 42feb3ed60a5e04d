"""Model goldens: two mini DeepSeek-V3 models as an HF directory and as GGUF per recipe, with the oracle's
outputs for each GGUF in three emulations.

Layout under goldens/models/<model>/ (documented for engine developers in docs/diff.md):
  hf/config.json, hf/model.safetensors   the weights (bf16 values, stored as bf16); v3-pydoc also has
                                         hf/tokenizer.json, and train/*.json (its training record, with
                                         train/heldout_tokens.json, the text the golden tokens come from).
                                         v3-pydoc's are committed training outputs (dq3jax.train): inputs of
                                         this generator, copied and hash-listed, never regenerated; v3-tiny's
                                         are regenerated from its seed.
  gguf/<RECIPE>.gguf                     deepseek2 GGUF, split MLA layout, current llama.cpp rules; bytes
                                         identical to llama.cpp's converter + llama-quantize
  outputs/<RECIPE><VARIANT>.safetensors  what dq3jax computes from that GGUF, one file per VARIANTS entry:
    ""                  emulation "none": the exact model on the GGUF's dequantized weights
    ".llama-cpu"        emulation "llama-cpu": llama.cpp's CPU activation quantization (act_quant), attention
                        in llama.cpp's order for the layout, F32 KV cache
    ".llama-cpu-f16kv"  the same with llama.cpp's default F16 KV cache (mla.py, kv_cache="f16")
    tensors: tokens [T] int32; logits [T, V] (one pass over all T positions); decode_logits [T-P, V]
    (positions P..T-1, one token at a time through the latent KV cache after the first P);
    blk.<i>.attn_latent [T, kv_lora_rank], blk.<i>.hidden_after_attn [T, d], blk.<i>.hidden_after_mlp [T, d];
    on MoE layers blk.<i>.topk_ids [T, K] int32 (descending biased score), blk.<i>.topk_weights [T, K] and
    blk.<i>.router_scores [T, E] (sigmoid(router x) + e_score_correction_bias, before group masking).
    __metadata__: kind=model-outputs, model, recipe, prefill, emulation (none|llama-cpu), kv_cache (f32|f16).

Every output is evaluated in float64 and rounded once to float32 (llama.cpp's own roundings emulated on the
way: runner.evaluate), so the files are the same bytes on every machine, except possibly at the points
dq3jax.model.undecided flags, which each manifest entry lists under "undecided" (and the generator prints).

The outputs are computed from the GGUF as written (read back through dq3jax.io.gguf_read), so they are what
an engine that loads that file should produce, up to its own rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import tempfile
import zlib

import numpy as np

RECIPES = ("F32", "Q8_0", "Q4_K_M", "Q3_K_M", "DQ3_K_M", "Q2_K")
MODELS = ("v3-pydoc", "v3-tiny")
MODEL_DIR = "models"
LAYOUT = "split"
RULES = "current"
TRAINED = "v3-pydoc"  # its hf/ and train/ files are committed inputs (dq3jax.train)
HELDOUT = "train/heldout_tokens.json"


@dataclasses.dataclass(frozen=True)
class Sizes:
  tokens: int  # T
  prefill: int  # P: decode_logits cover positions P..T-1


SIZES = {"v3-pydoc": Sizes(64, 48), "v3-tiny": Sizes(32, 24)}


@dataclasses.dataclass(frozen=True)
class Variant:
  suffix: str  # outputs/<RECIPE><suffix>.safetensors
  emulation: str  # "none" | "llama-cpu"
  kv_cache: str  # "f32" | "f16"


VARIANTS = (Variant("", "none", "f32"), Variant(".llama-cpu", "llama-cpu", "f32"),
            Variant(".llama-cpu-f16kv", "llama-cpu", "f16"))  # fmt: skip
EMULATIONS = ("none", "llama-cpu")


def default_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parents[1] / "goldens"


def outputs_rel(model: str, recipe: str, variant: Variant = VARIANTS[0]) -> str:
  return f"{MODEL_DIR}/{model}/outputs/{recipe}{variant.suffix}.safetensors"


def _seed_tokens(model: str, vocab: int, t: int) -> np.ndarray:
  rng = np.random.default_rng(zlib.crc32(f"golden-tokens/{model}".encode()))
  return rng.integers(0, vocab, t).astype(np.int32)


def tokens_for(model: str, root: str | pathlib.Path | None = None) -> np.ndarray:
  """The golden token ids [T] of a model: v3-pydoc's first T held-out ids (train/heldout_tokens.json under
  `root`, default the repository's goldens/), v3-tiny's seeded uniform draws over its vocabulary."""
  t = SIZES[model].tokens
  if model == TRAINED:
    path = pathlib.Path(root or default_root()) / MODEL_DIR / model / HELDOUT
    ids = json.loads(path.read_text())["token_ids"]
    if len(ids) < t:
      raise ValueError(f"{path}: {len(ids)} token ids, the goldens need {t}")
    return np.asarray(ids[:t], np.int32)
  from dq3jax.model import presets  # noqa: PLC0415

  return _seed_tokens(model, presets.preset(model).config.vocab_size, t)


# ------------------------------------------------------------------------------------------ outputs


def _override(cfg, route_override, t: int) -> dict:
  """route_override {layer: [T, K]} -> runner's per-layer [1, T, K], every MoE layer given (-1 rows where not
  forced): the goldens and their recomputations run the same compiled code, so unforced rows agree bit for
  bit."""
  route_override = dict(route_override or {})
  out = {}
  for i in range(cfg.num_hidden_layers):
    if not cfg.is_moe_layer(i):
      if route_override.get(i) is not None:
        raise ValueError(f"route_override: layer {i} is dense")
      continue
    ov = route_override.get(i)
    ov = np.full((t, cfg.num_experts_per_tok), -1, np.int32) if ov is None else np.asarray(ov, np.int32)
    out[i] = ov[None]
  return out


def evaluate_gguf(gguf_path, tokens: np.ndarray, *, prefill: int, emulation: str, kv_cache: str,
                  route_override=None):  # fmt: skip
  """runner.evaluate (float64) of a GGUF on tokens [T] in one emulation; route_override {layer: [T, K]}."""
  from dq3jax.io import gguf_read  # noqa: PLC0415
  from dq3jax.io.gguf_act_quant import act_quant_from_gguf  # noqa: PLC0415
  from dq3jax.model import runner  # noqa: PLC0415
  from dq3jax.model.mla import AttnForm  # noqa: PLC0415

  if emulation not in EMULATIONS:
    raise ValueError(f"emulation must be one of {EMULATIONS}, got {emulation!r}")
  cfg, params = gguf_read.load(gguf_path)
  aq = act_quant_from_gguf(gguf_path) if emulation == "llama-cpu" else None
  tokens = np.asarray(tokens, np.int32)
  # "none" runs the form llama.cpp runs a split-layout file in as well: in float64 the form only moves values
  # within the undecided margin, and the F32 recipe's llama-cpu run then shares the compiled layers.
  form = AttnForm.ABSORBED if aq is None and LAYOUT == "split" else None
  return cfg, runner.evaluate(
    params, tokens[None], cfg, decode_from=prefill, form=form, act_quant=aq, kv_cache=kv_cache,
    route_override=_override(cfg, route_override, len(tokens)),
  )  # fmt: skip


_INTERMEDIATES = ("attn_latent", "hidden_after_attn", "hidden_after_mlp", "topk_ids", "topk_weights",
                  "router_scores")  # fmt: skip


def _tensors64(ev, tokens: np.ndarray, prefill: int) -> dict[str, np.ndarray]:
  """The outputs file's tensors before rounding (float64; ints as int32)."""
  out = {"tokens": tokens.astype(np.int32), "logits": ev.logits[0], "decode_logits": ev.decode_logits[0]}
  for i, rec in enumerate(ev.intermediates):
    for key in _INTERMEDIATES:
      if key in rec:
        a = np.asarray(rec[key][0])
        out[f"blk.{i}.{key}"] = a.astype(np.int32) if key == "topk_ids" else a
  return out


def _round(t64: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v if v.dtype == np.int32 else v.astype(np.float32) for k, v in t64.items()}


def undecided_report(ev, t64: dict[str, np.ndarray], prefill: int) -> dict:
  """Every undecided point of one outputs file: {"internal": {kind: [token positions]}, "outputs":
  {tensor: [[token position, element], ...]}, with their counts}. Internal kinds of the decode steps are
  prefixed "decode:"."""
  from dq3jax.model import undecided  # noqa: PLC0415

  internal, n_internal = {}, 0
  for prefix, counts in (("", ev.undecided), ("decode:", ev.decode_undecided or {})):
    for kind, c in sorted(counts.items()):
      per_pos = np.asarray(c).reshape(-1, np.shape(c)[-1]).sum(0)
      if per_pos.sum():
        internal[prefix + kind] = [int(p) for p in np.flatnonzero(per_pos)]
        n_internal += int(per_pos.sum())
  outputs, n_outputs = {}, 0
  for name, a in t64.items():
    if a.dtype != np.float64:
      continue
    hits = np.argwhere(undecided.f32_undecided(a))  # [n, 2] (row, element)
    if len(hits):
      first = prefill if name == "decode_logits" else 0
      outputs[name] = " ".join(f"{int(r) + first}:{int(e)}" for r, e in hits)
      n_outputs += len(hits)
  return {
    "margin": f"2^{int(np.log2(undecided.REL_MARGIN))} of the row's largest magnitude",
    "internal_count": n_internal,
    "output_count": n_outputs,
    "internal": internal,  # kind -> token positions
    "outputs": outputs,  # tensor -> "token:element ..." (token: position in the sequence)
  }


def undecided_elements(report: dict, name: str) -> np.ndarray:
  """[n, 2] (token position, element) of tensor `name`'s undecided elements in an undecided report."""
  text = report["outputs"].get(name, "")
  return np.array([[int(v) for v in p.split(":")] for p in text.split()], np.int64).reshape(-1, 2)


def outputs_of(gguf_path, tokens: np.ndarray, *, prefill: int, emulation: str = "none", kv_cache: str = "f32",
               route_override=None) -> tuple[dict[str, np.ndarray], dict]:  # fmt: skip
  """(the float32 tensors of one outputs file, its undecided report) for a GGUF on tokens [T]."""
  _, ev = evaluate_gguf(gguf_path, tokens, prefill=prefill, emulation=emulation, kv_cache=kv_cache,
                        route_override=route_override)  # fmt: skip
  t64 = _tensors64(ev, np.asarray(tokens), prefill)
  return _round(t64), undecided_report(ev, t64, prefill)


def recompute_outputs(gguf_path, tokens: np.ndarray, *, prefill: int, emulation: str = "none",
                      kv_cache: str = "f32", route_override=None) -> dict[str, np.ndarray]:  # fmt: skip
  """An outputs file's tensors recomputed with forced experts: route_override {layer: [T, K] int32}, rows of
  -1 keeping the model's choice (moe.routing). Without forced rows it is the golden file's content bit for
  bit; forced tokens take those experts (weighted as selected ones), and every later position sees them."""
  return outputs_of(gguf_path, tokens, prefill=prefill, emulation=emulation, kv_cache=kv_cache,
                    route_override=route_override)[0]  # fmt: skip


# ------------------------------------------------------------------------------------------ files


def _sha256(blob: bytes) -> str:
  return hashlib.sha256(blob).hexdigest()


def trained_inputs(root: str | pathlib.Path | None = None) -> dict[str, bytes]:
  """v3-pydoc's committed training outputs under `root` (relative path -> bytes): hf/* and train/*."""
  base = pathlib.Path(root or default_root())
  model_dir = base / MODEL_DIR / TRAINED
  files = {}
  for sub in ("hf", "train"):
    for p in sorted((model_dir / sub).glob("*")):
      if p.is_file():
        files[p.relative_to(base).as_posix()] = p.read_bytes()
  for need in ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", HELDOUT):
    if f"{MODEL_DIR}/{TRAINED}/{need}" not in files:
      raise FileNotFoundError(
        f"{model_dir / need}: missing; v3-pydoc's weights, tokenizer and held-out tokens are committed "
        "training outputs (python -m dq3jax.train), not generated here"
      )
  return files


def _model(model: str, root, tmp: pathlib.Path):
  """(config, float32 params, base manifest entry, [(rel, bytes, entry)] of the hf/ and train/ files)."""
  from dq3jax.io import hf_writer, safetensors_ckpt  # noqa: PLC0415
  from dq3jax.model import presets  # noqa: PLC0415

  if model == TRAINED:
    files = trained_inputs(root)
    hf_dir = pathlib.Path(root or default_root()) / MODEL_DIR / model / "hf"
    cfg, params = safetensors_ckpt.load(str(hf_dir))
    base = {"model": model, "config": cfg.to_hf_config(),
            "description": "trained on Python's documentation (dq3jax.train)"}  # fmt: skip
    listed = []
    for rel, blob in files.items():
      kind = "model-hf-trained" if "/hf/" in rel else "model-train"
      listed.append(
        (rel, blob, base | {"kind": kind, "generator": "committed input (python -m dq3jax.train)"})
      )
    return cfg, params, base, listed
  p = presets.preset(model)
  cfg, params = presets.params_of(model)
  base = {"model": model, "seed": p.seed, "config": cfg.to_hf_config(), "description": p.description}
  hf_writer.save(str(tmp / "hf"), cfg, params, dtype="bfloat16")
  entry = base | {"kind": "model-hf", "generator": "dq3jax.io.hf_writer.save(dtype=bfloat16)"}
  listed = [(f"{MODEL_DIR}/{model}/hf/{n}", (tmp / "hf" / n).read_bytes(), entry)
            for n in ("config.json", "model.safetensors")]  # fmt: skip
  return cfg, params, base, listed


def model_goldens(model: str, progress=None, recipes: tuple[str, ...] = RECIPES, root=None,
                  variants: tuple[Variant, ...] = VARIANTS, outputs_only: bool = False):  # fmt: skip
  """Yields (relative path, bytes, manifest entry without hash) for every golden file of one model (of the
  given recipes and variants). root: where v3-pydoc's committed inputs are read (default: goldens/).
  outputs_only: only the outputs files, computed from the GGUFs under root instead of fresh ones."""
  from dq3jax.convert.quantize import quantize_to_gguf  # noqa: PLC0415
  from dq3jax.convert.sources import ParamsSource  # noqa: PLC0415

  prefix = f"{MODEL_DIR}/{model}"
  with tempfile.TemporaryDirectory(prefix="dq3jax-golden-") as tmp:
    tmp = pathlib.Path(tmp)
    cfg, params, base, listed = _model(model, root, tmp)
    if not outputs_only:
      yield from listed
    tokens = tokens_for(model, root)
    for recipe in recipes:
      gguf_rel = f"{prefix}/gguf/{recipe}.gguf"
      if outputs_only:
        path = pathlib.Path(root or default_root()) / gguf_rel
      else:
        path = tmp / f"{recipe}.gguf"
        res = quantize_to_gguf(
          ParamsSource(params, cfg), path, recipe, rules=RULES, layout=LAYOUT, name=model
        )
        yield (
          gguf_rel,
          path.read_bytes(),
          base
          | {
            "kind": "model-gguf",
            "recipe": recipe,
            "rules": RULES,
            "layout": LAYOUT,
            "bits_per_weight": 8 * res.total_bytes / res.total_params,
            "tensor_types": {t.name: t.type for t in res.tensors},
            "generator": "dq3jax.convert.quantize.quantize_to_gguf",
          },
        )
      for v in variants:
        rel, blob, entry = outputs_file(path, model, recipe, v, tokens)
        if progress is not None and (
          entry["undecided"]["internal_count"] or entry["undecided"]["output_count"]
        ):
          progress(f"{rel}: undecided {describe(entry['undecided'])}")
        yield rel, blob, base | entry
      if progress is not None:
        progress(None)


def outputs_file(gguf_path, model: str, recipe: str, variant: Variant, tokens: np.ndarray):
  """(relative path, bytes, manifest entry fields) of one outputs file computed from gguf_path."""
  from dq3jax.io.safetensors_format import to_bytes  # noqa: PLC0415

  sizes = SIZES[model]
  prefix = f"{MODEL_DIR}/{model}"
  if model == TRAINED:
    tokens_from = {"tokens_source": f"{prefix}/{HELDOUT}", "tokens_first": sizes.tokens}
  else:
    tokens_from = {"tokens_seed": zlib.crc32(f"golden-tokens/{model}".encode())}
  out, report = outputs_of(gguf_path, tokens, prefill=sizes.prefill, emulation=variant.emulation,
                           kv_cache=variant.kv_cache)  # fmt: skip
  meta = {"kind": "model-outputs", "model": model, "recipe": recipe, "prefill": str(sizes.prefill),
          "emulation": variant.emulation, "kv_cache": variant.kv_cache}  # fmt: skip
  entry = tokens_from | {
    "kind": "model-outputs",
    "recipe": recipe,
    "gguf": f"{prefix}/gguf/{recipe}.gguf",
    "prefill": sizes.prefill,
    "emulation": variant.emulation,
    "kv_cache": variant.kv_cache,
    "dtype": "float32 (float64 evaluation, rounded once)",
    "generator": "dq3jax.golden_models.outputs_of",
    "undecided": report,
    "tensors": {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in out.items()},
  }
  return outputs_rel(model, recipe, variant), to_bytes(out, meta), entry


def regenerated_hashes(plan: dict, root=None) -> dict[str, str]:
  """sha256 of freshly regenerated golden files: plan {model: (recipes, outputs_only)}. What the regeneration
  tests run in a subprocess under other XLA flags."""
  hashes = {}
  for model, (recipes, outputs_only) in plan.items():
    for rel, blob, _ in model_goldens(model, recipes=tuple(recipes), root=root, outputs_only=outputs_only):
      hashes[rel] = _sha256(blob)
  return hashes


def describe(report: dict) -> str:
  """One line summarising an undecided report: internal kinds with their tokens, output tensors with counts
  (their elements are in the report)."""
  parts = [f"{k} at token(s) {', '.join(map(str, v))}" for k, v in report["internal"].items()]
  parts += [f"{k} x{len(v.split())}" for k, v in report["outputs"].items()]
  return f"{report['internal_count']} internal, {report['output_count']} output element(s): " + "; ".join(
    parts
  )


if __name__ == "__main__":  # python -m dq3jax.golden_models '{"v3-tiny": [["F32"], false]}' -> JSON hashes
  import sys

  print(json.dumps(regenerated_hashes(json.loads(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)))
