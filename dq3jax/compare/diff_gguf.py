"""Judging a golden GGUF: every tensor's ggml type, shape and bytes; metadata differences listed."""

from __future__ import annotations

import dataclasses

from dq3jax.compare import metrics
from dq3jax.compare.diff_kinds import TensorKind
from dq3jax.compare.diff_rows import Row, Status, bytes_row
from dq3jax.compare.diff_thresholds import Thresholds


def _block_bytes(type_id: int) -> tuple[int, int]:
  from dq3jax.qtypes import REGISTRY  # noqa: PLC0415

  q = REGISTRY[type_id]  # read_gguf refuses a tensor whose type the registry does not know
  return q.block_elems, q.block_bytes


def _short(v) -> object:
  text = repr(v)
  return v if len(text) <= 80 else text[:77] + "..."


def compare_gguf(g, c, thr: Thresholds) -> tuple[list[Row], list[dict]]:
  """Every tensor of golden GGUF g against candidate GGUF c: ggml type, shape, then the bytes.

  A tensor missing from either file, or of another type or shape, is out of bounds (the files differ).
  Metadata differences are listed, not judged.
  """
  rows = []
  for name, te in g.tensors.items():
    ce = c.tensors.get(name)
    desc = f"{te.type_name} {list(te.ne)}"
    if ce is None:
      rows.append(
        Row(
          name,
          TensorKind.GGUF_TENSOR,
          Status.FAIL,
          f"missing from the candidate (golden: {desc})",
          "same type, shape, bytes",
          {"golden": desc},
        )
      )
      continue
    if ce.type_id != te.type_id or ce.ne != te.ne:
      rows.append(
        Row(
          name,
          TensorKind.GGUF_TENSOR,
          Status.FAIL,
          f"golden {desc}, candidate {ce.type_name} {list(ce.ne)}",
          "same type, shape, bytes",
          {"golden": desc, "candidate": f"{ce.type_name} {list(ce.ne)}"},
        )
      )
      continue
    elems, nbytes = _block_bytes(te.type_id)
    row_bytes = te.ne[0] // elems * nbytes
    ga = g.raw(name).reshape(-1, row_bytes)
    ca = c.raw(name).reshape(-1, row_bytes)
    d = metrics.byte_diff(ga, ca, nbytes)
    where = ""
    if d.first is not None:
      where = f" (file offsets {te.offset + d.first.byte_offset} / {ce.offset + d.first.byte_offset})"
    row = bytes_row(name, ga, ca, nbytes, thr, TensorKind.GGUF_TENSOR, where)
    rows.append(
      dataclasses.replace(row, summary=f"{desc}: {row.summary}", bound=row.bound + ", same type and shape")
    )
  for name, ce in c.tensors.items():
    if name not in g.tensors:
      rows.append(
        Row(
          name,
          TensorKind.GGUF_TENSOR,
          Status.FAIL,
          f"not in the golden (candidate: {ce.type_name} {list(ce.ne)})",
          "same tensors",
          {},
        )
      )
  meta = []
  for key in list(g.kv) + [k for k in c.kv if k not in g.kv]:
    gv, cv = g.kv.get(key, "<missing>"), c.kv.get(key, "<missing>")
    if gv != cv:
      meta.append({"key": key, "golden": _short(gv), "candidate": _short(cv)})
  return rows, meta
