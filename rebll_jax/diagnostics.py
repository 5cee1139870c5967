"""Label diagnostics: how good are the labels the trainer made up?

Relabeling (OR) and pseudo-labeling fill unknown entries of the label matrix.
Datasets keep their full ground truth, which training never reads; this
module is the one place that compares the two:

- inside the train step (jnp), ``relabel_counts`` counts TP/FP/TN/FN of the
  entries a batch relabeled; the hidden truth reaches the step only when
  diagnostics are on, as its own argument (``truth``), never in the batch;
- on the host, ``LabelSums`` adds those counts (and the positives /
  negatives ``L_cls`` saw) over a task, and turns them into rates;
- ``buffer_quality`` scores the replay buffer's relabeled entries per block
  of the label block matrix (above / below the diagonal).

Rates are percentages and never NaN (0 when the denominator is 0).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rebll_jax import memory as memory_lib


def _as_bool(x):
  x = jnp.asarray(x)
  return x if x.dtype == jnp.bool_ else x != 0


def confusion_counts(*, pred_labels, mask, true_labels):
  """TP/FP/TN/FN of predicted vs true 0/1 labels over mask entries.

  jnp, so a train step can accumulate counts for its batch relabels (sums
  of int32 scalars); works on numpy input too. All arrays [rows, classes].
  """
  m = _as_bool(mask)
  pred, true = _as_bool(pred_labels), _as_bool(true_labels)
  count = lambda x: jnp.sum(x & m, dtype=jnp.int32)  # noqa: E731
  return {"tp": count(pred & true), "fp": count(pred & ~true),
          "tn": count(~pred & ~true), "fn": count(~pred & true)}


def relabel_counts(*, known_before, known_after, labels, truth, rows):
  """Counts of the entries of ``rows`` that became known (relabeled)."""
  relabeled = (known_after & ~known_before) & rows[:, None]
  return confusion_counts(pred_labels=labels, mask=relabeled,
                          true_labels=truth)


def quality_from_counts(counts) -> dict:
  """fpr = FP/(FP+TN), fnr = FN/(FN+TP), count = all; 0 when undefined."""
  c = {k: int(np.asarray(counts[k]).sum()) for k in ("tp", "fp", "tn", "fn")}
  neg, pos = c["fp"] + c["tn"], c["fn"] + c["tp"]
  return {"fpr": c["fp"] / neg if neg else 0.0,
          "fnr": c["fn"] / pos if pos else 0.0,
          "count": neg + pos, **c}


def relabel_quality(pred_labels, known_relabelled_mask, true_labels) -> dict:
  """Quality of relabeled entries against hidden ground truth (host, numpy).

  Args:
    pred_labels: [rows, C] 0/1 labels after relabeling.
    known_relabelled_mask: bool [rows, C], the entries that were relabeled
      (not ground truth, not unknown).
    true_labels: [rows, C] full 0/1 ground truth.

  Returns:
    {"fpr", "fnr", "count", "tp", "fp", "tn", "fn"}; rates are floats, 0.0
    when their denominator is 0 (never NaN).
  """
  m = np.asarray(known_relabelled_mask, bool)
  pred = np.asarray(pred_labels) > 0.5
  true = np.asarray(true_labels) > 0.5
  counts = {"tp": (pred & true & m).sum(), "fp": (pred & ~true & m).sum(),
            "tn": (~pred & ~true & m).sum(), "fn": (~pred & true & m).sum()}
  return quality_from_counts(counts)


def rates(stats: dict) -> dict:
  """FPR / FNR (percent) from summed tp/fp/tn/fn counts; never NaN."""
  q = quality_from_counts(stats)
  return {"fpr": 100 * q["fpr"], "fnr": 100 * q["fnr"], "count": q["count"]}


class LabelSums:
  """Per-task sums of the step's label counts (host; checkpointed as JSON).

  ``sums["cls"]`` holds the positives / negatives ``L_cls`` saw; every other
  key a group of relabeled entries ("new" rows, "memory" rows) with its
  tp/fp/tn/fn.
  """

  def __init__(self, sums: dict | None = None):
    self.sums = sums if sums is not None else {}

  def add(self, host_metrics: dict):
    """Adds the counts of one fetched step output."""
    cls = self.sums.setdefault("cls", {"pos": 0.0, "neg": 0.0})
    cls["pos"] += float(host_metrics["cls_positives"])
    cls["neg"] += float(host_metrics["cls_negatives"])
    for group, counts in host_metrics.get("labels", {}).items():
      sums = self.sums.setdefault(group, dict.fromkeys(counts, 0.0))
      for k, v in counts.items():
        sums[k] += float(v)

  def online(self) -> dict:
    """FPR / FNR of the entries relabeled inside batches, per group."""
    return {g: rates(s) for g, s in self.sums.items() if g != "cls"}

  def cls_pos_neg_ratio(self) -> float:
    """Positives : negatives among the labels ``L_cls`` saw."""
    if "cls" not in self.sums:
      return 0.0
    return self.sums["cls"]["pos"] / max(self.sums["cls"]["neg"], 1.0)


def _class_task(tasks, num_classes) -> np.ndarray:
  owner = np.full(num_classes, -1, np.int32)
  for task in tasks:
    owner[task.classes] = task.index
  return owner


def buffer_quality(mem: memory_lib.Memory, train_labels: np.ndarray,
                   tasks) -> dict:
  """FPR/FNR (percent) of relabeled buffer entries, above / below diagonal.

  ``train_labels``: the full ground truth of the training split the buffer's
  rows come from (``mem.source_index`` points into it).
  """
  rows = memory_lib.valid_rows(mem)
  if rows.size == 0:
    return {}
  relabeled = mem.known[rows] & ~mem.ground_truth[rows]
  col_task = _class_task(tasks, mem.num_classes)[None, :]
  row_task = mem.task[rows][:, None]
  truth = train_labels[mem.source_index[rows]]
  out = {}
  for name, block in (("above_diagonal", col_task > row_task),
                      ("below_diagonal", (col_task < row_task)
                       & (col_task >= 0))):
    q = relabel_quality(mem.labels[rows], relabeled & block, truth)
    # "unknown": entries of the block left in the two-threshold band.
    unknown = int((block & ~mem.known[rows]).sum())
    out[name] = {"fpr": 100 * q["fpr"], "fnr": 100 * q["fnr"],
                 **{k: q[k] for k in ("count", "tp", "fp", "tn", "fn")},
                 "unknown": unknown}
  return out
