"""How the host's C allocator treats freed memory (glibc on Linux).

XLA:CPU allocates the temporary buffers of a compiled program at every call
and frees them when it returns: tens of MB per train step of the default
experiment's small ResNet, GBs at 224 px. With glibc's defaults a block
above the mmap threshold (32 MiB at most) is served by fresh pages from
``mmap`` and unmapped on ``free``, and a heap top above 128 KiB is given
back to the kernel; so every step faults its temporaries in again and the
kernel zeroes each page. On the default experiment (2 cores, 2026-12-06,
``perf``) that was 22% of the train step's CPU time, and the step went from
86-92 ms to 66-70 ms once freed memory stayed with the process.

``config.host_malloc``:

- ``"retain"`` (default): ``mallopt`` with ``M_MMAP_MAX=0`` (every block
  from the heap), ``M_TRIM_THRESHOLD`` = 2 GiB - 1 (freed memory stays in
  the process for the next step) and ``M_TOP_PAD`` = 256 MiB (the heap grows
  in large steps). The process's resident memory then stays near its
  high-water mark instead of shrinking between steps.
- ``"system"``: the allocator is left as the process has it.

It changes where memory comes from, never a computed value. Only glibc
has ``mallopt``; elsewhere (macOS, musl) ``retain`` does nothing and says
so. It acts on the whole process, at any time (``mallopt`` needs no
restart), so a run applies it in ``train.set_up`` and the upstream
pretraining CLI at its start. Silent when it takes effect; a warning when
it cannot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

HOST_MALLOCS = ("retain", "system")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
RETAIN_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1),
                   (_M_TOP_PAD, 256 << 20))


@functools.lru_cache(maxsize=None)
def _glibc():
  """glibc's ``mallopt``, or None where the C library is not glibc."""
  name = ctypes.util.find_library("c") or "libc.so.6"
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return None
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def configure(choice: str) -> str | None:
  """Applies a ``host_malloc`` choice to this process. Returns None when it
  took effect as asked, else why not (one line for the log)."""
  if choice not in HOST_MALLOCS:
    raise ValueError(f"unknown host_malloc {choice!r}; valid: "
                     f"{list(HOST_MALLOCS)}")
  if choice == "system":
    return None
  mallopt = _glibc()
  if mallopt is None:
    return "host_malloc=retain: not glibc (no mallopt), allocator unchanged"
  failed = [param for param, value in RETAIN_SETTINGS
            if mallopt(param, value) != 1]
  if failed:
    return f"host_malloc=retain: mallopt refused parameters {failed}"
  return None


def apply(choice: str, logger: logging.Logger) -> None:
  """``configure``, with a warning in ``logger`` when it did not take."""
  problem = configure(choice)
  if problem:
    logger.warning(problem)
