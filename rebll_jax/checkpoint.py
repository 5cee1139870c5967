"""Orbax checkpoints: one at every task boundary, optionally mid-task.

Each checkpoint holds two items: ``state`` (train state, past model, replay
buffer: arrays) and ``meta`` (JSON: where in the protocol it was taken, the
results so far, the run's fingerprint, a checksum of the arrays).

Faults this module guards against:

- A crash during a save. Orbax writes into ``N.orbax-checkpoint-tmp-*`` and
  renames to ``N`` only on commit, so a half-written checkpoint is never
  listed; leftover temporary directories are removed when the manager opens.
- A damaged checkpoint (a truncated or deleted file, flipped bytes). The
  restore fails, or the CRC-32 of the restored arrays disagrees with the one
  stored in ``meta``; either way it is skipped with a warning and the
  previous checkpoint is tried. A failed restore leaves orbax's other reads
  failing later in its threads; their tracebacks are silenced (the warning
  said it all).
- Edited or damaged metadata (results so far, position, label sums): the
  CRC-32 of its canonical JSON is stored in it and checked before anything
  else is read; a mismatch is damage, as above.
- A checkpoint of another run. ``check_meta`` (the caller's fingerprint
  check) runs on the metadata before any array is read; its ``UserError``
  is never mistaken for damage and propagates.
- A disk that fills up. ``save`` first compares the free space with the
  arrays' size and stops before writing when they cannot fit. If the disk
  fills during the write, orbax fails inside its writer threads (tensorstore
  reports ENOSPC as a ValueError), logs a traceback per thread, and the
  writes still in flight later find their event loop closed; ``save`` holds
  the log records back, silences that aftermath (``_HeldLogs``), removes
  the half-written temporary directory and raises ``NoSpaceError`` with one
  line. Older checkpoints are deleted only after a save commits, so the
  previous one is intact and a rerun resumes from it.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import sys
import threading
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from rebll_jax.errors import NoSpaceError, UserError

log = logging.getLogger(__name__)

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore (orbax's array writer) words ENOSPC in its ValueError.
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded",
                  "os_error_code='28'")
# Loggers orbax's save machinery reports its threads' failures on.
_SAVE_LOGGERS = ("absl", "asyncio")


def is_no_space(error: BaseException) -> bool:
  """Whether ``error`` (or anything it wraps) says the disk is full."""
  stack, seen = [error], set()
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
      return True
    if any(t in str(e) for t in _NO_SPACE_TEXT):
      return True
    stack += [e.__cause__, e.__context__,
              *getattr(e, "exceptions", ())]  # ExceptionGroup
  return False


def _is_abandoned_io_noise(error, text: str) -> bool:
  """Whether a report is the aftermath of an orbax save or restore that
  already failed (and that we reported, in one line)."""
  return ((error is not None and is_no_space(error)) or
          any(t in text for t in _NO_SPACE_TEXT) or
          "Event loop is closed" in text or
          # asyncio's report of an orbax task or tensorstore future whose
          # failure nobody awaited
          ("exception was never retrieved" in text and
           ("orbax" in text or "tensorstore" in text)))


class _DropAbandonedIoNoise(logging.Filter):
  """Drops log records of orbax's abandoned reads and writes."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not _is_abandoned_io_noise(error, record.getMessage())


def _dropping_abandoned_io(previous):
  """``previous`` (an unraisable hook) behind a filter of that aftermath."""
  if getattr(previous, "drops_abandoned_io", False):
    return previous

  def hook(unraisable):
    error = unraisable.exc_value
    if error is not None and _is_abandoned_io_noise(error, str(error)):
      return
    previous(unraisable)

  hook.drops_abandoned_io = True
  return hook


