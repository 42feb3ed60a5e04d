"""Seeded training of a DeepSeek-V3 config with dq3jax's own forward (float32), V3-style expert balancing.

The loss is next-token cross-entropy of `transformer.forward` itself, so the weights are exactly for the
architecture the oracle evaluates (the forward runs every routed expert densely and weights the K selected
ones; the E/K extra compute is cheaper than verifying a second, sparse formulation). On top:

* auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): the selection bias `router_bias`
  (e_score_correction_bias) gets no gradient; after each step every MoE layer's bias moves by
  -gamma * sign(load_e - mean load), load_e = how many of the step's token slots expert e received.
* V3's sequence-wise balance loss, alpha * sum_e f_e P_e per sequence (f_e = E / (K T) * tokens routed to
  e, P_e = mean over the sequence of e's sigmoid score normalised over all experts), with a tiny alpha.

Batches are windows of seq_len + 1 tokens at offsets drawn from numpy's PCG64 seeded with spec.seed, so a
run is a pure function of (config, spec, token stream) on one machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dq3jax.model import transformer
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.layers import linear, rms_norm
from dq3jax.model.random_init import init_params
from dq3jax.train import optim
from dq3jax.train.spec import TrainSpec


def initial_params(cfg: DeepseekV3Config, seed: int) -> dict:
  """random_init's fan-in scaled weights, made a usual starting point for training: norm weights 1, a zero
  selection bias (as V3 starts), and the projections that write into the residual stream (wo, w_down)
  scaled by 1/sqrt(2 L) so the residual does not grow with depth at initialisation."""
  p = init_params(cfg, seed)
  out_scale = np.float32(1.0 / np.sqrt(2 * cfg.num_hidden_layers))

  def fix(path, a):
    key = getattr(path[-1], "key", None)
    if key in ("attn_norm", "ffn_norm", "q_norm", "kv_norm", "norm"):
      return np.ones_like(a)
    if key == "router_bias":
      return np.zeros_like(a)
    if key in ("wo", "w_down"):
      return a * out_scale
    return a

  return jax.tree_util.tree_map(jnp.asarray, jax.tree_util.tree_map_with_path(fix, p))


def _moe_layers(cfg: DeepseekV3Config) -> list[int]:
  return [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


def loss_fn(params: dict, batch: jax.Array, cfg: DeepseekV3Config, spec: TrainSpec):
  """batch int32 [B, T+1] -> (loss, aux): aux has ce, balance loss and per-MoE-layer expert loads [L, E]."""
  inputs, targets = batch[:, :-1], batch[:, 1:]
  out = transformer.forward(params, inputs, cfg, intermediates=True)
  logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  ce = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
  e, k, t = cfg.n_routed_experts, cfg.num_experts_per_tok, inputs.shape[1]
  balance, loads = jnp.zeros(()), []
  for i in _moe_layers(cfg):
    lp, rec = params["layers"][i], out.intermediates[i]
    hits = jax.nn.one_hot(rec["topk_ids"], e, dtype=jnp.float32).sum(-2)  # [B, T, E] 0/1
    loads.append(hits.sum((0, 1)))
    # The router's scores, recomputed from the layer's input as moe.route computes them.
    x = rms_norm(rec["hidden_after_attn"], lp["ffn_norm"], cfg.rms_norm_eps)
    s = jax.nn.sigmoid(linear(x, lp["mlp"]["router"]))  # [B, T, E]
    p_e = jnp.mean(s / jnp.sum(s, -1, keepdims=True), axis=1)  # [B, E]
    f_e = hits.sum(1) * (e / (k * t))  # [B, E]
    balance = balance + jnp.mean(jnp.sum(f_e * p_e, -1))
  loss = ce + spec.seq_aux_alpha * balance
  return loss, {"ce": ce, "balance": balance, "loads": jnp.stack(loads)}


def balance_bias(params: dict, loads: jax.Array, cfg: DeepseekV3Config, gamma: float) -> dict:
  """bias_e -= gamma * sign(load_e - mean load) in every MoE layer (loads [L_moe, E])."""
  layers = list(params["layers"])
  for row, i in enumerate(_moe_layers(cfg)):
    mlp = dict(layers[i]["mlp"])
    load = loads[row]
    mlp["router_bias"] = mlp["router_bias"] - gamma * jnp.sign(load - jnp.mean(load))
    layers[i] = {**layers[i], "mlp": mlp}
  return {**params, "layers": layers}


def make_step(cfg: DeepseekV3Config, spec: TrainSpec) -> Callable:
  """jit(step)(params, opt_state, batch [B, T+1], step) -> (params, opt_state, metrics)."""

  def step(params, opt_state, batch, i):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, cfg, spec)
    params, opt_state, stats = optim.update(spec, params, grads, opt_state, i)
    params = balance_bias(params, aux["loads"], cfg, spec.bias_gamma)
    loads = aux["loads"]
    imbalance = jnp.max(loads, -1) / jnp.mean(loads, -1)  # [L_moe] max / mean load
    metrics = {"loss": loss, "ce": aux["ce"], "balance": aux["balance"], "loads": loads}
    return params, opt_state, {**metrics, "max_over_mean_load": imbalance, **stats}

  return jax.jit(step)


def batches(stream: np.ndarray, spec: TrainSpec):
  """Deterministic [B, T+1] int32 windows of the token stream, one array per step."""
  rng = np.random.default_rng(spec.seed)
  span = spec.seq_len + 1
  if stream.size <= span:
    raise ValueError(f"token stream of {stream.size} tokens is shorter than a window ({span})")
  for _ in range(spec.steps):
    starts = rng.integers(0, stream.size - span + 1, size=spec.batch)
    yield np.stack([stream[s : s + span] for s in starts]).astype(np.int32)


def train(
  cfg: DeepseekV3Config,
  spec: TrainSpec,
  stream: np.ndarray,
  *,
  evaluate: Callable[[dict], float] | None = None,
  log: Callable[[str], None] = print,
) -> tuple[dict, list[dict]]:
  """(final float32 params, history): one history row every spec.eval_every steps and at the end, with
  the mean training loss since the previous row and, given `evaluate(params) -> loss`, a held-out loss."""
  params = initial_params(cfg, spec.seed)
  opt_state = optim.init(params)
  step = make_step(cfg, spec)
  history, window, t0 = [], [], time.perf_counter()
  for i, batch in enumerate(batches(stream, spec)):
    params, opt_state, m = step(params, opt_state, jnp.asarray(batch), jnp.asarray(i, jnp.int32))
    window.append(float(m["ce"]))
    last = i + 1 == spec.steps
    if (i + 1) % spec.eval_every == 0 or last or i == 0:
      row = {
        "step": i + 1,
        "train_ce": float(np.mean(window)),
        "lr": float(m["lr"]),
        "grad_norm": float(m["grad_norm"]),
        "max_over_mean_load": [round(float(x), 3) for x in m["max_over_mean_load"]],
        "wall_s": round(time.perf_counter() - t0, 1),
      }
      if evaluate is not None:
        row["heldout_ce"] = float(evaluate(params))
      history.append(row)
      window = []
      log(
        f"step {row['step']:5d}/{spec.steps}  train ce {row['train_ce']:.4f}"
        + (f"  held-out ce {row['heldout_ce']:.4f}" if "heldout_ce" in row else "")
        + f"  lr {row['lr']:.2e}  load max/mean {row['max_over_mean_load']}  {row['wall_s']:.0f}s"
      )
  return jax.tree_util.tree_map(np.asarray, params), history
