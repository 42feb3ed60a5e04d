"""dq3jax.io.atomic: the one atomic writer (SIGTERM during it: tests/io/test_sigterm.py)."""

from __future__ import annotations

import os
import stat

import pytest

from dq3jax.io.atomic import atomic_path


def test_replaces_only_on_success_with_plain_open_permissions(tmp_path):
  out = tmp_path / "r.json"
  out.write_text("old")
  with pytest.raises(RuntimeError), atomic_path(out) as tmp:
    open(tmp, "w").write("partial")
    raise RuntimeError
  assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["r.json"]
  with atomic_path(out) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".r.json.")
    open(tmp, "w").write("new")
  mask = os.umask(0o022)
  os.umask(mask)
  assert out.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["r.json"]
  assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
