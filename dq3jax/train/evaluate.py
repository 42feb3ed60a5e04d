"""What a trained (or random) model looks like to an engine test: perplexity, next-token sharpness, and how
far its routing decisions are from a tie.

Everything runs through `transformer.forward` in float32. Perplexity cuts a token stream into
non-overlapping windows of `window` tokens, each evaluated from position 0, and scores positions 1..window-1
of every window (exp of the mean negative log-likelihood).

Router margins, per MoE layer and token, on the biased selection score c = sigmoid(router x) + bias:
  * group margin: the topk_group-th largest group score minus the next one (a group's score is the sum of
    its two best c), i.e. how far the token is from swapping a selected group for an unselected one;
  * expert margin: among the experts of the kept groups, the K-th largest c minus the (K+1)-th.
A margin below the error an engine's arithmetic or a quantized weight adds to c flips an expert. The
scores are recomputed from the layer's input (hidden_after_attn); `selection_agrees` is the fraction of
tokens whose recomputed top-K set equals the forward's own topk_ids (1.0 unless ties are closer than
float32 rounding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dq3jax.model import transformer
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import linear, rms_norm

PERCENTILES = (0, 1, 5, 10, 50)
THRESHOLDS = (1e-4, 1e-3, 1e-2)


def windows(stream: np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
  n = stream.size // window if max_windows is None else min(stream.size // window, max_windows)
  if n < 1:
    raise ValueError(f"{stream.size} tokens: fewer than one window of {window}")
  return np.asarray(stream[: n * window], np.int32).reshape(n, window)


@functools.partial(jax.jit, static_argnums=(2,))
def _forward(params, tokens, cfg):
  out = transformer.forward(params, tokens, cfg, intermediates=True)
  return out.logits, out.intermediates


def _chunks(tokens: np.ndarray, chunk: int):
  for s in range(0, tokens.shape[0], chunk):
    yield tokens[s : s + chunk]


def next_token(params: dict, cfg: DeepseekV3Config, tokens: np.ndarray, chunk: int = 8) -> dict:
  """tokens [N, W] -> per predicted position: nll, top-1 probability, whether top-1 is the next token."""
  nll, top1, hit = [], [], []
  for part in _chunks(tokens, chunk):
    logits, _ = _forward(params, jnp.asarray(part), cfg)
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)[:, :-1]
    target = part[:, 1:]
    nll.append(-np.take_along_axis(logp, target[..., None], -1)[..., 0].ravel())
    top1.append(np.exp(logp.max(-1)).ravel())
    hit.append((logp.argmax(-1) == target).ravel())
  return {"nll": np.concatenate(nll), "top1_prob": np.concatenate(top1), "top1_hit": np.concatenate(hit)}


def perplexity(params: dict, cfg: DeepseekV3Config, tokens: np.ndarray) -> float:
  return float(np.exp(np.mean(next_token(params, cfg, tokens)["nll"])))


def next_token_summary(params: dict, cfg: DeepseekV3Config, tokens: np.ndarray) -> dict:
  r = next_token(params, cfg, tokens)
  return {
    "windows": int(tokens.shape[0]),
    "window": int(tokens.shape[1]),
    "predicted_tokens": int(r["nll"].size),
    "mean_nll": float(np.mean(r["nll"])),
    "perplexity": float(np.exp(np.mean(r["nll"]))),
    "top1_accuracy": float(np.mean(r["top1_hit"])),
    "median_top1_prob": float(np.median(r["top1_prob"])),
    "mean_top1_prob": float(np.mean(r["top1_prob"])),
  }


def _layer_margins(lp: dict, rec: dict, cfg: DeepseekV3Config) -> dict:
  """Margins [N] of one MoE layer from its input, plus the recomputed selection's agreement."""
  x = rms_norm(rec["hidden_after_attn"], lp["ffn_norm"], cfg.rms_norm_eps)
  x = np.asarray(x, np.float32).reshape(-1, cfg.hidden_size)
  s = np.asarray(jax.nn.sigmoid(linear(jnp.asarray(x), jnp.asarray(lp["mlp"]["router"]))), np.float64)
  c = s + np.asarray(lp["mlp"]["router_bias"], np.float64)  # [N, E] biased selection score
  n, g, k = c.shape[0], cfg.n_group, cfg.num_experts_per_tok
  grouped = c.reshape(n, g, cfg.experts_per_group)
  if g > 1:
    group_score = -np.sort(-grouped, -1)[..., :2].sum(-1)  # [N, G]
    order = np.argsort(-group_score, -1, kind="stable")
    ranked = np.take_along_axis(group_score, order, -1)
    group_margin = ranked[:, cfg.topk_group - 1] - ranked[:, cfg.topk_group]
    keep = np.zeros((n, g), bool)
    np.put_along_axis(keep, order[:, : cfg.topk_group], True, -1)
    eligible = np.where(keep[:, :, None], grouped, -np.inf).reshape(n, -1)
  else:
    group_margin = None
    eligible = c
  ranked_e = -np.sort(-eligible, -1)
  expert_margin = ranked_e[:, k - 1] - ranked_e[:, k]
  chosen = np.sort(np.argsort(-eligible, -1, kind="stable")[:, :k], -1)
  forward_ids = np.sort(np.asarray(rec["topk_ids"]).reshape(n, k), -1)
  load = np.bincount(np.asarray(rec["topk_ids"]).ravel(), minlength=cfg.n_routed_experts)
  return {
    "expert": expert_margin,
    "group": group_margin,
    "agrees": np.all(chosen == forward_ids, -1),
    "load": load,
  }


def _distribution(m: np.ndarray) -> dict:
  out = {f"p{p}" if p else "min": float(np.percentile(m, p)) for p in PERCENTILES}
  out.update({f"frac_below_{t:g}": float(np.mean(m < t)) for t in THRESHOLDS})
  return out


def router_margins(params: dict, cfg: DeepseekV3Config, tokens: np.ndarray, chunk: int = 8) -> dict:
  """Per MoE layer (GGUF blk index): margin distributions, selection agreement and expert load."""
  acc: dict[int, list[dict]] = {}
  for part in _chunks(tokens, chunk):
    _, recs = _forward(params, jnp.asarray(part), cfg)
    for i, lp in enumerate(params["layers"]):
      if cfg.is_moe_layer(i):
        acc.setdefault(i, []).append(_layer_margins(lp, recs[i], cfg))
  out = {}
  for i, parts in acc.items():
    load = np.sum([p["load"] for p in parts], 0)
    share = load / load.sum()
    layer = {
      "tokens": int(sum(p["expert"].size for p in parts)),
      "expert_margin": _distribution(np.concatenate([p["expert"] for p in parts])),
      "selection_agrees": float(np.mean(np.concatenate([p["agrees"] for p in parts]))),
      "expert_load_share": [round(float(x), 4) for x in share],
      "load_max_over_mean": float(share.max() * share.size),
      "load_min_over_mean": float(share.min() * share.size),
    }
    if parts[0]["group"] is not None:
      layer["group_margin"] = _distribution(np.concatenate([p["group"] for p in parts]))
    out[f"blk.{i}"] = layer
  return out
