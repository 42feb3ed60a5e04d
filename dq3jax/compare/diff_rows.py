"""One report row per tensor, and the rows of the element-wise kinds: quantized bytes, kernel floats, inputs,
float intermediates (NMSE) and integers."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import numpy as np

from dq3jax.compare import metrics
from dq3jax.compare.diff_kinds import TensorKind
from dq3jax.compare.diff_text import sig3
from dq3jax.compare.diff_thresholds import Thresholds
from dq3jax.compare.dumps import BadInput


class Status(enum.StrEnum):
  """A row's result."""

  PASS = "PASS"
  FAIL = "FAIL"
  INFO = "INFO"  # reported, not judged


@dataclasses.dataclass(frozen=True)
class Row:
  """The verdict on one tensor (or stage): its metrics, the bound applied and the result."""

  name: str
  kind: TensorKind
  status: Status
  summary: str  # the metric values, one line
  bound: str  # the bound applied, human readable
  metrics: Mapping
  note: str = ""  # how the candidate tensor was read (batch axis dropped, dtype converted)


def within_bound(value: float, bound: float) -> bool:
  """value <= bound; NaN is never within a bound."""
  return bool(value <= bound)  # NaN is never within a bound


def _deltas_text(first: metrics.BlockDiff) -> str:
  parts = []
  for d in first.deltas[:3]:
    bits = ",".join(str(b) for b in d.bits)
    parts.append(
      f"byte +{d.offset_in_block}: {d.golden:#04x} vs {d.candidate:#04x} (xor {d.xor:#04x}, bit {bits})"
    )
  more = f"; {first.n_bytes_differ} bytes, {first.n_bits_differ} bits differ in this block"
  return ", ".join(parts) + more


def _byte_metrics(d: metrics.ByteDiff) -> dict:
  out: dict = {
    "blocks": d.n_blocks,
    "blocks_differ": d.n_blocks_differ,
    "bytes_differ": d.n_bytes_differ,
    "first": None,
  }
  if d.first is not None:
    f = d.first
    out["first"] = {
      "row": f.row,
      "block": f.block,
      "byte_offset": f.byte_offset,
      "bytes_differ": f.n_bytes_differ,
      "bits_differ": f.n_bits_differ,
      "bytes": [
        {
          "offset_in_block": x.offset_in_block,
          "golden": x.golden,
          "candidate": x.candidate,
          "xor": x.xor,
          "bits": list(x.bits),
        }
        for x in f.deltas
      ],
    }
  return out


def bytes_row(
  name: str,
  g: np.ndarray,
  c: np.ndarray,
  block_bytes: int,
  thr: Thresholds,
  kind: TensorKind = TensorKind.BYTES,
  where: str = "",
) -> Row:
  """ggml block data g vs c [..., row_bytes]: how many blocks differ, the first one's bytes and bits."""
  d = metrics.byte_diff(g, c, block_bytes)
  if d.first is None:
    summary = f"identical ({d.n_blocks} blocks)"
  else:
    f = d.first
    summary = (
      f"{d.n_blocks_differ} of {d.n_blocks} blocks differ; first: row {f.row}, block {f.block}, byte "
      f"offset {f.byte_offset}{where}: {_deltas_text(f)}"
    )
  return Row(
    name,
    kind,
    Status.PASS if d.n_blocks_differ <= thr.bytes_max_diff_blocks else Status.FAIL,
    summary,
    f"<= {thr.bytes_max_diff_blocks} blocks differ",
    _byte_metrics(d),
  )


def _float_metrics(fe: metrics.FloatErrors) -> dict:
  return dataclasses.asdict(fe)


def kernel_float_row(name: str, g: np.ndarray, c: np.ndarray, thr: Thresholds) -> Row:
  """A kernel's dequantized float32: max ULP (the bound), max abs and rel error, NMSE."""
  fe = metrics.float_errors(g, c)
  at = f" at {list(fe.max_ulp_index)}" if fe.max_ulp_index else ""
  summary = (
    f"max ULP {sig3(fe.max_ulp)}{at}, max abs {sig3(fe.max_abs)}, "
    f"max rel {sig3(fe.max_rel)}, NMSE {sig3(fe.nmse)}"
  )
  if fe.bits_differ and fe.max_ulp == 0:
    summary += f"; {fe.bits_differ} elements differ only in the sign of zero or a NaN payload"
  if fe.nan_mismatch:
    summary += f"; {fe.nan_mismatch} NaN in one only"
  ok = within_bound(fe.max_ulp, thr.kernel_max_ulp)
  return Row(
    name,
    TensorKind.KERNEL_FLOATS,
    Status.PASS if ok else Status.FAIL,
    summary,
    f"max ULP <= {thr.kernel_max_ulp}",
    _float_metrics(fe),
  )


def input_row(name: str, g: np.ndarray, c: np.ndarray, cand_path: str) -> Row:
  """The candidate's copy of an input: anything but identical means it computed from other inputs."""
  if g.dtype.kind == "f":
    differs = np.asarray(g, np.float32).view(np.uint32) != np.asarray(c, np.float32).view(np.uint32)
  else:
    differs = np.asarray(g, np.int64) != np.asarray(c, np.int64)
  if differs.any():
    at = [int(i) for i in np.argwhere(differs)[0]]
    raise BadInput(
      f"{cand_path}: tensor {name!r} differs from the golden's input at {at} ({c[tuple(at)]} vs "
      f"{g[tuple(at)]}): the candidate was computed from different inputs"
    )
  return Row(name, TensorKind.INPUT, Status.PASS, "identical to the golden's input", "identical", {})


def floats_row(
  name: str,
  g: np.ndarray,
  c: np.ndarray,
  bound: float,
  kind: TensorKind = TensorKind.FLOATS,
  extra: str = "",
  extra_metrics: Mapping | None = None,
) -> Row:
  """A float tensor judged by its NMSE against bound; for [T, D] also its worst token's NMSE."""
  fe = metrics.float_errors(g, c)
  m = _float_metrics(fe) | dict(extra_metrics or {})
  summary = (
    f"NMSE {sig3(fe.nmse)}, max abs {sig3(fe.max_abs)}, "
    f"max rel {sig3(fe.max_rel)}, max ULP {sig3(fe.max_ulp)}"
  )
  if g.ndim == 2 and g.shape[0] > 1:
    per = metrics.nmse_rows(g, c)
    worst = int(np.argmax(np.where(np.isnan(per), np.inf, per)))  # NaN ranks worst
    m["worst_token"], m["worst_token_nmse"] = worst, float(per[worst])
    if per[worst] != 0:
      summary += f"; worst token {worst} (NMSE {sig3(float(per[worst]))})"
  return Row(
    name,
    kind,
    Status.PASS if within_bound(fe.nmse, bound) else Status.FAIL,
    summary + extra,
    f"NMSE <= {sig3(bound)}",
    m,
  )


def ints_row(name: str, g: np.ndarray, c: np.ndarray) -> Row:
  """An integer tensor, which must be identical: how many values differ, and the first."""
  differs = np.asarray(g, np.int64) != np.asarray(c, np.int64)
  if not differs.any():
    return Row(name, TensorKind.INTS, Status.PASS, "identical", "identical", {"differ": 0})
  at = [int(i) for i in np.argwhere(differs)[0]]
  return Row(
    name,
    TensorKind.INTS,
    Status.FAIL,
    f"{int(differs.sum())} values differ; first at {at}: {c[tuple(at)]} vs golden {g[tuple(at)]}",
    "identical",
    {"differ": int(differs.sum()), "first": at},
  )
