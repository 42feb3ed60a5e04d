"""`dq3jax diff GOLDEN CANDIDATE`: the argparse declaration and the glue."""

from __future__ import annotations

import argparse

from dq3jax.cli import errors, options


def add_parser(subparsers) -> argparse.ArgumentParser:
  from dq3jax.compare.diff import PROFILES, threshold_names

  p = options.command(
    subparsers,
    "diff",
    summary="compare an engine's output (or GGUF) with a golden file; exit 0 within bounds, 1 out, "
    "2 bad input",
    reads="GOLDEN (a kernel golden, a model-outputs golden or a golden GGUF, and the manifest.json listing "
    "it); CANDIDATE (.npz, .safetensors, .npy, raw float32 .bin/.f32/.raw, or a GGUF for a golden GGUF)",
    writes="a Markdown verdict on stdout; --report JSON (atomically; also on bad input, as result ERROR)",
    about="Compare CANDIDATE with GOLDEN tensor by tensor, each by the metric of its kind against a "
    "threshold profile. Exit status: 0 all within bounds, 1 out of bounds, 2 bad input. Formats and "
    "thresholds: docs/diff.md.",
  )
  p.add_argument(
    "golden",
    help="golden file: goldens/kernels/*.safetensors, goldens/models/M/outputs/R.safetensors, "
    "or goldens/models/M/gguf/R.gguf",
  )
  p.add_argument("candidate", help="the engine's output to judge")
  options.report(p)
  p.add_argument(
    "--profile",
    choices=sorted(PROFILES),
    default=None,
    help="threshold preset; default: the golden's own (float32 for an `emulation: none` golden, "
    "outputs/R.safetensors; llama-cpu for outputs/R.llama-cpu*.safetensors, llama-cpu-fa when the "
    "candidate's meta.llama_cpp records flash attention)",
  )
  p.add_argument(
    "--threshold",
    action="append",
    default=[],
    metavar="NAME=VALUE",
    help=f"override one bound (repeatable); names: {', '.join(threshold_names())}",
  )
  p.set_defaults(func=run)
  return p


def _write_report(path: str, obj: dict) -> None:
  from dq3jax.compare.diff import write_json

  try:
    write_json(path, obj)
  except OSError as e:
    # The OSError names write_json's temp file; the user named this one.
    raise ValueError(f"cannot write --report {path}: {e.strerror or e}") from e


def run(args: argparse.Namespace) -> int:
  from dq3jax.compare import diff

  try:
    profile = args.profile or diff.default_profile(args.golden, args.candidate)
    thr, overrides = diff.apply_overrides(diff.PROFILES[profile], args.threshold)
    report = diff.diff(args.golden, args.candidate, thresholds=thr, profile=profile, overrides=overrides)
  except (ValueError, OSError) as e:  # bad input: the report says so too, for whoever reads only the report
    if args.report:
      message = errors.describe(e)
      error = {"result": "ERROR", "exit_code": errors.BAD_INPUT, "error": message,
               "golden": {"path": args.golden}, "candidate": {"path": args.candidate}}  # fmt: skip
      try:
        _write_report(args.report, error)
      except ValueError as w:
        raise ValueError(f"{message}; {w}") from e
    raise
  print(report.to_markdown())
  if args.report:
    _write_report(args.report, report.to_json())
  return report.exit_code