class _HeldLogs(logging.Filter):
  """Holds back what orbax reports during a save or restore, to replay after.

  Log records of orbax's loggers, and exceptions its callback threads raise
  outside any caller (``sys.unraisablehook``).

  Set ``silence_aftermath`` after a failure: when one array fails (disk full
  while saving; a damaged file while restoring) orbax closes its event loop
  while other tensorstore reads or writes still run. They fail later, off
  our stack, in asyncio "exception was never retrieved" records (a traceback
  per array) and "Event loop is closed" errors in tensorstore's callback
  threads: dozens of tracebacks after our one line that said what happened.
  On exit those are then dropped for the rest of the process (the filters
  go in before the holding ends, so nothing slips between); everything else
  still shows, including what ``replay`` hands back.
  """

  def __init__(self):
    super().__init__()
    self.records, self.unraisables = [], []
    self._loggers = [logging.getLogger(n) for n in _SAVE_LOGGERS]
    self._hook = None
    self.silence_aftermath = False

  def filter(self, record):
    self.records.append(record)
    return False

  def __enter__(self):
    for logger in self._loggers:
      logger.addFilter(self)
    self._hook = sys.unraisablehook
    sys.unraisablehook = self.unraisables.append
    return self

  def __exit__(self, *exc):
    for logger in self._loggers:
      if self.silence_aftermath and not any(
          isinstance(f, _DropAbandonedIoNoise) for f in logger.filters):
        logger.addFilter(_DropAbandonedIoNoise())
      logger.removeFilter(self)
    if sys.unraisablehook == self.unraisables.append:  # one assignment
      sys.unraisablehook = (_dropping_abandoned_io(self._hook)
                            if self.silence_aftermath else self._hook)

  def replay(self):
    """Hands the held reports to their loggers and hook (after the block)."""
    for record in self.records:
      logging.getLogger(record.name).handle(record)
    for unraisable in self.unraisables:
      sys.unraisablehook(unraisable)


def peek_fingerprint(directory: str) -> dict | None:
  """The fingerprint in the newest committed checkpoint under
  ``directory`` whose metadata parses, read as plain JSON (None if there
  is none). Read-only, without a manager: opening one removes temporary
  directories, which may be a live run's save in progress (for a dry run,
  which takes no workdir lock)."""
  if not os.path.isdir(directory):
    return None
  numbers = sorted((int(n) for n in os.listdir(directory) if n.isdigit()),
                   reverse=True)  # committed saves only: N, not N.tmp*
  for number in numbers:
    try:
      with open(os.path.join(directory, str(number), "meta",
                             "metadata")) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(meta, dict) and isinstance(meta.get("fingerprint"), dict):
      return meta["fingerprint"]
  return None


def meta_checksum(meta: dict) -> str:
  """CRC-32 of the metadata's canonical JSON (minus its own checksum)."""
  body = {k: v for k, v in meta.items() if k != "meta_checksum"}
  return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def checksum(tree) -> str:
  """CRC-32 over the bytes, dtypes and shapes of every leaf, in tree order."""
  crc = 0
  for leaf in jax.tree.leaves(tree):
    array = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{array.dtype}{array.shape}".encode(), crc)
    crc = zlib.crc32(array.view(np.uint8).reshape(-1) if array.size else b"",
                     crc)
  return f"{crc:08x}"


def _on_host(tree):
  """``tree`` with its device arrays copied to numpy, all at once.

  Handed device arrays, orbax moves each one to the host itself, slicing
  out one replica per array with an eager op (a compile per new shape):
  0.3-0.4 s of every save of the default experiment on 2 CPU devices, where
  the whole state is a few MB. Restores are unchanged: the arrays come back
  on the target's devices and shardings either way. With several processes
  the tree goes to orbax as it is (each process writes what it owns).
  """
  if jax.process_count() > 1:
    return tree
  return jax.device_get(tree)


_SAVE_SLACK_BYTES = 1 << 20  # orbax's metadata files and the JSON item
_JOIN_SECONDS = 30.0  # most to wait for orbax's writers after a failed save


def _join_orbax_threads(timeout: float):
  """Waits for orbax's writer threads still running after a failed save.

  One thread's failure ends the save while the others still write; left
  alone they fail at interpreter exit with tracebacks of their own.
  """
  deadline = time.monotonic() + timeout
  for thread in threading.enumerate():
    if (thread is not threading.current_thread() and
        type(thread).__module__.startswith("orbax.")):
      try:
        thread.join(max(0.0, deadline - time.monotonic()))
      except Exception:  # pylint: disable=broad-except
        pass  # orbax's threads re-raise their own failure on join


def _no_space(number: int) -> NoSpaceError:
  return NoSpaceError(f"no space left on device while saving checkpoint "
                      f"{number}; free space and rerun to resume")


