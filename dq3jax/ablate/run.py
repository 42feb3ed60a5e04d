"""The ablation itself: quantize a (truncated) model with several recipes, run each on the same tokens, and
compare its logits with the unquantized model's, with llama-perplexity's statistics.

Everything a user can get wrong is checked by `setup` before any weight is quantized (recipe names, rules,
shape fallbacks llama.cpp rejects, the importance matrix, truncation, token files, the tokenizer); `run`
then does the work and returns frozen results. Nothing here prints.

Evaluation tokens, in order of preference:
  * `text`: a text file tokenized with the checkpoint's tokenizer.json, cut into windows of `ctx` tokens;
  * `tokens`: a .npy of token ids, [T] (a stream, cut like text) or [B, T] (used as is);
  * otherwise sampled from the unquantized model itself (seeded, temperature 1, a random first token). A
    model without text (the embedded random-weight default) has no "right" next token; sampling makes the
    next token a draw from the base model's own distribution, so Δp and the perplexity ratio measure how
    much probability the quantized model gives to what the base model would say. Uniformly random ids
    would make both meaningless (every model is equally wrong on noise).
Statistics use every position that has a next token: logits[:, :-1] against tokens[:, 1:] (llama-perplexity
scores only the second half of each window; with short windows that would discard half the data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dq3jax.ablate import roundtrip, sensitivity
from dq3jax.ablate.roundtrip import Prepared, TensorCache, TensorInfo
from dq3jax.compare.logit_stats import LogitStats, logit_stats
from dq3jax.convert.sources import ParamsSource
from dq3jax.io import gguf_layout
from dq3jax.io.imatrix import Imatrix, read_imatrix
from dq3jax.model import presets, runner, transformer
from dq3jax.model.config import DeepseekV3Config
from dq3jax.model.mla import AttnForm

DEFAULT_RECIPES = ("F32", "Q8_0", "Q4_K_M", "Q3_K_M", "DQ3_K_M", "Q2_K")
"""Recipes ablated when `--recipes` is not given: the unquantized model, then from most to fewest bits."""
BUILTIN_PREFIX = "builtin:"
"""A `checkpoint` starting with this names a built-in random-weight preset (`builtin:v3-tiny`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblationSpec:
  """What to ablate; every field maps to one `dq3jax ablate` option."""

  checkpoint: str | None = None  # HF directory, "builtin:NAME", or None for the embedded default
  recipes: tuple[str, ...] = DEFAULT_RECIPES
  layers: int | None = None
  experts: int | None = None
  tokens: str | None = None  # .npy of token ids
  text: str | None = None  # text file, tokenized with the checkpoint's tokenizer.json
  tokens_are_text: bool = True  # False: --tokens are not a real sequence; no Δp / perplexity
  ctx: int = 128  # window length for streams; length of sampled sequences
  sequences: int = 8  # sampled sequences; at most this many windows of a stream
  seed: int = 0
  rules: str = "current"
  layout: str = "split"
  imatrix: str | None = None
  sensitivity: bool = False
  sensitivity_type: str = "Q2_K"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalTokens:
  """The tokens every model was scored on: where they came from and a hash (the array itself is not kept)."""

  kind: str  # "sampled" | "text" | "tokens"
  description: str
  shape: tuple[int, int]  # [B, T]
  next_token_stats: bool  # Δp and perplexity are meaningful
  sha256: str  # of the int32 [B, T] array, to tell runs on the same tokens apart from others


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelInfo:
  """The (truncated) model the recipes were applied to."""

  name: str  # "builtin:v3-mini-256" or the checkpoint directory
  description: str
  layers: int
  dense_layers: int
  experts: int
  hidden: int
  vocab: int
  params: int  # of the truncated model, as the GGUF would hold it


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecipeResult:
  """One recipe: its size, its logit statistics against the unquantized model and its time."""

  recipe: str
  description: str
  bits_per_weight: float  # total bytes * 8 / total params, norms and routers included (llama.cpp's BPW)
  bytes: int
  params: int
  tensors: tuple[TensorInfo, ...]
  stats: LogitStats
  quantize_s: float  # quantize + dequantize + rebuild (tensors shared with earlier recipes are reused)
  forward_s: float

  @property
  def mib(self) -> float:
    """Size in MiB (2**20 bytes)."""
    return self.bytes / 2**20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timings:
  """Wall-clock seconds of the run's phases; the report's `timings` uses these names as keys."""

  load_s: float
  sample_s: float  # 0 unless tokens were sampled
  base_forward_s: float  # includes the forward pass's XLA compilation
  quantize_s: float  # all recipes (includes the kernels' XLA compilation)
  forward_s: float  # all recipes
  sensitivity_s: float
  total_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblationResult:
  """Everything one `run` found; `report` renders it as Markdown, JSON and plots."""

  model: ModelInfo
  rules: str
  layout: str
  imatrix: str | None
  tokens: EvalTokens
  recipes: tuple[RecipeResult, ...]
  sensitivity: sensitivity.SensitivityResult | None
  timings: Timings


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """A validated spec: the model's config, its token array (None: to be sampled) and the checked recipes."""

  spec: AblationSpec
  config: DeepseekV3Config
  model_name: str
  model_description: str
  directory: str | None  # HF checkpoint, None for a built-in model
  tokens: np.ndarray | None  # int32 [B, T]
  token_kind: str
  token_description: str
  imatrix: Imatrix | None
  recipes: tuple[Prepared, ...]
  units: tuple[sensitivity.Unit, ...]
  sensitivity_type: str | None


class _ConfigOnly:
  """A weight source that has a config but no weights: planning and job creation never read weights, so
  validating with it fails fast without loading a checkpoint."""

  def __init__(self, config: DeepseekV3Config):
    self.config = config

  def get(self, path, expert=None):
    raise RuntimeError("validation source has no weights")


def setup(spec: AblationSpec) -> Setup:
  """Resolve and check everything; ValueError (naming the bad input) before any quantization work."""
  if not spec.recipes:
    raise ValueError("--recipes: no recipe given")
  if len(set(spec.recipes)) != len(spec.recipes):
    raise ValueError(f"--recipes: duplicate names in {','.join(spec.recipes)}")
  if spec.ctx < 2:
    raise ValueError(f"--ctx {spec.ctx}: need at least 2 tokens per sequence")
  if spec.sequences < 1:
    raise ValueError(f"--sequences {spec.sequences}: need at least 1")
  if spec.tokens and spec.text:
    raise ValueError("give --tokens or --text, not both")
  full, name, description, directory = _model_config(spec.checkpoint)
  cfg = _truncate(full, spec.layers, spec.experts)
  tokens, kind, tdesc = _eval_tokens(spec, cfg, directory)
  imatrix = read_imatrix(spec.imatrix) if spec.imatrix else None
  probe = _ConfigOnly(cfg)
  prepared = tuple(
    roundtrip.prepare(probe, r, rules=spec.rules, layout=spec.layout, imatrix=imatrix) for r in spec.recipes
  )
  units: tuple[sensitivity.Unit, ...] = ()
  low = None
  if spec.sensitivity:
    low = sensitivity.check_type(spec.sensitivity_type)
    units = tuple(sensitivity.units(gguf_layout.tensors(cfg, spec.layout), cfg.num_hidden_layers))
    for u in units:
      roundtrip.prepare(
        probe, sensitivity.unit_recipe(u, low), rules=spec.rules, layout=spec.layout, imatrix=imatrix
      )
  return Setup(
    spec=spec,
    config=cfg,
    model_name=name,
    model_description=description,
    directory=directory,
    tokens=tokens,
    token_kind=kind,
    token_description=tdesc,
    imatrix=imatrix,
    recipes=prepared,
    units=units,
    sensitivity_type=low,
  )


def run(spec: AblationSpec | Setup, *, params: dict | None = None, progress: bool = False) -> AblationResult:
  """The ablation: per recipe quantize, run and compare; optionally the sensitivity map.

  params: float32 weights to use instead of the checkpoint's (same config, already truncated), e.g. a
  modified copy for an experiment. Progress bars (tqdm, stderr) only with progress=True."""
  clock = _Clock()  # started before `setup`: total_s includes the checks when given a bare spec
  s = spec if isinstance(spec, Setup) else setup(spec)
  with clock("load"):
    params = _load_params(s) if params is None else params
  base = _baseline(s, params, clock)
  recipes = tuple(
    _ablate_recipe(s, checked.recipe, base)
    for checked in tqdm(s.recipes, desc="recipes", unit="recipe", disable=not progress)
  )
  with clock("sensitivity"):
    sens = _sensitivity(s, base, progress) if s.units else None
  return _result(s, base, recipes, sens, clock)


def score(base: np.ndarray, q: np.ndarray, tokens: np.ndarray, next_stats: bool) -> LogitStats:
  """llama-perplexity's statistics over every position that has a next token."""
  v = base.shape[-1]
  nxt = np.asarray(tokens)[:, 1:].reshape(-1) if next_stats else None
  return logit_stats(base[:, :-1].reshape(-1, v), q[:, :-1].reshape(-1, v), nxt)


# -------------------------------------------------------------------------------------------- run steps


class _Clock:
  """Wall-clock seconds of named phases: `with clock("load"):` adds the block's time to phase "load";
  `clock["load"]` reads it (0 for a phase never entered) and `clock.total()` is the time since the clock
  was made."""

  def __init__(self):
    self._start = time.perf_counter()
    self._seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, phase: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self._seconds[phase] = self._seconds.get(phase, 0.0) + time.perf_counter() - t

  def __getitem__(self, phase: str) -> float:
    return self._seconds.get(phase, 0.0)

  def total(self) -> float:
    return time.perf_counter() - self._start


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Baseline:
  """What every quantized model of one run is built from and compared with."""

  source: ParamsSource  # the unquantized weights
  tokens: np.ndarray  # int32 [B, T]
  logits: np.ndarray  # [B, T, V] of the unquantized model
  next_stats: bool  # Δp and perplexity are meaningful
  cache: TensorCache  # quantized tensors, shared by the recipes and sensitivity units that agree on one


def _baseline(s: Setup, params: dict, clock: _Clock) -> _Baseline:
  """The evaluation tokens (sampled from the unquantized model unless the setup has them) and the
  unquantized model's logits on them; timed as phases "sample" (only when sampling) and "base_forward"."""
  cfg, spec = s.config, s.spec
  source = ParamsSource(params, cfg)
  tokens = s.tokens
  if tokens is None:
    with clock("sample"):
      tokens = sample_tokens(params, cfg, sequences=spec.sequences, length=spec.ctx, seed=spec.seed)
  with clock("base_forward"):
    logits = runner.logits(params, tokens, cfg)  # [B, T, V]
  return _Baseline(
    source=source,
    tokens=tokens,
    logits=logits,
    next_stats=s.token_kind != "tokens" or spec.tokens_are_text,
    cache=TensorCache(),
  )


def _plan(s: Setup, source: ParamsSource, recipe) -> Prepared:
  """A recipe resolved against the real weights with the run's rules, layout and importance matrix."""
  return roundtrip.prepare(source, recipe, rules=s.spec.rules, layout=s.spec.layout, imatrix=s.imatrix)


def _ablate_recipe(s: Setup, recipe, base: _Baseline) -> RecipeResult:
  """One recipe: plan it, quantize and rebuild the weights (timed), run the quantized model (timed) and score
  its logits against the baseline's. Planning is not in either time."""
  prep = _plan(s, base.source, recipe)
  clock = _Clock()
  with clock("quantize"):
    qparams = roundtrip.build_params(prep, cache=base.cache)
  with clock("forward"):
    logits = runner.logits(qparams, base.tokens, s.config)
  infos = prep.tensors
  total_bytes = sum(i.bytes for i in infos)
  total_params = sum(i.params for i in infos)
  return RecipeResult(
    recipe=prep.recipe.name,
    description=prep.recipe.description,
    bits_per_weight=8 * total_bytes / total_params,
    bytes=total_bytes,
    params=total_params,
    tensors=infos,
    stats=score(base.logits, logits, base.tokens, base.next_stats),
    quantize_s=clock["quantize"],
    forward_s=clock["forward"],
  )


def _sensitivity(s: Setup, base: _Baseline, progress: bool) -> sensitivity.SensitivityResult:
  """The sensitivity map: every unit measured on its own, ranked by the damage it does."""
  out = [
    _ablate_unit(s, unit, base)
    for unit in tqdm(s.units, desc="sensitivity", unit="class", disable=not progress)
  ]
  return sensitivity.SensitivityResult(
    type=s.sensitivity_type,
    grouping=sensitivity.grouping(s.config.num_hidden_layers),
    units=sensitivity.rank(out),
  )


def _ablate_unit(s: Setup, unit: sensitivity.Unit, base: _Baseline) -> sensitivity.UnitResult:
  """One sensitivity unit: its tensors at the low type, everything else F32, run and scored like a recipe;
  `seconds` covers all of it, planning and scoring included."""
  clock = _Clock()
  prep = _plan(s, base.source, sensitivity.unit_recipe(unit, s.sensitivity_type))
  qparams = roundtrip.build_params(prep, cache=base.cache)
  logits = runner.logits(qparams, base.tokens, s.config)
  names = set(unit.tensors)
  mine = [i for i in prep.tensors if i.name in names]
  stats = score(base.logits, logits, base.tokens, base.next_stats)
  return sensitivity.UnitResult(
    unit=unit,
    types=tuple(sorted({i.type for i in mine})),
    params=sum(i.params for i in mine),
    bytes_saved=sum(4 * i.params - i.bytes for i in mine),
    stats=stats,
    seconds=clock.total(),
  )


def _result(
  s: Setup,
  base: _Baseline,
  recipes: tuple[RecipeResult, ...],
  sens: sensitivity.SensitivityResult | None,
  clock: _Clock,
) -> AblationResult:
  """The frozen result: model, tokens, per-recipe results, sensitivity map and the run's timings (total_s
  read last, so it covers building the rest)."""
  cfg, spec = s.config, s.spec
  model = ModelInfo(
    name=s.model_name,
    description=s.model_description,
    layers=cfg.num_hidden_layers,
    dense_layers=cfg.first_k_dense_replace,
    experts=cfg.n_routed_experts,
    hidden=cfg.hidden_size,
    vocab=cfg.vocab_size,
    params=recipes[0].params,
  )
  b, t = base.tokens.shape
  tokens = EvalTokens(
    kind=s.token_kind,
    description=s.token_description,
    shape=(b, t),
    next_token_stats=base.next_stats,
    sha256=hashlib.sha256(np.ascontiguousarray(base.tokens, np.int32).tobytes()).hexdigest(),
  )
  timings = Timings(
    load_s=clock["load"],
    sample_s=clock["sample"],
    base_forward_s=clock["base_forward"],
    quantize_s=sum(r.quantize_s for r in recipes),
    forward_s=sum(r.forward_s for r in recipes),
    sensitivity_s=clock["sensitivity"],
    total_s=clock.total(),
  )
  return AblationResult(
    model=model,
    rules=spec.rules,
    layout=spec.layout,
    imatrix=spec.imatrix,
    tokens=tokens,
    recipes=recipes,
    sensitivity=sens,
    timings=timings,
  )


# ------------------------------------------------------------------------------------------------ model


def _model_config(checkpoint: str | None) -> tuple[DeepseekV3Config, str, str, str | None]:
  """(full config, name, description, HF directory or None) of the checkpoint argument."""
  if checkpoint is None or checkpoint.startswith(BUILTIN_PREFIX):
    key = presets.DEFAULT if checkpoint is None else checkpoint[len(BUILTIN_PREFIX) :]
    p = presets.preset(key)  # ValueError naming the known ones
    return p.config, BUILTIN_PREFIX + p.name, f"built-in random-weight model: {p.description}", None
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(
      f"checkpoint {checkpoint}: not a directory (give an HF checkpoint or builtin:NAME)"
    )
  from dq3jax.io.safetensors_ckpt import HFCheckpoint  # noqa: PLC0415

  ckpt = HFCheckpoint(checkpoint)  # reads config.json and the index only
  return ckpt.config, checkpoint, "HF checkpoint", checkpoint


def _truncate(full: DeepseekV3Config, layers: int | None, experts: int | None) -> DeepseekV3Config:
  if layers is not None and not 1 <= layers <= full.num_hidden_layers:
    raise ValueError(f"--layers {layers}: the model has {full.num_hidden_layers} layers")
  if experts is not None and not 1 <= experts <= full.n_routed_experts:
    raise ValueError(f"--experts {experts}: the model has {full.n_routed_experts} routed experts per layer")
  return full.truncate(layers=layers, experts=experts)


def _load_params(s: Setup) -> dict:
  """The setup's float32 weights: a built-in preset's (cut to the truncation) or the HF checkpoint's."""
  if s.directory is None:
    _, params = presets.params_of(s.model_name[len(BUILTIN_PREFIX) :])
    if (s.spec.layers, s.spec.experts) != (None, None):
      params = truncate_params(params, s.config)
    return params
  from dq3jax.io.safetensors_ckpt import load  # noqa: PLC0415

  _, params = load(s.directory, layers=s.spec.layers, experts=s.spec.experts)
  return params


def truncate_params(params: dict, cfg: DeepseekV3Config) -> dict:
  """A params pytree cut to cfg (a truncation of its model): first layers, first experts and router rows."""
  e = cfg.n_routed_experts

  def cut(path, a):
    keys = [getattr(k, "key", None) for k in path]
    if "experts" in keys or keys[-1] in ("router", "router_bias"):
      return a[:e]
    return a

  kept = {**params, "layers": params["layers"][: cfg.num_hidden_layers]}
  return jax.tree_util.tree_map_with_path(cut, kept)


# ----------------------------------------------------------------------------------------------- tokens


def _eval_tokens(spec: AblationSpec, cfg: DeepseekV3Config, directory: str | None):
  """(int32 [B, T] or None to sample, kind, description)."""
  if spec.text:
    if directory is None:
      raise ValueError(
        f"--text {spec.text}: the built-in model has no tokenizer; give an HF checkpoint with tokenizer.json "
        "or token ids with --tokens"
      )
    tok_path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tok_path):
      raise ValueError(f"--text {spec.text}: {tok_path} not found (needed to tokenize the text)")
    from dq3jax.extras import require  # noqa: PLC0415

    Tokenizer = require("tokenizers", "--text").Tokenizer  # noqa: N806
    with open(spec.text, encoding="utf-8") as f:
      text = f.read()
    ids = np.asarray(Tokenizer.from_file(tok_path).encode(text).ids, np.int64)
    tokens = _windows(ids, spec.ctx, spec.sequences, f"--text {spec.text}")
    _check_ids(tokens, cfg.vocab_size, f"{spec.text} (tokenized with {tok_path})")
    return tokens, "text", f"{spec.text}: {ids.size} tokens, {tokens.shape[0]} windows of {tokens.shape[1]}"
  if spec.tokens:
    try:
      a = np.load(spec.tokens, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"--tokens {spec.tokens}: cannot read as .npy ({e})") from None
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"--tokens {spec.tokens}: dtype {a.dtype}, need integer token ids")
    if a.ndim not in (1, 2):
      raise ValueError(f"--tokens {spec.tokens}: shape {list(a.shape)}, need [T] or [B, T]")
    _check_ids(a, cfg.vocab_size, spec.tokens)
    tokens = _windows(a, spec.ctx, spec.sequences, f"--tokens {spec.tokens}") if a.ndim == 1 else a
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
      raise ValueError(f"--tokens {spec.tokens}: shape {list(a.shape)}, need at least 2 tokens per sequence")
    what = "token ids" if spec.tokens_are_text else "token ids (not text: no Δp / perplexity)"
    return tokens.astype(np.int32), "tokens", f"{spec.tokens}: {what}, shape {list(tokens.shape)}"
  desc = (
    f"{spec.sequences} sequences of {spec.ctx} tokens sampled from the unquantized model "
    f"(seed {spec.seed}, temperature 1, first token uniform)"
  )
  return None, "sampled", desc


