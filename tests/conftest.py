"""Test-session setup shared by every test directory."""

import os
import pathlib

import jax

# XLA compiles each kernel once per process (tens of seconds for the largest K-quant searches on a
# 2-core machine). A persistent compilation cache lets later runs on the same machine reuse them;
# results do not depend on it (a cold cache only costs time). DQ3JAX_XLA_CACHE="" disables it.
_cache = os.environ.get("DQ3JAX_XLA_CACHE", str(pathlib.Path.home() / ".cache" / "dq3jax" / "xla"))
if _cache:
  jax.config.update("jax_compilation_cache_dir", _cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
