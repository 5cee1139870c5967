"""The MLCIL protocol (METHOD.md section 1): task blocks and partial views.

Classes are the source's columns in the protocol's class order; ``B{b}-C{c}``
cuts them into consecutive blocks. A task's training view holds the images
with at least one class of its block, labelled on that block only (the rest
is *unknown*, not negative). The test view after task t holds the images with
at least one seen class, scored on all seen classes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rebll_jax.errors import UserError


def setting_name(base: int, increment: int) -> str:
  return f"B{base}-C{increment}"


def task_blocks(num_classes: int, base: int, increment: int,
                num_tasks: int = -1) -> list[np.ndarray]:
  """Class indices of each task: ``base`` (or ``increment`` if 0), then
  ``increment`` each. Raises UserError if the split does not fit."""
  name = setting_name(base, increment)
  if increment <= 0 or base < 0:
    raise UserError(f"setting {name}: protocol.increment must be > 0 and "
                    "protocol.base >= 0")
  first = base or increment
  if first > num_classes or (num_classes - first) % increment:
    raise UserError(
        f"setting {name} does not fit {num_classes} classes: the first task "
        f"takes {first}, and the remaining {num_classes - first} must be a "
        f"multiple of {increment}; change --config.protocol.base/increment")
  edges = [0, first] + list(range(first + increment, num_classes + 1,
                                   increment))
  blocks = [np.arange(a, b) for a, b in zip(edges[:-1], edges[1:])]
  if num_tasks > 0:
    blocks = blocks[:num_tasks]
  return blocks


def class_mask(num_classes: int, classes) -> np.ndarray:
  """Float32 [num_classes], 1 on ``classes``."""
  mask = np.zeros(num_classes, np.float32)
  mask[np.asarray(classes, np.int64)] = 1.0
  return mask


@dataclasses.dataclass(frozen=True)
class TaskView:
  """What the trainer may see of a split during one task.

  Attributes:
    indices: int64 [n], rows of the split in this view.
    labels: float32 [n, C], ground truth on the visible block, 0 elsewhere.
    known: bool [n, C], True on the visible block.
  """

  indices: np.ndarray
  labels: np.ndarray
  known: np.ndarray

  def __len__(self) -> int:
    return int(self.indices.shape[0])


def partial_view(full_labels: np.ndarray, classes) -> TaskView:
  """Images holding at least one of ``classes``, labelled on them only."""
  classes = np.asarray(classes, np.int64)
  visible = class_mask(full_labels.shape[1], classes).astype(bool)
  indices = np.flatnonzero(full_labels[:, classes].any(axis=1))
  labels = full_labels[indices].astype(np.float32) * visible
  known = np.broadcast_to(visible, labels.shape).copy()
  return TaskView(indices=indices.astype(np.int64), labels=labels,
                  known=known)


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the protocol: its index, block and class masks."""

  index: int  # 0-based
  classes: np.ndarray  # this task's block
  seen: np.ndarray  # all classes up to and including this block
  num_classes: int

  @property
  def current_mask(self) -> np.ndarray:
    return class_mask(self.num_classes, self.classes)

  @property
  def seen_mask(self) -> np.ndarray:
    return class_mask(self.num_classes, self.seen)

  @property
  def old_mask(self) -> np.ndarray:
    return self.seen_mask - self.current_mask


def make_tasks(num_classes: int, base: int, increment: int,
               num_tasks: int = -1) -> list[Task]:
  blocks = task_blocks(num_classes, base, increment, num_tasks)
  tasks = []
  for t, block in enumerate(blocks):
    seen = np.concatenate(blocks[:t + 1])
    tasks.append(Task(index=t, classes=block, seen=seen,
                      num_classes=num_classes))
  return tasks
