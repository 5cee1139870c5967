"""The MLCIL protocol (METHOD.md section 1): task blocks and partial views.

Classes are the source's columns in the protocol's class order; ``B{b}-C{c}``
cuts them into consecutive blocks. A task's training view holds the images
with at least one class of its block, labelled on that block only (the rest
is *unknown*, not negative). The test view after task t holds the images with
at least one seen class, scored on all seen classes.

Crowd-only images (``protocol.keep_crowd_only_images``, issue 11): a COCO
image can hold a class only as crowd boxes (``iscrowd`` 1), which make no
label. The PyTorch baseline takes a task's images from pycocotools'
``catToImgs``, crowd boxes included, so such an image joins the task's
training view (with no positive on the block: its labels there are known
0s) and the test set after it. The functions below take the split's
``crowd_labels`` ([N, C], the classes present only as crowd boxes) as an
optional argument; None (or all zeros) keeps today's views.
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


def _members(full_labels, classes, crowd_labels=None) -> np.ndarray:
  """Rows holding one of ``classes``, as a label or (given) a crowd box."""
  held = np.asarray(full_labels)[:, classes] != 0
  if crowd_labels is not None:
    if np.shape(crowd_labels) != np.shape(full_labels):
      raise ValueError(f"crowd_labels has shape {np.shape(crowd_labels)}, "
                       f"labels {np.shape(full_labels)}")
    held = held | (np.asarray(crowd_labels)[:, classes] != 0)
  return np.flatnonzero(held.any(axis=1)).astype(np.int64)


def partial_view(full_labels: np.ndarray, classes,
                 crowd_labels: np.ndarray | None = None) -> TaskView:
  """Images holding at least one of ``classes``, labelled on them only.

  With ``crowd_labels`` ([N, C]) an image whose only objects of ``classes``
  are crowd boxes is in the view too, with 0 (known) on every class of the
  block.
  """
  classes = np.asarray(classes, np.int64)
  visible = class_mask(full_labels.shape[1], classes).astype(bool)
  indices = _members(full_labels, classes, crowd_labels)
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


def scored_rows(test_labels: np.ndarray, seen,
                crowd_labels: np.ndarray | None = None) -> np.ndarray:
  """int64 rows of the test split scored after a task whose seen classes
  are ``seen``: every image holding a seen class (with ``crowd_labels``,
  also those holding one only as crowd boxes)."""
  return _members(test_labels, np.asarray(seen, np.int64), crowd_labels)


# Sources whose data can hold crowd boxes, and the info key their prepare
# writes once it records them (datasets prepared before have none).
CROWD_SOURCES = ("coco2014", "coco_format")
CROWD_RECORDED = "num_crowd_only"


def crowd_labels_of(source, split: str, protocol_cfg) -> np.ndarray | None:
  """``source``'s ``split`` ("train" | "test") crowd-only labels when the
  protocol keeps crowd-only images, else None (also when the split has no
  crowd box: synthetic, VOC).

  Raises UserError when the protocol keeps them but a COCO source was
  prepared before crowd boxes were recorded (the switch would silently do
  nothing).
  """
  if not protocol_cfg.get("keep_crowd_only_images", False):
    return None
  info = getattr(source, "info", None) or {}
  if (getattr(source, "name", "") in CROWD_SOURCES
      and CROWD_RECORDED not in info):
    raise UserError(
        f"protocol.keep_crowd_only_images=True but the {source.name} data "
        f"in {info.get('path', 'data.data_dir')} records no crowd boxes "
        "(prepared by an older version): prepare it again with `python -m "
        "rebll_jax.prepare ... --overwrite`, or set "
        "--config.protocol.keep_crowd_only_images=False")
  crowd = getattr(getattr(source, split), "crowd_labels", None)
  if crowd is None or not np.any(crowd):
    return None
  return np.asarray(crowd)


def train_view(source, classes, protocol_cfg) -> TaskView:
  """``partial_view`` of ``source.train`` as ``protocol_cfg`` asks."""
  return partial_view(source.train.labels, classes,
                      crowd_labels_of(source, "train", protocol_cfg))


def eval_rows(source, seen, protocol_cfg) -> np.ndarray:
  """``scored_rows`` of ``source.test`` as ``protocol_cfg`` asks."""
  return scored_rows(source.test.labels, seen,
                     crowd_labels_of(source, "test", protocol_cfg))
