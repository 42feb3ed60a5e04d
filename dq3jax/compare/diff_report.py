"""The verdict of `dq3jax diff`: the `Report` (rows, notes, first divergence), as Markdown and as JSON."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping

import numpy as np

from dq3jax.compare.diff_rows import Row, Status
from dq3jax.compare.diff_text import name_list, sig3
from dq3jax.compare.diff_thresholds import Thresholds


@dataclasses.dataclass(frozen=True)
class Report:
  """The verdict on one candidate: its rows, what was not compared, notes and the first divergence."""

  golden: str
  golden_kind: str
  golden_info: Mapping
  manifest: Mapping | None
  candidate: str
  candidate_format: str
  profile: str
  thresholds: Thresholds
  overrides: Mapping
  rows: tuple[Row, ...]
  unknown: tuple[str, ...] = ()  # candidate tensors the golden does not have (not compared)
  not_supplied: tuple[str, ...] = ()  # golden tensors the candidate did not supply (not compared)
  notes: tuple[str, ...] = ()
  first_divergence: Mapping | None = None
  metadata_differences: tuple[Mapping, ...] = ()

  @property
  def failed(self) -> list[Row]:
    """The rows out of bounds."""
    return [r for r in self.rows if r.status is Status.FAIL]

  @property
  def exit_code(self) -> int:
    """The exit status of `dq3jax diff` for this report: 1 when a row is out of bounds, else 0."""
    return 1 if self.failed else 0

  def to_json(self) -> dict:
    """The report as a JSON-safe dict (what --report writes)."""
    return _jsonable(
      {
        "result": "FAIL" if self.failed else "PASS",
        "exit_code": self.exit_code,
        "golden": {
          "path": self.golden,
          "kind": self.golden_kind,
          **self.golden_info,
          "manifest": self.manifest,
        },
        "candidate": {"path": self.candidate, "format": self.candidate_format},
        "profile": self.profile,
        "thresholds": dataclasses.asdict(self.thresholds),
        "overrides": self.overrides,
        "rows": [
          {
            "name": r.name,
            "kind": r.kind.value,
            "status": r.status.value,
            "summary": r.summary,
            "bound": r.bound,
            "note": r.note,
            "metrics": r.metrics,
          }
          for r in self.rows
        ],
        "unknown_candidate_tensors": self.unknown,
        "not_supplied": self.not_supplied,
        "first_divergence": self.first_divergence,
        "metadata_differences": self.metadata_differences,
        "notes": self.notes,
      }
    )

  def to_markdown(self) -> str:
    """The report as printed: the header, the table of rows, notes and the result line."""
    what = ", ".join(
      f"{k} {v}" for k, v in self.golden_info.items() if k not in ("block_elems", "block_bytes")
    )
    verified = (
      f"sha256 verified against {self.manifest['path']}"
      if self.manifest
      else "not listed in a manifest: not verified"
    )
    thr = ", ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(self.thresholds).items())
    lines = [
      f"golden:     {self.golden} ({self.golden_kind}{'; ' + what if what else ''}; {verified})",
      f"candidate:  {self.candidate} ({self.candidate_format})",
      f"thresholds: profile {self.profile}: {thr}",
    ]
    for name, o in self.overrides.items():
      change = o["change"].upper() if o["change"] == "looser" else o["change"]
      lines.append(f"            override {name}={o['value']:g} (profile {o['profile_value']:g}: {change})")
    lines += ["", "| tensor | kind | metrics | bound | result |", "|---|---|---|---|---|"]
    for r in self.rows:
      summary = r.summary + (f" [{r.note}]" if r.note else "")
      lines.append(f"| {_cell(r.name)} | {r.kind} | {_cell(summary)} | {_cell(r.bound)} | {r.status} |")
    lines.append("")
    if self.unknown:
      lines.append(f"candidate tensors the golden does not have (not compared): {name_list(self.unknown)}")
    if self.not_supplied:
      lines.append(
        f"golden tensors the candidate did not supply (not compared): {name_list(self.not_supplied)}"
      )
    for d in self.metadata_differences:
      lines.append(f"metadata {d['key']}: golden {d['golden']!r}, candidate {d['candidate']!r} (not judged)")
    for n in self.notes:
      lines.append(f"note: {n}")
    fd = self.first_divergence
    if fd is not None:
      where = f"layer {fd['layer']}, " if fd["layer"] is not None else ""
      why = (
        fd["metric"]
        if fd["tensor"].endswith("topk_ids")
        else f"{fd['metric']} {sig3(fd['value'])} > {sig3(fd['bound'])}"
      )
      within = " (every tensor still within its bound)" if not self.failed else ""
      lines.append(f"first divergence{within}: {where}{fd['tensor']}, token {fd['token']} ({why})")
    n = len(self.rows)
    verdict = (
      f"FAIL: {len(self.failed)} of {n} tensors out of bounds"
      if self.failed
      else f"PASS: {n} tensors within bounds"
    )
    lines.append(f"result: {verdict}")
    return "\n".join(lines)


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _jsonable(x):
  """JSON-safe copy: non-finite floats as strings ("inf", "nan"), numpy scalars as Python, tuples as lists."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, enum.Enum):
    return x.value
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def write_json(path: str | os.PathLike, obj: dict) -> None:
  """Write obj as JSON atomically (dq3jax.io.atomic)."""
  from dq3jax.io.atomic import atomic_path  # noqa: PLC0415

  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False, allow_nan=False)
    f.write("\n")
