"""The replay memory across tasks: what the trainer does between tasks.

Wires ``memory`` (buffer arrays, quotas, selection) and ``relabel`` (the
between-task pass) into the protocol. After task t: shrink old quotas (fixed
total budget), select task-t exemplars by herding on pooled features of the
trained model, store them with ground truth on task t's block and, for
methods with relabeling, the past model's labels on old classes (below the
diagonal of the label block matrix); then the trained model writes task t's
columns of every older row (above the diagonal). Finally the relabeled
entries are scored against the hidden ground truth, per block.

Before each task (``before_task``), with ``protocol.memory_future_labels=
ground_truth`` (the PyTorch baseline's rule, issue 11), every stored row's
visible range is widened to its own block plus every later block up to the
current task, with ground truth (``widen_labels``). The widened entries are
marked ground truth, so neither the online relabel (it fills unknown entries
only) nor the between-task pass (it skips ground truth) overwrites them.

Every model call goes through ``evaluation.Predictor``; what to do is asked
of the ``Method``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rebll_jax import diagnostics
from rebll_jax import memory as memory_lib
from rebll_jax import relabel
from rebll_jax.data.loader import MemoryRows


def create(config, method, source) -> memory_lib.Memory:
  """An empty buffer with the run's static capacity (0 without replay)."""
  size = config.data.image_size
  capacity = 0
  if method.replay:
    capacity = memory_lib.capacity_for(
        num_classes=source.num_classes, per_class=config.memory.per_class,
        total=config.memory.total, num_images=len(source.train),
        dedup=config.memory.dedup)
  return memory_lib.empty(capacity, (size, size, 3), source.num_classes)


# protocol.memory_future_labels: what an exemplar may see of later blocks.
MEMORY_FUTURE_LABELS = ("unknown", "ground_truth")


def widen_labels(mem: memory_lib.Memory, train_labels: np.ndarray, *, task,
                 tasks) -> memory_lib.Memory:
  """Ground truth on every stored row's own block up to ``task``'s block.

  Entry (i, c) of a valid row i stored in task s is set to
  ``train_labels[source_index[i], c]`` and marked known and ground truth
  when c belongs to the block of a task s..task.index; every other entry
  (older blocks, later tasks, empty rows) is left as it was. Pure and
  idempotent: widening twice for the same task is widening once.

  Args:
    train_labels: [N, C] full ground truth of the training split
      (``source_index`` rows into it).
    task: the task about to train; tasks: the protocol's tasks (blocks).
  """
  block_of = np.full((mem.num_classes,), np.iinfo(np.int32).max, np.int64)
  for t in tasks:
    block_of[np.asarray(t.classes, np.int64)] = t.index
  widen = (mem.valid[:, None]
           & (block_of[None, :] >= mem.task[:, None])
           & (block_of[None, :] <= task.index))
  if not widen.any():
    return mem
  rows = np.where(mem.valid, mem.source_index, 0)
  truth = np.asarray(train_labels)[rows].astype(np.float32)
  return dataclasses.replace(
      mem, labels=np.where(widen, truth, mem.labels),
      known=mem.known | widen, ground_truth=mem.ground_truth | widen)


def before_task(mem, *, config, source, task, tasks) -> memory_lib.Memory:
  """The buffer as ``task`` trains on it (``protocol.memory_future_labels``).

  Called at the start of every task, also when a run resumes mid-task:
  ``widen_labels`` is idempotent, so that resume trains on the same rows.
  """
  future = config.protocol.get("memory_future_labels", "unknown")
  if future not in MEMORY_FUTURE_LABELS:
    raise ValueError(f"protocol.memory_future_labels must be one of "
                     f"{MEMORY_FUTURE_LABELS}, got {future!r}")
  if future == "unknown" or mem.capacity == 0:
    return mem
  return widen_labels(mem, source.train.labels, task=task, tasks=tasks)


def visible_rows(mem: memory_lib.Memory, source) -> MemoryRows:
  """The stored rows as the loader mixes them into batches."""
  rows = memory_lib.valid_rows(mem)
  return MemoryRows(images=mem.images[rows], labels=mem.labels[rows],
                    known=mem.known[rows],
                    true_labels=source.train.labels[mem.source_index[rows]])


def after_task(mem, *, config, method, source, view, task, tasks, predictor,
               variables, old_variables):
  """Updates the buffer after ``task``; returns (buffer, label quality).

  ``view``: the task's partial view of the training split (candidates);
  ``predictor``: an ``evaluation.Predictor``; ``variables`` /
  ``old_variables``: the trained and the past model.
  """
  if not method.replay:
    return mem, {}
  num_classes = source.num_classes
  quotas = memory_lib.class_quotas(
      task.seen, num_classes=num_classes, per_class=config.memory.per_class,
      total=config.memory.total)
  mem = memory_lib.shrink(mem, quotas)

  _, features = predictor.predict_split(variables, source.train,
                                       view.indices)
  picked = memory_lib.select_exemplars(
      features, view.labels, task.classes, quotas,
      method=config.memory.selection,
      rng=np.random.default_rng([config.seed, task.index, 17]))
  rows, ranks = memory_lib.exemplar_rows(picked, num_classes=num_classes,
                                         dedup=config.memory.dedup)
  indices = view.indices[rows]
  labels, known = view.labels[rows].copy(), view.known[rows].copy()
  ground_truth = known.copy()
  taus = method.thresholds(config.relabel)
  if method.labels_old_classes_of_exemplars(task) and rows.size:
    # Below the diagonal: the past model labels the new rows' old classes.
    # Same rule as the online fill of new rows inside the train step.
    old_scores, _ = predictor.predict_split(old_variables, source.train,
                                            indices)
    old_scores = relabel.tempered(old_scores,
                                  method.past_model_temperature(config.loss))
    labels, known = map(np.asarray, relabel.relabel_new_rows(
        labels=labels, known=known, old_probs=old_scores,
        old_class_mask=task.old_mask, row_is_new=np.ones(rows.size, bool),
        tau_old=taus["tau_old"], tau_old_low=taus["tau_old_low"]))
  mem = memory_lib.add(
      mem, images=source.train.read_images(indices), labels=labels,
      known=known, ground_truth=ground_truth, task=task.index,
      image_id=source.train.image_ids[indices], source_index=indices,
      dedup=config.memory.dedup,
      ranks=ranks)

  if method.relabels_buffer_after(task):
    # Above the diagonal: the trained model labels older rows' new classes.
    write = (task.current_mask.astype(bool)[None, :]
             & (mem.task < task.index)[:, None] & ~mem.ground_truth)
    chunk = config.relabel.chunk
    predict = lambda images: predictor.predict(variables, images)[0]  # noqa: E731
    labels, known = relabel.relabel_buffer(
        predict, mem.images, mem.labels, mem.known, mem.valid, write,
        taus["tau_cur"], chunk, tau_low=taus["tau_cur_low"])
    mem = dataclasses.replace(mem, labels=labels, known=known)
  jax.block_until_ready(variables)
  return mem, diagnostics.buffer_quality(mem, source.train.labels, tasks)
