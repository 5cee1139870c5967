"""Test setup: 8 virtual CPU devices and one compilation cache per session.

Both are environment variables set before jax is imported, so the xdist
workers and the command-line runs the tests start as subprocesses inherit
them.
"""

import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same programs (one tiny config, one run per method,
# resumed runs, CLI subprocesses). A persistent XLA cache shared by the whole
# session compiles each distinct program once; the cache key covers the
# program, the compile options and XLA_FLAGS, so a hit is the same executable.
# The controller creates the folder and removes it at the end; the xdist
# workers (started from the controller's environment) find it set.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="rebll_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A finite size turns on jax's file lock around reads and writes: the two
# workers and their subprocesses share the folder, and without the lock a
# reader can see a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
