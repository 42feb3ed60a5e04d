"""Task runner. Each session installs the project into its own virtualenv from PyPI.

nox -s tests       the default test suite (what CI runs)
nox -s crosscheck  kernels vs ggml at 10x the default size, under default XLA flags and
                   under --xla_cpu_max_isa=AVX (no FMA), plus the model vs transformers
nox -s bench       throughput vs ggml and forward time vs transformers, measured in one run
nox -s lint        ruff check and ruff format --check
nox -s goldens     regenerate goldens/ from seeds and verify it
nox -s retrain     retrain v3-pydoc into goldens/models/v3-pydoc (hf/ and train/; ~20 min on 2 cores);
                   `nox -s goldens` never retrains, it reads these committed files
"""

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PY = "3.11"
# torch is pinned to the CPU wheel these machines carry; any other version pulls a CUDA build.
INSTALL = [".[test,reference,ablate]"]


def _install(session):
  session.install("pip>=24")
  session.install(*INSTALL)


@nox.session(python=PY)
def tests(session):
  """Default suite: everything not marked slow (includes the ggml and transformers cross-checks)."""
  _install(session)
  session.run("python", "-m", "pytest", "-m", "not slow", "-n", "2", *session.posargs)


@nox.session(python=PY)
def crosscheck(session):
  """Ten times the default cross-check, with default XLA flags and with FMA unavailable."""
  _install(session)
  session.run(
    "python",
    "-m",
    "pytest",
    "-m",
    "crosscheck",
    "tests/quant",
    *session.posargs,
    env={"DQ3JAX_CROSSCHECK_SCALE": "10"},
  )
  session.run(
    "python",
    "-m",
    "tests.quant.crosscheck",
    "--blocks",
    "500000",
    env={"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX").strip()},
  )
  session.run("python", "-m", "pytest", "-m", "crosscheck", "tests/model", "tests/io")
  # llama.cpp at all eight calibration settings on every model golden (the default suite runs four).
  session.run("python", "-m", "pytest", "-m", "slow", "tests/compare/test_verdicts.py")


@nox.session(python=PY)
def bench(session):
  """Benchmarks (not tests): ratios against ggml and transformers measured in the same run."""
  _install(session)
  session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session(python=PY)
def lint(session):
  session.install("ruff>=0.6")
  paths = ["dq3jax", "reference", "tests", "benchmarks", "noxfile.py"]
  session.run("ruff", "check", *paths)
  session.run("ruff", "format", "--check", *paths)


@nox.session(python=PY)
def goldens(session):
  """Regenerate goldens/ from seeds (atomically), then verify the files against the manifest."""
  session.install("pip>=24")
  session.install(".")  # the generator needs no reference engines
  session.run("dq3jax", "goldens", "--dir", "goldens")
  session.run("dq3jax", "goldens", "--dir", "goldens", "--check", "--no-regenerate")


@nox.session(python=PY)
def retrain(session):
  """Train v3-pydoc on this Python's reference manual and overwrite its committed checkpoint and report."""
  session.install("pip>=24")
  session.install(".[ablate]")  # tokenizers
  session.run("python", "-m", "dq3jax.train", "goldens/models/v3-pydoc", *session.posargs)
