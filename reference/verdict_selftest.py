"""Does the verdict separate? llama.cpp itself, clean at every setting people run and with planted engine bugs,
judged by `dq3jax diff` against the model goldens.

`python -m reference.verdict_selftest [--models v3-pydoc,v3-tiny] [--recipes ...] [--json OUT]` runs, for every
model golden (model x recipe):
  * clean: the golden GGUF through llama.cpp at every setting of `llama_cpp_run.CALIBRATION_SETTINGS`, each
    diffed against the golden emulating that setting (outputs/R.llama-cpu.safetensors for an F32 KV cache,
    outputs/R.llama-cpu-f16kv.safetensors for F16); every one must pass;
  * planted: every bug of `planted_bugs.BUGS` that applies to the file, edited into a copy of the GGUF and run
    at llama.cpp's defaults (F16 KV cache); every one must fail.
and reports per run the largest value of each metric against its bound (`worst`), the verdict and the first
divergence. The clean spread (the worst clean value of each metric) and each bug's effect (its value of the same
metric) are what docs/diff.md tabulates; the separation is their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import tempfile

from dq3jax.compare import diff

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDENS = pathlib.Path(os.environ.get("DQ3JAX_GOLDENS", ROOT / "goldens"))
MODELS = ("v3-pydoc", "v3-tiny")
RECIPES = ("F32", "Q8_0", "Q4_K_M", "Q3_K_M", "DQ3_K_M", "Q2_K")


def golden_for(model: str, recipe: str, kv_cache: str) -> pathlib.Path:
  """The golden outputs file emulating llama.cpp with this KV cache type."""
  suffix = "llama-cpu-f16kv" if kv_cache == "f16" else "llama-cpu"
  return GOLDENS / "models" / model / "outputs" / f"{recipe}.{suffix}.safetensors"


def gguf_for(model: str, recipe: str) -> pathlib.Path:
  return GOLDENS / "models" / model / "gguf" / f"{recipe}.gguf"


@dataclasses.dataclass(frozen=True)
class Run:
  model: str
  recipe: str
  case: str  # "clean" or the bug's name
  setting: str  # llama_cpp_run.Settings.label
  result: str  # PASS / FAIL
  worst: dict  # metric -> largest value over the rows of that metric
  first_divergence: dict | None
  explained_flips: int
  decisive_flips: int

  @property
  def expected(self) -> bool:
    return (self.result == "PASS") == (self.case == "clean")


def _worst(report: diff.Report) -> tuple[dict, int, int]:
  """Per metric, the largest value over the report's rows: intermediate NMSE (every blk.* float tensor),
  router weights NMSE, mean KLD of logits / decode_logits, 1 - Same top p."""
  worst: dict[str, float] = {}
  explained = decisive = 0

  def put(key: str, value) -> None:
    if value is None:
      return
    value = float(value)
    if math.isnan(value):
      value = math.inf
    worst[key] = max(worst.get(key, -math.inf), value)

  for r in report.rows:
    m = r.metrics
    stage = r.name.endswith(diff.STAGE_TAG)
    if r.kind is diff.TensorKind.FLOATS:
      put("intermediate_nmse", m.get("nmse"))
    elif r.kind is diff.TensorKind.STAGE:
      # blk.{i}.attention [stage] -> stage:attention
      # blocks whose matmuls quantize no activation are judged at their own bound: a key of their own
      unq = "" if m.get("activations_quantized", True) else ":unquantized"
      put("stage:" + r.name.removesuffix(diff.STAGE_TAG).split(".", 2)[-1] + unq, m.get("nmse"))
    elif r.kind is diff.TensorKind.ROUTER_WEIGHTS:
      put("stage:topk_weights" if stage else "router_weights_nmse", m.get("nmse"))
    elif r.kind is diff.TensorKind.ROUTER_IDS:
      if stage:
        put("stage:decisive_flips", m.get("positions_decisive", 0))
        put("stage:explained_flips", m.get("positions_explained", 0))
      else:
        explained += int(m.get("positions_explained", 0))
        decisive += int(m.get("positions_decisive", 0))
    elif r.kind is diff.TensorKind.LOGITS:
      key = "stage:head" if stage else r.name
      put(f"{key}_mean_kld", m.get("Mean KLD", math.inf))
      if "Same top p" in m:
        put(f"{key}_1-same_top_p", 1 - m["Same top p"] / 100)
  return worst, explained, decisive


def judge(model: str, recipe: str, case: str, gguf_path: pathlib.Path, settings, work: pathlib.Path) -> Run:
  from reference import llama_cpp_run  # noqa: PLC0415

  # With flash attention llama.cpp casts an F32 cache to F16 (llama_cpp_run: kv_effective).
  golden = golden_for(model, recipe, "f16" if settings.flash_attn else settings.kv_cache)
  cand = work / f"{model}-{recipe}-{case}-{settings.label}.npz"
  llama_cpp_run.dump(gguf_path, golden, cand, settings=settings)
  report = diff.diff(golden, cand)
  worst, explained, decisive = _worst(report)
  return Run(
    model=model,
    recipe=recipe,
    case=case,
    setting=settings.label,
    result="FAIL" if report.failed else "PASS",
    worst=worst,
    first_divergence=dict(report.first_divergence) if report.first_divergence else None,
    explained_flips=explained,
    decisive_flips=decisive,
  )


def clean_runs(model: str, recipe: str, work: pathlib.Path, settings=None) -> list[Run]:
  from reference import llama_cpp_run  # noqa: PLC0415

  return [
    judge(model, recipe, "clean", gguf_for(model, recipe), s, work)
    for s in (settings or llama_cpp_run.CALIBRATION_SETTINGS)
  ]


def planted_runs(model: str, recipe: str, work: pathlib.Path, bugs=None) -> list[Run]:
  from reference import llama_cpp_run, planted_bugs  # noqa: PLC0415

  out = []
  src = gguf_for(model, recipe)
  for bug in bugs or planted_bugs.BUGS.values():
    if not bug.applies_to(src):
      continue
    edited = work / f"{model}-{recipe}-{bug.name}.gguf"
    bug.apply(src, edited)
    out.append(judge(model, recipe, bug.name, edited, llama_cpp_run.Settings(), work))
    edited.unlink()
  return out


def summary(runs: list[Run]) -> dict:
  """The clean spread (worst clean value per metric) and, per bug, its effect on each metric."""
  spread: dict[str, float] = {}
  for r in runs:
    if r.case == "clean":
      for k, v in r.worst.items():
        spread[k] = max(spread.get(k, -math.inf), v)
  return {"clean_spread": spread, "unexpected": [dataclasses.asdict(r) for r in runs if not r.expected]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--recipes", default=",".join(RECIPES))
  p.add_argument("--no-planted", action="store_true")
  p.add_argument("--json", help="write every run and the summary here")
  a = p.parse_args(argv)
  runs: list[Run] = []
  with tempfile.TemporaryDirectory(prefix="dq3jax-selftest-") as tmp:
    work = pathlib.Path(tmp)
    for model in a.models.split(","):
      for recipe in a.recipes.split(","):
        got = clean_runs(model, recipe, work)
        if not a.no_planted:
          got += planted_runs(model, recipe, work)
        for r in got:
          fd = r.first_divergence
          where = f"{fd['tensor']} token {fd['token']}" if fd else "-"
          worst = ", ".join(f"{k} {v:.2g}" for k, v in sorted(r.worst.items()))
          flag = "" if r.expected else "  <-- UNEXPECTED"
          print(
            f"{model} {recipe} {r.case} {r.setting}: {r.result} (flips {r.explained_flips} explained, "
            f"{r.decisive_flips} decisive; first divergence {where}; {worst}){flag}",
            flush=True,
          )
        runs += got
  s = summary(runs)
  print("clean spread:", json.dumps(s["clean_spread"]))
  if a.json:
    pathlib.Path(a.json).write_text(
      json.dumps({"runs": [dataclasses.asdict(r) for r in runs], **s}, indent=1, default=str)
    )
  return 1 if s["unexpected"] else 0


if __name__ == "__main__":
  raise SystemExit(main())