def _windows(ids: np.ndarray, ctx: int, max_windows: int, what: str) -> np.ndarray:
  """A token stream [N] cut into at most max_windows rows of ctx tokens (one shorter row if N < ctx)."""
  n = ids.size
  if n < 2:
    raise ValueError(f"{what}: {n} token(s), need at least 2")
  if n < ctx:
    return ids[None, :].astype(np.int32)
  rows = min(n // ctx, max_windows)
  return ids[: rows * ctx].reshape(rows, ctx).astype(np.int32)


def _check_ids(a: np.ndarray, vocab: int, where: str) -> None:
  bad = np.flatnonzero((a.reshape(-1) < 0) | (a.reshape(-1) >= vocab))
  if bad.size:
    pos = np.unravel_index(bad[0], a.shape)
    at = f"position {pos[0]}" if a.ndim == 1 else f"position [{pos[0]}, {pos[1]}]"
    raise ValueError(
      f"{where}: token id {int(a.reshape(-1)[bad[0]])} at {at} is outside the vocabulary [0, {vocab}) "
      f"({bad.size} such ids)"
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode_step(params, tokens, cache, cfg):
  return transformer.forward(params, tokens, cfg, cache=cache, form=AttnForm.ABSORBED)


def sample_tokens(
  params: dict, cfg: DeepseekV3Config, *, sequences: int, length: int, seed: int
) -> np.ndarray:
  """int32 [sequences, length] drawn from the model at temperature 1, one token at a time through the latent
  KV cache (one compiled step shape). The first token is uniform: the model has no BOS of its own. Seeded;
  the draws depend on the logits' last bits, so another CPU or XLA build may give other sequences."""
  rng = np.random.default_rng(seed)
  p = runner.cast_params(params, runner.Dtype.FLOAT32)
  cache = transformer.init_cache(cfg, sequences, length)
  out = np.empty((sequences, length), np.int32)
  out[:, 0] = rng.integers(0, cfg.vocab_size, sequences)
  for t in range(1, length):
    res = _decode_step(p, jnp.asarray(out[:, t - 1 : t]), cache, cfg)
    cache = res.cache
    logits = np.asarray(res.logits[:, -1], np.float64)  # [B, V]
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(prob, -1)
    u = rng.random(sequences) * cdf[:, -1]
    out[:, t] = np.minimum((cdf < u[:, None]).sum(-1), cfg.vocab_size - 1)  # inverse CDF
  return out
