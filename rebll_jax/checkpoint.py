"""Orbax checkpoints: one at every task boundary, optionally mid-task.

Each checkpoint holds two items: ``state`` (train state, past model, replay
buffer: arrays) and ``meta`` (JSON: where in the protocol it was taken, the
results so far, the run's fingerprint). Writes are atomic (orbax writes to a
temporary directory and renames on commit), so a crash mid-save never leaves a
checkpoint that reads as complete. If the newest checkpoint cannot be read it
is skipped with a warning and the one before is used.
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Numbered saves (0, 1, 2, ...) in ``directory``; keeps the newest few."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True),
        item_names=("state", "meta"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, tree, meta: dict) -> int:
    steps = self.steps()
    number = steps[-1] + 1 if steps else 0
    self.manager.save(number, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()
    return number

  def read_meta(self, number: int) -> dict:
    return self.manager.restore(number, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, target):
    """(tree, meta) of the newest readable checkpoint, or (None, None)."""
    for number in reversed(self.steps()):
      try:
        restored = self.manager.restore(number, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]
      except Exception as e:  # pylint: disable=broad-except
        log.warning("checkpoint %d in %s is unreadable (%s: %s); trying the "
                    "previous one", number, self.directory, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
    return None, None

  def close(self):
    self.manager.close()
