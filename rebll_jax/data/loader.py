"""Deterministic batch assembly for one task: new data mixed with replay.

The order of a task's batches is a pure function of (seed, task, epoch), so
the loader's whole state is the step it is at: resuming at step s rebuilds
the same batches from s on. Each process reads only its slice of the global
batch (multi-host); a background thread keeps a few batches ready.

The last partial batch of an epoch is dropped (static shapes, no recompile);
a task smaller than one batch wraps around its permutation instead. With
``last_batch="keep"`` (the PyTorch baseline's ``drop_last=False``) it
trains: an epoch is ceil(rows / B) batches, and the last one is padded to B
with copies of its rows under ``row_weight`` 0 (one static shape). With
``processes`` P (``train.ddp_processes``) the epoch's order is first padded
to a multiple of P with its own first rows, as torch's
``DistributedSampler`` pads it, so each emulated process's share of the
last batch (rows p, p + P, ...) is as large as the others'.

With ``host_augment`` (``augment.policy=field``) each image of a batch is
augmented here, in the producer thread, by a transform whose randomness is
a function of (seed, task, step, global row): a batch stays a pure function
of its step, and each host's slice equals that slice of a one-host batch.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable

import numpy as np

from rebll_jax.data.base import Split
from rebll_jax.protocol import TaskView


MIXES = ("uniform", "fraction")  # memory.mix: how replay joins batches
LAST_BATCH = ("drop", "keep")  # train.last_batch: an epoch's short batch


@dataclasses.dataclass
class MemoryRows:
  """Host arrays of the replay rows visible this task (numpy)."""

  images: np.ndarray  # uint8 [m, H, W, 3]
  labels: np.ndarray  # float32 [m, C]
  known: np.ndarray  # bool [m, C]
  true_labels: np.ndarray  # uint8 [m, C], diagnostics only

  def __len__(self):
    return int(self.labels.shape[0])


def _epoch_order(rng_seed, task, epoch, size):
  rng = np.random.default_rng([rng_seed, task, epoch])
  return rng.permutation(size)


class TaskBatches:
  """Batches of one task. ``batch(step)`` is deterministic.

  mix="uniform": one permutation over new rows + memory rows (replay is
  proportional to its size). mix="fraction": each batch takes
  round(fraction * B) rows from memory and the rest from new data.
  """

  def __init__(self, *, split: Split, view: TaskView, memory: MemoryRows,
               global_batch: int, local_rows: slice, seed: int, task: int,
               mix: str = "uniform", fraction: float = 0.25,
               host_augment: Callable[..., np.ndarray] | None = None,
               last_batch: str = "drop", processes: int = 1):
    self.split, self.view, self.memory = split, view, memory
    # (images, *, seed, task, step, rows) -> images, e.g.
    # field_augment.HostAugment; None = raw images (augmented on device).
    self.host_augment = host_augment
    self.global_batch, self.local_rows = global_batch, local_rows
    self.seed, self.task = seed, task
    self.mix = mix if len(memory) else "uniform"
    num_new, num_mem = len(view), len(memory)
    if last_batch not in LAST_BATCH:
      raise ValueError(f"last_batch={last_batch!r}; valid: {LAST_BATCH}")
    # Keep: the epoch's order padded to a multiple of the processes.
    self.keep_rows = None
    if last_batch == "keep":
      if self.mix != "uniform":
        raise ValueError("last_batch='keep' needs mix='uniform'")
      self.keep_rows = -(-(num_new + num_mem) // processes) * processes
      self.steps_per_epoch = -(-self.keep_rows // global_batch)
    elif self.mix == "fraction":
      self.mem_per_batch = int(round(fraction * global_batch))
      self.new_per_batch = global_batch - self.mem_per_batch
      self.steps_per_epoch = max(1, num_new // self.new_per_batch)
    else:
      self.steps_per_epoch = max(1, (num_new + num_mem) // global_batch)

  def wrap_note(self) -> str | None:
    """Why one epoch repeats rows (a source shorter than its share of a
    batch; the loader wraps its permutation), or None."""
    num_new, num_mem = len(self.view), len(self.memory)
    if self.keep_rows is not None:
      return None  # a short batch is padded with rows of weight 0
    if self.mix == "fraction":
      short = [f"{n} {what} rows for {k} per batch" for n, k, what in (
          (num_new, self.new_per_batch, "new"),
          (num_mem, self.mem_per_batch, "memory")) if n < k]
    else:
      short = ([f"{num_new + num_mem} rows for a batch of "
                f"{self.global_batch}"]
               if num_new + num_mem < self.global_batch else [])
    if not short:
      return None
    return (f"task {self.task + 1} has {' and '.join(short)}: each batch "
            "repeats some rows (a smaller train.global_batch avoids it)")

  def _rows(self, step):
    """Global-batch row ids: >= 0 new-view rows, < 0 memory rows (-1-i)."""
    epoch, within = divmod(step, self.steps_per_epoch)
    num_new, num_mem = len(self.view), len(self.memory)
    if self.mix == "fraction":
      new = np.resize(_epoch_order(self.seed, self.task, epoch, num_new),
                      self.steps_per_epoch * self.new_per_batch)
      mem = np.resize(_epoch_order(self.seed + 1, self.task, epoch, num_mem),
                      self.steps_per_epoch * self.mem_per_batch)
      n0 = within * self.new_per_batch
      m0 = within * self.mem_per_batch
      return np.concatenate([new[n0:n0 + self.new_per_batch],
                             -1 - mem[m0:m0 + self.mem_per_batch]])
    order = np.resize(_epoch_order(self.seed, self.task, epoch,
                                   num_new + num_mem),
                      self.keep_rows or
                      self.steps_per_epoch * self.global_batch)
    rows = order[within * self.global_batch:(within + 1) * self.global_batch]
    # keep: a short last batch repeats its rows (weight 0, _row_weight).
    rows = np.resize(rows, self.global_batch)
    return np.where(rows < num_new, rows, -1 - (rows - num_new))

  def _row_weight(self, step) -> np.ndarray:
    """[B] float32: 1 for the rows of global batch ``step`` that count, 0
    for the padding of an epoch's short last batch (keep only)."""
    within = step % self.steps_per_epoch
    real = min(self.global_batch,
               self.keep_rows - within * self.global_batch)
    return (np.arange(self.global_batch) < real).astype(np.float32)

  def batch(self, step: int) -> dict:
    """This process's rows of global batch ``step`` as numpy arrays."""
    rows = self._rows(step)[self.local_rows]
    is_mem = rows < 0
    new_rows = rows[~is_mem]
    mem_rows = -1 - rows[is_mem]
    n = rows.shape[0]
    c = self.view.labels.shape[1]
    images = np.empty((n,) + self._image_shape(), np.uint8)
    labels = np.zeros((n, c), np.float32)
    known = np.zeros((n, c), bool)
    true = np.zeros((n, c), np.uint8)
    if new_rows.size:
      src = self.view.indices[new_rows]
      images[~is_mem] = self.split.read_images(src)
      labels[~is_mem] = self.view.labels[new_rows]
      known[~is_mem] = self.view.known[new_rows]
      true[~is_mem] = self.split.labels[src]
    if mem_rows.size:
      images[is_mem] = self.memory.images[mem_rows]
      labels[is_mem] = self.memory.labels[mem_rows]
      known[is_mem] = self.memory.known[mem_rows]
      true[is_mem] = self.memory.true_labels[mem_rows]
    if self.host_augment is not None:
      rows_in_global = np.arange(self.global_batch)[self.local_rows]
      images = self.host_augment(images, seed=self.seed, task=self.task,
                                 step=step, rows=rows_in_global)
    batch = {"images": images, "labels": labels, "known": known,
             "is_memory": is_mem, "true_labels": true}
    if self.keep_rows is not None:
      batch["row_weight"] = self._row_weight(step)[self.local_rows]
    return batch

  def _image_shape(self):
    if not hasattr(self, "_shape"):
      self._shape = self.split.read_images(self.view.indices[:1]).shape[1:]
    return self._shape

  def iterate(self, start: int, stop: int, prefetch: int = 2):
    """Yields (step, batch) for step in [start, stop), read ahead."""
    if prefetch <= 0:
      for step in range(start, stop):
        yield step, self.batch(step)
      return
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop_event = threading.Event()

    def produce():
      try:
        for step in range(start, stop):
          if stop_event.is_set():
            return
          ready.put((step, self.batch(step)))
      except BaseException as e:  # surfaced in the consumer
        ready.put(e)
      ready.put(None)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = ready.get()
        if item is None:
          return
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      stop_event.set()
      while thread.is_alive():  # unblock a producer waiting on a full queue
        try:
          ready.get_nowait()
        except queue.Empty:
          thread.join(timeout=0.05)


def eval_batches(split: Split, indices: np.ndarray, batch_size: int):
  """(images, valid count) chunks of a fixed size; the last is padded."""
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid)])
    yield split.read_images(chunk), valid
