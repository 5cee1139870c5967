"""The data-source interface every dataset implements.

A source is two random-access splits. Labels are loaded eagerly (the protocol
needs all of them to cut tasks); images are read on demand, already resized to
the configured square size, as uint8 NHWC. Column ``c`` of ``labels`` is class
``class_names[c]``: sources return classes in the protocol's class order
(METHOD.md section 1), so the class order is the column order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

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
  """

  labels: np.ndarray
  image_ids: np.ndarray
  read_images: Callable[[np.ndarray], np.ndarray]

  def __len__(self) -> int:
    return int(self.labels.shape[0])


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
