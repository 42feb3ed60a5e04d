"""SIGTERM during an atomic write removes the temporary output, as Ctrl-C does (dq3jax.io.sigterm).

The kills run in subprocesses: a SIGTERM that is not turned into an exception would end the test process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from dq3jax.io import sigterm


@pytest.fixture
def default_sigterm():
  # The helper acts only on the default action; a test runner may have installed its own handler.
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  signal.signal(signal.SIGTERM, previous)


def test_handler_only_inside_the_block_and_restored(default_sigterm):
  with sigterm.as_exception():
    inside = signal.getsignal(signal.SIGTERM)
    with sigterm.as_exception():  # nested: the outer one stays in charge
      assert signal.getsignal(signal.SIGTERM) is inside
    assert signal.getsignal(signal.SIGTERM) is inside
  assert inside not in (signal.SIG_DFL, signal.SIG_IGN)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  with pytest.raises(ValueError), sigterm.as_exception():  # an error leaves no handler behind either
    raise ValueError
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_program_handler_or_ignore_is_left_alone(default_sigterm):
  def mine(signum, frame):
    pass

  for handler in (mine, signal.SIG_IGN):
    signal.signal(signal.SIGTERM, handler)
    with sigterm.as_exception():
      assert signal.getsignal(signal.SIGTERM) is handler
    assert signal.getsignal(signal.SIGTERM) is handler


def test_other_threads_do_not_touch_signals(default_sigterm):
  seen = []

  def work():
    with sigterm.as_exception():
      seen.append(signal.getsignal(signal.SIGTERM))

  t = threading.Thread(target=work)
  t.start()
  t.join()
  assert seen == [signal.SIG_DFL]


# Each writer is run with a write step that sends the process SIGTERM while its temp output exists;
# the snippet prints the temp path it saw, so the test can check that exactly that path is gone.
_PRELUDE = """
import glob, os, signal, sys, time
out = sys.argv[1]
def term(pattern):
  print(*glob.glob(pattern), flush=True)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(30)  # the handler raises before this returns
"""
WRITERS = {
  "io.atomic.atomic_path": """
from dq3jax.io.atomic import atomic_path
with atomic_path(out) as tmp:
  open(tmp, "wb").write(b"partial")
  term(os.path.join(os.path.dirname(out), ".out.*.tmp"))
""",
  "ablate report": """
from dq3jax.ablate import report
def write(tmp):
  open(tmp, "w").write("{")
  term(os.path.join(os.path.dirname(out), ".out.*.tmp"))
report._atomic(out, write)
""",
  "goldens.write": """
import pathlib
from dq3jax import goldens
goldens.build = lambda progress, root, jobs: ({"a/b.bin": b"x"}, {"files": {}})
goldens._manifest_bytes = lambda manifest: term(os.path.join(os.path.dirname(out), ".goldens-new-*"))
goldens.write(pathlib.Path(out))
""",
  "train _write_json": """
import json
from dq3jax.train import run
def dump(obj, f, **kwargs):
  f.write("{")
  term(os.path.join(os.path.dirname(out), ".out.*.tmp"))
json.dump = dump
run._write_json(out, {"a": 1})
""",
  "diff write_json": """
import json
from dq3jax.compare import diff
def dump(obj, f, **kwargs):
  f.write("{")
  term(os.path.join(os.path.dirname(out), ".out.*.tmp"))
json.dump = dump
diff.write_json(out, {"a": 1})
""",
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_sigterm_during_a_write_leaves_nothing_behind(tmp_path, writer):
  out = tmp_path / "out"
  proc = subprocess.run(
    [sys.executable, "-c", _PRELUDE + WRITERS[writer], str(out)], capture_output=True, text=True, timeout=300
  )
  seen = proc.stdout.split()
  assert len(seen) == 1 and seen[0].startswith(str(tmp_path)), (proc.stdout, proc.stderr)
  assert proc.returncode == sigterm.EXIT_STATUS == 143, proc.stderr
  assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == []
