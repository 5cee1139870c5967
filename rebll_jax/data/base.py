"""The data-source interface every dataset implements.

A source is two random-access splits. Labels are loaded eagerly (the protocol
needs all of them to cut tasks); images are read on demand, already resized to
the configured square size, as uint8 NHWC. Column ``c`` of ``labels`` is class
``class_names[c]``: sources return classes in the protocol's class order
(METHOD.md section 1), so the class order is the column order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a source.

  Attributes:
    labels: uint8 [num_images, num_classes], full multi-hot ground truth. The
      protocol derives partial views from it; training never reads it
      directly (only diagnostics do).
    image_ids: int64 [num_images], stable ids (deduplication, diagnostics).
    read_images: maps an int array of row indices to uint8
      [len(indices), size, size, 3].
    crowd_labels: uint8 [num_images, num_classes]: the classes present on an
      image only as crowd boxes (COCO ``iscrowd`` 1; never set where
      ``labels`` is). ``labels | crowd_labels`` is pycocotools' ``catToImgs``
      membership. All zeros when not given (synthetic, VOC, datasets
      prepared before it was recorded).
    dataset_ids: the dataset's own image ids, one per row, for reports such
      as ``protocol.json``: COCO's integer ids, VOC's file stems
      (``"000005"``). Defaults to ``image_ids`` as Python ints.
  """

  labels: np.ndarray
  image_ids: np.ndarray
  read_images: Callable[[np.ndarray], np.ndarray]
  crowd_labels: Optional[np.ndarray] = None
  dataset_ids: Optional[Sequence[Union[int, str]]] = None

  def __post_init__(self):
    n, c = np.shape(self.labels)
    if self.crowd_labels is None:
      object.__setattr__(self, "crowd_labels", np.zeros((n, c), np.uint8))
    elif np.shape(self.crowd_labels) != (n, c):
      raise ValueError(f"crowd_labels has shape {np.shape(self.crowd_labels)}"
                       f", labels {(n, c)}")
    if self.dataset_ids is None:
      object.__setattr__(self, "dataset_ids",
                         [int(i) for i in np.asarray(self.image_ids)])
    elif len(self.dataset_ids) != n:
      raise ValueError(f"{len(self.dataset_ids)} dataset_ids for {n} rows")

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, rows) -> "Split":
    """The rows ``rows`` (int indices) as a Split of their own."""
    rows = np.asarray(rows, np.int64)
    read = self.read_images
    return Split(labels=self.labels[rows], image_ids=self.image_ids[rows],
                 read_images=lambda idx: read(rows[np.asarray(idx, np.int64)]),
                 crowd_labels=self.crowd_labels[rows],
                 dataset_ids=[self.dataset_ids[i] for i in rows.tolist()])


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset: class names in column order plus train and test splits."""

  name: str
  class_names: Sequence[str]
  train: Split
  test: Split
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)
