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
  previous checkpoint is tried.
- Edited or damaged metadata (results so far, position, label sums): the
  CRC-32 of its canonical JSON is stored in it and checked before anything
  else is read; a mismatch is damage, as above.
- A checkpoint of another run. ``check_meta`` (the caller's fingerprint
  check) runs on the metadata before any array is read; its ``UserError``
  is never mistaken for damage and propagates.
"""

from __future__ import annotations

import json
import logging
import os
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from rebll_jax.errors import UserError

log = logging.getLogger(__name__)


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
    meta = {**meta, "checksum": checksum(tree)}
    meta["meta_checksum"] = meta_checksum(meta)
    self.manager.save(number, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()
    return number

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
      try:
        tree = self.manager.restore(number, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._skip(number, "its arrays are unreadable", e))
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
