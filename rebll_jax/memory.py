"""The replay buffer: fixed-capacity numpy arrays in host memory.

The buffer never lives on the accelerator: images are uint8 before
augmentation, and the trainer gathers the rows of each batch on the host and
sends them through the same augmentation as new data. Its capacity is fixed
when the run starts (``capacity_for``), so array shapes never change across
tasks and a checkpoint is a dict of fixed-shape arrays (``to_state`` /
``from_state``).

Each stored row keeps, for every class, the herding rank it was selected
with (-1 = not selected for that class). That is what lets a fixed total
budget shrink old classes' quotas by dropping their worst-ranked rows, and
what lets one image chosen for several classes be stored once (dedup by
image id) while still counting toward each class's quota. With
``dedup=False`` (``memory.dedup``; the baseline on VOC) an image is stored
once per (class, pick) instead, each row ranked for its one class.

Exemplar selection (``memory.selection``, the names of ``SELECTIONS``):
``herding`` (nearest running mean without repeats), ``herding_icarl`` (the
iCaRL code's running-target herding, the baseline's) and ``random``.

Typical use after task t (host side):

  quotas = class_quotas(seen_classes, per_class=..., total=..., num_classes=C)
  mem = shrink(mem, quotas)                   # fixed total: old quotas shrink
  picked = select_exemplars(feats, task_labels, new_classes, quotas,
                            method="herding", rng=rng)
  rows, ranks = exemplar_rows(picked, num_classes=C, dedup=...)
  mem = add(mem, images=..., labels=..., known=..., ground_truth=...,
            task=t, image_id=..., source_index=..., ranks=ranks, dedup=...)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

FIELDS = ("images", "labels", "known", "ground_truth", "valid", "task",
          "image_id", "source_index", "rank")


@dataclasses.dataclass(frozen=True)
class Memory:
  """The buffer's arrays; row i is meaningful only where ``valid[i]``.

  Attributes:
    images: uint8 [capacity, height, width, 3], before augmentation.
    labels: float32 [capacity, num_classes], the label matrix rows y.
    known: bool [capacity, num_classes], entries L_cls may read (ground truth
      or relabeled); everything else is unknown, not negative.
    ground_truth: bool [capacity, num_classes], the known entries that are
      dataset ground truth (the rest of ``known`` was relabeled). Relabel
      passes skip these and diagnostics score only the others.
    valid: bool [capacity].
    task: int32 [capacity], the task whose data first stored the row (-1 =
      empty), i.e. the row block of METHOD.md's label block matrix.
    image_id: int64 [capacity] (-1 = empty), the dedup key.
    source_index: int64 [capacity] (-1 = empty), row of the image in the
      source's train split (diagnostics against hidden ground truth).
    rank: int32 [capacity, num_classes], the row's herding (or random) rank
      among the exemplars of each class, -1 where not selected for it.
  """

  images: np.ndarray
  labels: np.ndarray
  known: np.ndarray
  ground_truth: np.ndarray
  valid: np.ndarray
  task: np.ndarray
  image_id: np.ndarray
  source_index: np.ndarray
  rank: np.ndarray

  @property
  def capacity(self) -> int:
    return int(self.valid.shape[0])

  @property
  def num_classes(self) -> int:
    return int(self.labels.shape[1])

  @property
  def size(self) -> int:
    return int(self.valid.sum())


def capacity_for(*, num_classes: int, per_class: int = 0, total: int = 0,
                 num_images: int = 0, dedup: bool = True) -> int:
  """The buffer's static capacity: ``total`` if > 0, else per_class * C,
  at most what ``num_images`` training images (if given) can fill.

  Both are upper bounds on the rows any task can need: quotas never exceed
  per_class per class (growing budget), or sum to at most ``total``, and
  dedup only removes rows. And no class picks an image twice, so a buffer
  never holds more rows than the training images (dedup: one row per image)
  or than images x classes (without): a budget above that would only
  allocate (and checkpoint) empty rows; memory.per_class=100000 once
  allocated 6 GB and the kernel killed the run.
  """
  if total > 0:
    capacity = int(total)
  elif per_class <= 0:
    raise ValueError("need memory.per_class > 0 or memory.total > 0")
  else:
    capacity = int(per_class) * int(num_classes)
  if num_images > 0:
    capacity = min(capacity, int(num_images) * (1 if dedup
                                                else int(num_classes)))
  return capacity


def empty(capacity: int, image_shape: Sequence[int],
          num_classes: int) -> Memory:
  """An empty buffer; image_shape is (height, width, 3)."""
  cap, c = int(capacity), int(num_classes)
  return Memory(
      images=np.zeros((cap, *image_shape), np.uint8),
      labels=np.zeros((cap, c), np.float32),
      known=np.zeros((cap, c), bool),
      ground_truth=np.zeros((cap, c), bool),
      valid=np.zeros((cap,), bool),
      task=np.full((cap,), -1, np.int32),
      image_id=np.full((cap,), -1, np.int64),
      source_index=np.full((cap,), -1, np.int64),
      rank=np.full((cap, c), -1, np.int32))


def to_state(mem: Memory) -> dict[str, np.ndarray]:
  """A checkpointable dict of numpy arrays (fixed shapes across tasks)."""
  return {name: getattr(mem, name) for name in FIELDS}


def from_state(state: Mapping[str, np.ndarray]) -> Memory:
  """Inverse of ``to_state`` (accepts anything np.asarray takes)."""
  mem = empty(1, (1, 1, 3), 1)  # only for the dtypes
  return Memory(**{name: np.asarray(state[name],
                                    getattr(mem, name).dtype).copy()
                   for name in FIELDS})


def class_quotas(classes: Sequence[int], *, num_classes: int,
                 per_class: int = 0, total: int = 0) -> np.ndarray:
  """Exemplars allowed per class, int32 [num_classes] (0 for unseen classes).

  Args:
    classes: the seen classes, in the order they were learned.
    per_class: growing budget (memory.per_class), used when total == 0.
    total: fixed total (memory.total) split evenly over the seen classes;
      the remainder of the division goes one each to the earliest classes.
  """
  classes = np.asarray(classes, np.int64)
  quotas = np.zeros((num_classes,), np.int32)
  if classes.size == 0:
    return quotas
  if total > 0:
    base, extra = divmod(int(total), classes.size)
    quotas[classes] = base
    quotas[classes[:extra]] += 1
  else:
    quotas[classes] = per_class
  return quotas


def herding(features: np.ndarray, k: int) -> np.ndarray:
  """iCaRL herding: k row indices of features [n, D], in selection order.

  Features are L2-normalised; step j picks the (not yet picked) row whose
  addition brings the running mean of the picked rows closest to the mean of
  all rows (the form of iCaRL herding most PyTorch CIL code uses, without
  repeats). Ties go to the lowest index. k > n returns all n rows.
  """
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  n = x.shape[0]
  k = min(int(k), n)
  if k <= 0:
    return np.zeros((0,), np.int64)
  mu = x.mean(axis=0)
  picked = np.zeros((n,), bool)
  order = np.empty((k,), np.int64)
  running = np.zeros_like(mu)  # sum of the picked rows
  for j in range(k):  # k steps, each vectorised over all candidates
    dist = np.linalg.norm(mu[None] - (running[None] + x) / (j + 1), axis=1)
    dist[picked] = np.inf
    i = int(np.argmin(dist))
    order[j], picked[i] = i, True
    running += x[i]
  return order


HERDING_ICARL_ITERATIONS = 1000


def herding_icarl(features: np.ndarray, k: int) -> np.ndarray:
  """The iCaRL code's herding: k row indices of features [n, D], in order.

  Rows are L2-normalised as that code does (``x / (|x| + 1e-8)``); with
  ``mu`` their mean and the target ``w = mu``, each iteration picks
  ``argmax(x @ w)`` (ties: the lowest index; a row may be picked again)
  and moves the target, ``w += mu - x[pick]``, until k distinct rows are
  picked or after 1000 iterations. The result is the distinct picks in the
  order first picked; if fewer than k, the rows never picked follow in index
  order (the reference code takes them in an arbitrary order). Computed in
  float64 (the reference: float32). k > n returns all n rows.
  """
  x = np.asarray(features, np.float64)
  x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
  n = x.shape[0]
  k = min(int(k), n)
  if k <= 0:
    return np.zeros((0,), np.int64)
  mu = x.mean(axis=0)
  target = mu.copy()
  picked = np.zeros((n,), bool)
  order = []
  for _ in range(HERDING_ICARL_ITERATIONS):
    if len(order) == k:
      break
    i = int(np.argmax(x @ target))
    if not picked[i]:
      picked[i] = True
      order.append(i)
    target += mu - x[i]
  order += np.flatnonzero(~picked)[:k - len(order)].tolist()
  return np.asarray(order, np.int64)


def _herding(features, k, rng):
  del rng
  return herding(features, k)


def _herding_icarl(features, k, rng):
  del rng
  return herding_icarl(features, k)


def _random(features, k, rng):
  return rng.permutation(len(features))[:k]


# memory.selection name -> fn(candidate features [n, D] (or an array of
# length n), k, rng) -> up to k candidate indices, best first.
SELECTIONS = {"herding": _herding, "herding_icarl": _herding_icarl,
              "random": _random}


def select_exemplars(features, labels, classes: Sequence[int], quota,
                     method: str = "herding",
                     rng: np.random.Generator | int | None = None
                     ) -> dict[int, np.ndarray]:
  """Chooses exemplars of each class among the rows labelled positive for it.

  Args:
    features: float [n, D], pooled backbone features of the candidate rows
      (needed for herding only; may be None for random).
    labels: [n, num_classes], ground-truth labels of the candidates (the
      current task's columns); rows with labels[:, c] > 0 are candidates for c.
    classes: the classes to select for (the current task's).
    quota: int, or int [num_classes] (from class_quotas).
    method: a name of ``SELECTIONS``.
    rng: numpy Generator or seed (random only).

  Returns:
    {class: int64 [min(quota_c, candidates_c)] row indices into the
    candidates, best first (herding order, or the random order)}.
  """
  if method not in SELECTIONS:
    raise ValueError(f"unknown memory.selection {method!r}; "
                     f"valid: {list(SELECTIONS)}")
  select = SELECTIONS[method]
  labels = np.asarray(labels)
  if features is None:
    if method != "random":
      raise ValueError(f"memory.selection {method!r} needs features")
    features = np.zeros((labels.shape[0], 0), np.float32)
  features = np.asarray(features)
  rng = np.random.default_rng(rng)
  out = {}
  for c in classes:
    c = int(c)
    k = int(quota if np.ndim(quota) == 0 else quota[c])
    cand = np.flatnonzero(labels[:, c] > 0)
    out[c] = cand[select(features[cand], max(k, 0), rng)].astype(np.int64)
  return out


def exemplar_rows(selection: Mapping[int, np.ndarray], *, num_classes: int,
                  dedup: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Merges per-class picks into rows (dedup: an image picked twice is one).

  Returns:
    rows: int64 [u], candidate indices: sorted and unique with dedup, else
      every class's picks in turn (a candidate may repeat).
    ranks: int32 [u, num_classes], rank of each row among each class's picks
      (-1 where not picked for the class); pass to ``add``. Without dedup
      each row is ranked for its one class.
  """
  picks = [np.asarray(v, np.int64) for v in selection.values()]
  if not dedup:
    rows = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    ranks = np.full((rows.size, num_classes), -1, np.int32)
    start = 0
    for c, idx in selection.items():
      size = np.asarray(idx).size
      ranks[start:start + size, int(c)] = np.arange(size)
      start += size
    return rows, ranks
  rows = np.unique(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
  ranks = np.full((rows.size, num_classes), -1, np.int32)
  for c, idx in selection.items():
    idx = np.asarray(idx, np.int64)
    ranks[np.searchsorted(rows, idx), int(c)] = np.arange(idx.size)
  return rows, ranks


def add(mem: Memory, *, images, labels, known, ground_truth, task: int,
        image_id, source_index, ranks, dedup: bool = True) -> Memory:
  """Stores new rows, merging any whose image id is already stored.

  With ``dedup=False`` nothing is merged: every incoming row takes its own
  empty slot, even when its image id repeats or is already stored.

  Incoming arrays have a leading dimension n (the same image id may repeat:
  its ranks are merged and the first occurrence's data is kept). For an image
  already in the buffer, the incoming known entries overwrite the stored ones
  except where the stored entry is ground truth and the incoming one is not;
  ranks for the incoming classes are taken from the incoming rows; the row
  keeps its original task. New images fill empty slots in index order.

  Args:
    images: uint8 [n, H, W, 3]; labels: float [n, C]; known, ground_truth:
      bool [n, C]; image_id, source_index: int [n]; ranks: int [n, C]
      (-1 = not selected for that class); task: the current task index.

  Returns:
    A new Memory (the input is not modified).

  Raises:
    ValueError: when the new images do not fit in the empty slots (shrink
      old quotas first).
  """
  image_id = np.asarray(image_id, np.int64)
  if dedup:
    uniq, first, inverse = np.unique(image_id, return_index=True,
                                     return_inverse=True)
    in_ranks = np.full((uniq.size, mem.num_classes), -1, np.int32)
    np.maximum.at(in_ranks, inverse.reshape(-1), np.asarray(ranks, np.int32))
  else:  # every row is its own entry
    uniq, first = image_id, np.arange(image_id.size)
    in_ranks = np.asarray(ranks, np.int32).reshape(image_id.size,
                                                   mem.num_classes)
  in_labels = np.asarray(labels, np.float32)[first]
  in_known = np.asarray(known, bool)[first]
  in_gt = np.asarray(ground_truth, bool)[first] & in_known

  new = {name: getattr(mem, name).copy() for name in FIELDS}
  stored_rows = np.flatnonzero(mem.valid)
  stored_ids = mem.image_id[stored_rows]
  sort = np.argsort(stored_ids)
  if stored_ids.size and dedup:
    pos = np.minimum(np.searchsorted(stored_ids[sort], uniq),
                     stored_ids.size - 1)
    present = stored_ids[sort][pos] == uniq
  else:
    pos, present = np.zeros_like(uniq), np.zeros(uniq.shape, bool)

  # Merge into existing rows.
  if present.any():
    rows = stored_rows[sort][pos[present]]
    inc_known, inc_gt = in_known[present], in_gt[present]
    take = inc_known & ~(new["ground_truth"][rows] & ~inc_gt)
    new["labels"][rows] = np.where(take, in_labels[present],
                                   new["labels"][rows])
    new["known"][rows] |= inc_known
    new["ground_truth"][rows] |= inc_gt
    inc_rank = in_ranks[present]
    new["rank"][rows] = np.where(inc_rank >= 0, inc_rank, new["rank"][rows])

  # Fresh rows into empty slots.
  fresh = np.flatnonzero(~present)
  free = np.flatnonzero(~mem.valid)
  if fresh.size > free.size:
    raise ValueError(f"memory full: {fresh.size} new rows, {free.size} free "
                     f"slots of {mem.capacity}; shrink quotas first")
  slots = free[:fresh.size]
  src = first[fresh]
  new["images"][slots] = np.asarray(images)[src]
  new["labels"][slots] = in_labels[fresh]
  new["known"][slots] = in_known[fresh]
  new["ground_truth"][slots] = in_gt[fresh]
  new["valid"][slots] = True
  new["task"][slots] = task
  new["image_id"][slots] = uniq[fresh]
  new["source_index"][slots] = np.asarray(source_index, np.int64)[src]
  new["rank"][slots] = in_ranks[fresh]
  return Memory(**new)


def shrink(mem: Memory, quotas) -> Memory:
  """Keeps each class's best-ranked rows within its quota; frees the rest.

  A row stays valid while it is still within the quota of at least one
  class it was selected for. Freed rows are cleared (so the state, and a
  checkpoint of it, does not depend on what was there before).

  Args:
    quotas: int [num_classes] (from class_quotas).
  """
  quotas = np.asarray(quotas, np.int32)
  rank = np.where(mem.rank < quotas[None, :], mem.rank, -1)
  keep = mem.valid & (rank >= 0).any(axis=1)
  blank = empty(1, mem.images.shape[1:], mem.num_classes)
  new = {}
  for name in FIELDS:
    arr = rank if name == "rank" else getattr(mem, name)
    fill = getattr(blank, name)[0]
    where = keep.reshape((-1,) + (1,) * (arr.ndim - 1))
    new[name] = np.where(where, arr, fill)
  return Memory(**new)


def valid_rows(mem: Memory) -> np.ndarray:
  """int64 [size], indices of the stored rows in slot order."""
  return np.flatnonzero(mem.valid)


def class_counts(mem: Memory) -> np.ndarray:
  """int64 [num_classes], stored rows selected for each class."""
  return ((mem.rank >= 0) & mem.valid[:, None]).sum(axis=0)
