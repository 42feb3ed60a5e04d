"""`python -m dq3jax.train OUT_DIR`: corpus -> tokenizer -> training -> bf16 weights -> evaluation -> files.

OUT_DIR/hf/config.json, model.safetensors (bf16), tokenizer.json   the checkpoint (HF DeepSeek-V3 layout)
OUT_DIR/train/heldout_tokens.json   the first HELDOUT_TOKENS ids of the held-out stream, with their topics
OUT_DIR/train/report.json           corpus, settings, loss curve and the final weights' measurements

All measurements are of the bf16-rounded weights the checkpoint holds, run through dq3jax's forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from dq3jax.io import hf_writer
from dq3jax.io.atomic import atomic_path
from dq3jax.model.presets import bf16_round, params_of
from dq3jax.train import corpus, evaluate, spec, tokenizer
from dq3jax.train.train import train

HELDOUT_TOKENS = 1024
EVAL_WINDOW = 128
PREFIXES = (256, 1024)  # held-out prefixes (tokens) whose perplexity the tests recompute from the files
TRAIN_EVAL_WINDOWS = 96  # train perplexity on this many windows spread evenly over the train stream
RANDOM_SEED = 0  # v3-tiny's contrast tokens


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _code_version() -> str | None:
  """The git commit of the code that trained, with "+dirty" for uncommitted changes (None outside git)."""
  import subprocess  # noqa: PLC0415

  here = os.path.dirname(os.path.abspath(__file__))
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--", "."],
      cwd=os.path.dirname(here),
      capture_output=True,
      text=True,
      check=True,
    )
  except (OSError, subprocess.CalledProcessError):
    return None
  return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
    f.write("\n")


def _spread_windows(stream: np.ndarray, window: int, count: int) -> np.ndarray:
  all_w = evaluate.windows(stream, window)
  idx = np.linspace(0, all_w.shape[0] - 1, min(count, all_w.shape[0])).round().astype(int)
  return all_w[idx]


def heldout_record(tok, split: corpus.Split) -> dict:
  """train/heldout_tokens.json: the first HELDOUT_TOKENS ids of the held-out stream and where they come from."""
  stream = tokenizer.encode_docs(tok, split.heldout_texts)
  prefix = [int(i) for i in stream[:HELDOUT_TOKENS]]
  bos = tok.token_to_id(tokenizer.BOS)
  doc_starts = [i for i, t in enumerate(prefix) if t == bos]
  return {
    "description": f"first {HELDOUT_TOKENS} ids of the held-out stream (never trained on): each held-out "
    "topic's text preceded by BOS (id 0), topics in sorted order; tokenized with hf/tokenizer.json",
    "heldout_topics": list(split.heldout_keys),
    "topics": list(split.heldout_keys[: len(doc_starts)]),  # the topics these ids come from
    "doc_starts": doc_starts,
    "python": sys.version.split()[0],
    "token_ids": prefix,
    "text": tok.decode(prefix, skip_special_tokens=False),
  }


def build(out_dir: str, ts: spec.TrainSpec = spec.TRAIN, log=print) -> dict:
  t_start = time.perf_counter()
  cfg = spec.CONFIG
  split = corpus.split()
  tok = tokenizer.train(split.train_texts)
  train_stream = tokenizer.encode_docs(tok, split.train_texts)
  held_stream = tokenizer.encode_docs(tok, split.heldout_texts)
  log(
    f"corpus: {split.describe()['train_chars']} train chars -> {train_stream.size} tokens, "
    f"{split.describe()['heldout_chars']} held-out chars -> {held_stream.size} tokens"
  )

  held_windows = evaluate.windows(held_stream, EVAL_WINDOW)
  quick = held_windows[:8]
  t_train = time.perf_counter()
  params, history = train(
    cfg, ts, train_stream, evaluate=lambda p: np.log(evaluate.perplexity(p, cfg, quick)), log=log
  )
  train_s = time.perf_counter() - t_train
  params = bf16_round(params)  # released checkpoints are bf16; everything below measures these values

  hf_dir = os.path.join(out_dir, "hf")
  hf_writer.save(hf_dir, cfg, params, dtype="bfloat16")
  tok.save(os.path.join(hf_dir, "tokenizer.json"))

  record = heldout_record(tok, split)
  _write_json(os.path.join(out_dir, "train", "heldout_tokens.json"), record)
  prefix = np.asarray(record["token_ids"], np.int32)

  log("evaluating the bf16 weights")
  heldout = evaluate.next_token_summary(params, cfg, held_windows)
  train_eval = evaluate.next_token_summary(
    params, cfg, _spread_windows(train_stream, EVAL_WINDOW, TRAIN_EVAL_WINDOWS)
  )
  prefixes = {
    str(n): evaluate.perplexity(params, cfg, evaluate.windows(prefix[:n], EVAL_WINDOW)) for n in PREFIXES
  }
  margins = evaluate.router_margins(params, cfg, held_windows)
  tiny_cfg, tiny_params = params_of("v3-tiny")
  rng = np.random.default_rng(RANDOM_SEED)
  tiny_tokens = rng.integers(0, tiny_cfg.vocab_size, size=(held_windows.shape[0], EVAL_WINDOW)).astype(
    np.int32
  )
  tiny_margins = evaluate.router_margins(tiny_params, tiny_cfg, tiny_tokens)

  report = {
    "model": spec.NAME,
    "config": cfg.to_hf_config(),
    "parameters": int(sum(np.asarray(a).size for a in jax.tree_util.tree_leaves(params))),
    "corpus": {
      **split.describe(),
      "tokenizer": {
        "kind": "byte-level BPE (HF tokenizers)",
        "vocab_size": tok.get_vocab_size(),
        "trained_on": "train split only",
        "bos": tokenizer.BOS,
        "eos": tokenizer.EOS,
      },
      "train_tokens": int(train_stream.size),
      "heldout_tokens": int(held_stream.size),
      "stream": "each topic preceded by BOS, topics in sorted key order",
    },
    "training": {
      **dataclasses.asdict(ts),
      "tokens_seen": ts.steps * ts.batch * ts.seq_len,
      "epochs": ts.steps * ts.batch * ts.seq_len / train_stream.size,
      "dtype": "float32 (dq3jax transformer.forward), final weights rounded to bfloat16",
      "optimizer": "AdamW (dq3jax.train.optim), router_bias by the aux-loss-free sign rule",
      "train_wall_s": round(train_s, 1),
      "total_wall_s": None,
      "loss_curve": history,
    },
    "final_bf16": {
      "heldout": heldout,
      "train": {**train_eval, "sampled": f"{TRAIN_EVAL_WINDOWS} windows evenly spread over the train stream"},
      "heldout_prefix_perplexity": {
        "source": "train/heldout_tokens.json token_ids[:n], windows of 128 from position 0",
        **prefixes,
      },
      "eval": f"non-overlapping windows of {EVAL_WINDOW} tokens, positions 1..{EVAL_WINDOW - 1} scored",
    },
    "router_margins": {
      "definition": "biased score c = sigmoid(router x) + e_score_correction_bias; expert margin = K-th minus "
      "(K+1)-th c among experts of the kept groups; group margin = topk_group-th minus next group score "
      "(sum of a group's two best c)",
      spec.NAME: {"tokens": "held-out windows", "layers": margins},
      "v3-tiny": {
        "tokens": f"random ids, numpy default_rng({RANDOM_SEED}), shape {list(tiny_tokens.shape)}",
        "layers": tiny_margins,
      },
    },
    "environment": {
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "numpy": np.__version__,
      "tokenizers": __import__("tokenizers").__version__,
      "platform": platform.platform(),
      "cpu": _cpu(),
      "cpu_count": os.cpu_count(),
      "code": _code_version(),
    },
  }
  report["training"]["total_wall_s"] = round(time.perf_counter() - t_start, 1)
  _write_json(os.path.join(out_dir, "train", "report.json"), report)
  log(
    f"held-out ppl {heldout['perplexity']:.3f}, train ppl {train_eval['perplexity']:.3f}, "
    f"total {report['training']['total_wall_s']:.0f}s"
  )
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m dq3jax.train", description=__doc__.splitlines()[0])
  p.add_argument("out_dir", help="e.g. goldens/models/v3-pydoc")
  p.add_argument("--steps", type=int, default=spec.TRAIN.steps)
  p.add_argument("--batch", type=int, default=spec.TRAIN.batch)
  p.add_argument("--seq-len", type=int, default=spec.TRAIN.seq_len)
  args = p.parse_args(argv)
  ts = dataclasses.replace(spec.TRAIN, steps=args.steps, batch=args.batch, seq_len=args.seq_len)
  build(args.out_dir, ts, log=lambda s: print(s, flush=True))
  return 0