class Checkpointer:
  """Numbered saves (0, 1, 2, ...) in ``directory``; keeps the newest few."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True,
            cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, tree, meta: dict) -> int:
    """Writes ``tree`` and ``meta`` (plus the tree's checksum) atomically."""
    steps = self.steps()
    number = steps[-1] + 1 if steps else 0
    tree = _on_host(tree)
    meta = {**meta, "checksum": checksum(tree)}
    meta["meta_checksum"] = meta_checksum(meta)
    self._check_free_space(tree, number)
    with _HeldLogs() as held:
      try:
        self.manager.save(number, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        error = None
      except Exception as e:  # pylint: disable=broad-except
        error = e
        if is_no_space(e):
          _join_orbax_threads(_JOIN_SECONDS)  # their failures: held, dropped
          held.silence_aftermath = True
    held.replay()
    if error is None:
      return number
    if not is_no_space(error):
      raise error
    self._remove_temporary(number)
    raise _no_space(number) from None

  def _check_free_space(self, tree, number: int):
    """Stops before writing a checkpoint that cannot fit (statvfs: cheap)."""
    need = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:
      return  # cannot tell: let the save itself find out
    if free < need + _SAVE_SLACK_BYTES:
      raise _no_space(number)

  def _remove_temporary(self, number: int, settle_seconds: float = 5.0):
    """Frees what a failed save of ``number`` wrote (best effort).

    A writer thread that outlived the join may still create files: remove
    until the folder stays gone for a moment (bounded by settle_seconds).
    """
    pattern = os.path.join(self.directory, f"{number}.orbax-checkpoint-tmp*")
    deadline = time.monotonic() + settle_seconds
    while True:
      paths = glob.glob(pattern)
      for path in paths:
        shutil.rmtree(path, ignore_errors=True)
      if not paths and time.monotonic() > deadline - settle_seconds + 0.5:
        return  # nothing reappeared for half a second
      if time.monotonic() > deadline:
        return
      time.sleep(0.1)

  def read_meta(self, number: int) -> dict:
    return self.manager.restore(number, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, target, check_meta=None):
    """(tree, meta) of the newest sound checkpoint, or (None, None).

    Args:
      target: a tree with the structure, shapes and shardings to restore.
      check_meta: called with each candidate's metadata before its arrays are
        read; a ``UserError`` it raises (another run's checkpoint) propagates.

    Raises:
      UserError: checkpoints exist but none can be restored (all damaged, or
        saved with a state of another shape); never starts over silently.
    """
    failures = []
    for number in reversed(self.steps()):
      try:
        meta = self.read_meta(number)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._skip(number, "its metadata is unreadable", e))
        continue
      if meta.get("meta_checksum") != meta_checksum(meta):
        failures.append(self._skip(number, "its metadata fails the checksum "
                                   "(edited or damaged)", None))
        continue
      if check_meta is not None:
        check_meta(meta)  # UserError propagates: not damage
      with _HeldLogs() as held:
        try:
          tree = self.manager.restore(number, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target)))["state"]
          error = None
        except Exception as e:  # pylint: disable=broad-except
          error = e
          held.silence_aftermath = True  # its other reads fail later
      held.replay()
      if error is not None:
        failures.append(self._skip(number, "its arrays are unreadable", error))
        continue
      expected = meta.get("checksum")
      if expected is not None and checksum(tree) != expected:
        failures.append(self._skip(number, "its arrays fail the checksum",
                                   None))
        continue
      return tree, meta
    if failures:
      raise UserError(
          f"no checkpoint in {self.directory} can be restored (newest: "
          f"{failures[0]}); if the config changed (model, optimizer, memory "
          "size) use a new --workdir, otherwise move the damaged checkpoints "
          "away")
    return None, None

  def _skip(self, number, why, error) -> str:
    detail = ""
    if error is not None:
      first = str(error).splitlines()[0] if str(error) else ""
      detail = f" ({type(error).__name__}: {first[:200]})"
    message = f"checkpoint {number}: {why}{detail}"
    log.warning("%s; skipping it and trying the previous one", message)
    return message

  def close(self):
    self.manager.close()
