"""rebll_jax.host_malloc: freed host memory stays with the process.

Checked on the allocator itself (glibc's ``mallinfo2``), in fresh
processes: with ``retain`` a 64 MiB block comes from the heap, not from a
fresh ``mmap``, and freeing it leaves the heap in place; with ``system``
(glibc's defaults) the same block is mmapped. Plus the config plumbing: an
unknown choice is a one-line error, a run applies the choice, and resuming
under the other choice is allowed (it never changes a value).
"""

import ctypes
import json
import logging
import os
import subprocess
import sys

import pytest

from rebll_jax import host_malloc, run_identity, validate
from rebll_jax.errors import UserError

from tests.helpers import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc_only = pytest.mark.skipif(
    host_malloc._glibc() is None,  # pylint: disable=protected-access
    reason="mallopt is glibc's; elsewhere retain is documented as a no-op")

# In a fresh process: apply a choice, then report glibc's counters around
# one 64 MiB allocation and its release.
_PROBE = r"""
import ctypes, json, sys
sys.path.insert(0, {root!r})
from rebll_jax import host_malloc
said = host_malloc.configure({choice!r})

class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
before = libc.mallinfo2()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
held = libc.mallinfo2()
libc.free(block)
freed = libc.mallinfo2()
print(json.dumps({{"said": said, "mmapped_while_held": held.hblkhd - before.hblkhd,
                  "heap_after_free": freed.arena}}))
"""


def _probe(choice):
  out = subprocess.run(
      [sys.executable, "-c", _PROBE.format(root=ROOT, choice=choice)],
      capture_output=True, text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_retain_serves_large_blocks_from_the_heap_and_keeps_them():
  retained = _probe("retain")
  assert retained["said"] is None  # took effect
  assert retained["mmapped_while_held"] == 0
  assert retained["heap_after_free"] >= 64 << 20  # not trimmed back


@glibc_only
def test_system_leaves_glibc_mmapping_large_blocks():
  default = _probe("system")
  assert default["said"] is None
  assert default["mmapped_while_held"] >= 64 << 20
  assert default["heap_after_free"] < 64 << 20


def test_unknown_choice_is_a_config_error_and_a_value_error():
  with pytest.raises(UserError, match="unknown host_malloc 'fast'; valid"):
    validate.check_config(make_config(host_malloc="fast"))
  with pytest.raises(ValueError, match="unknown host_malloc 'fast'"):
    host_malloc.configure("fast")


def test_not_glibc_is_said_not_hidden(monkeypatch):
  monkeypatch.setattr(host_malloc, "_glibc", lambda: None)
  assert host_malloc.configure("retain") == (
      "host_malloc=retain: not glibc (no mallopt), allocator unchanged")


def test_a_refused_parameter_is_reported(monkeypatch):
  refused = host_malloc.RETAIN_SETTINGS[1][0]
  monkeypatch.setattr(host_malloc, "_glibc",
                      lambda: lambda param, value: int(param != refused))
  assert host_malloc.configure("retain") == (
      f"host_malloc=retain: mallopt refused parameters [{refused}]")


def test_resume_may_change_it():
  assert run_identity.may_change("host_malloc")


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_a_run_applies_its_choice_and_warns_only_when_it_cannot(
    monkeypatch, tmp_path):
  from rebll_jax import train  # pylint: disable=g-import-not-at-top
  logger = logging.getLogger("rebll_jax")
  handler = _Lines()
  logger.addHandler(handler)
  monkeypatch.setattr(logger, "level", logging.INFO)
  real_configure = host_malloc.configure
  seen = []
  try:
    monkeypatch.setattr(host_malloc, "configure",
                        lambda choice: seen.append(choice) or None)
    train.set_up(make_config(host_malloc="system"),
                 str(tmp_path / "w")).lock.release()
    assert seen == ["system"]
    assert not [l for l in handler.lines if "host_malloc" in l]
    monkeypatch.setattr(host_malloc, "configure", real_configure)
    monkeypatch.setattr(host_malloc, "_glibc", lambda: None)
    train.set_up(make_config(), str(tmp_path / "w2")).lock.release()
    assert ("host_malloc=retain: not glibc (no mallopt), allocator "
            "unchanged") in handler.lines
  finally:
    logger.removeHandler(handler)
