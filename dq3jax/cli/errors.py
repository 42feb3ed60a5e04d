"""The exit-code policy of every `dq3jax` command, in one place.

  0    done: the command did what it was asked (diff: every tensor within bounds)
  1    a judged failure: the command ran and its verdict is negative (diff: out of bounds; goldens --check:
       problems found)
  2    bad input: an argparse usage error, or a ValueError (the package's input errors subclass it:
       RecipeError, CheckpointError, GGUFError, ImatrixError, BadInput, NonFiniteError, ...) or an OSError
       (a path that is missing, not a directory, unreadable or unwritable) raised by a command; reported as
       one line `dq3jax CMD: error: MESSAGE` on stderr, never as a traceback
  130  interrupted (Ctrl-C), with a one-line message
  143  SIGTERM while an atomic writer held a temp file (dq3jax.io.sigterm.Terminated, a SystemExit: passed
       through, after the writer removed its temp file)

A command's glue raises instead of printing and returning a status, so that every command reports bad
input the same way; only a verdict (0 or 1) is returned.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

OK = 0
FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130

# For each command's --help, so that a script author need not read this module.
EPILOG = (
  "exit status: 0 done (diff: within bounds), 1 judged failure (diff out of bounds, goldens --check "
  "problems), 2 bad input, 130 interrupted, 143 terminated (SIGTERM)"
)


def describe(e: BaseException) -> str:
  """One line for an input error: an OSError as `PATH: reason` (its str() would be `[Errno 2] ...: 'PATH'`),
  anything else as its message."""
  if isinstance(e, OSError) and e.strerror:
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {e.strerror}" if paths else e.strerror
  return str(e)


def report(command: str, message: str) -> None:
  print(f"dq3jax {command}: error: {message}", file=sys.stderr)


def run(command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
  """func(args) under the policy: its status (0 or 1), or the status its exception stands for."""
  try:
    return func(args)
  except (ValueError, OSError) as e:
    report(command, describe(e))
    return BAD_INPUT
  except KeyboardInterrupt:
    # The writers' cleanup has run by now (they remove their temp files on any BaseException).
    print(f"dq3jax {command}: interrupted", file=sys.stderr)
    return INTERRUPTED
