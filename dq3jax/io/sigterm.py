"""SIGTERM as an exception while an atomic writer holds a temporary file.

Python turns Ctrl-C into KeyboardInterrupt, so a writer's `except BaseException: remove the temp file` runs,
but SIGTERM (kill, timeout, a batch scheduler) kills the process outright by default and leaves the hidden
temp file behind. Inside `as_exception()` SIGTERM raises Terminated instead, a SystemExit with the shell's
exit status for it (128 + 15), so the same cleanup runs and the process then exits without a traceback.
Every atomic writer in the package goes through this one context manager.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_STATUS = 128 + int(signal.SIGTERM)


class Terminated(SystemExit):
  """Raised in the main thread by SIGTERM inside `as_exception()`."""

  def __init__(self) -> None:
    super().__init__(EXIT_STATUS)


def _raise(signum, frame) -> None:
  # Later SIGTERMs are ignored while the cleanup runs; the previous handler returns when the block exits.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  raise Terminated()


@contextlib.contextmanager
def as_exception() -> Iterator[None]:
  """While the block runs, SIGTERM raises Terminated; on exit the previous handler is restored.

  Only where SIGTERM would kill the process without cleanup (the default action) and only in the main thread
  (the only one Python delivers signals to): a handler the program installed, an inherited SIG_IGN, and an
  enclosing `as_exception()` are left in charge."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.getsignal(signal.SIGTERM)
  if previous is not signal.SIG_DFL:
    yield
    return
  signal.signal(signal.SIGTERM, _raise)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
