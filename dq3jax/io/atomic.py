"""Atomic file output: every writer of the package (GGUF, reports, plots, training records) writes a temp file
beside its target and renames it into place, so a reader never sees a partial file and an interrupted run
(Ctrl-C, or SIGTERM through dq3jax.io.sigterm) leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from dq3jax.io import sigterm


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temp path next to `path` (".NAME.<random>.tmp"); on success it is synced and replaces `path`
  with the permissions a plain open() would give (mkstemp's are 0600); on any exception it is removed."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  with sigterm.as_exception():
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
      os.close(fd)
      yield tmp
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
      os.chmod(tmp, 0o666 & ~_umask())
      os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a partial file behind
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
      raise
