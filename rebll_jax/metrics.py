"""Evaluation metrics, on the host in numpy (METHOD.md section 6).

Matches the field's code: non-interpolated AP (mean precision at the rank of
each positive), a class without positives scores 0; CF1 as the mean of
per-class F1 (F1 = 0 when TP = 0) and, named separately, the textbook
2 CP CR / (CP + CR). A score counts as a positive prediction when it is
strictly above the threshold (``> 0.8``, as the field's code; not ``>=``).
No function here returns NaN.
"""

from __future__ import annotations

import numpy as np


def _safe_div(num, den):
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """AP of one class: scores and {0,1} targets, both [num_images]."""
  targets = np.asarray(targets) > 0
  if not targets.any():
    return 0.0
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  hits = targets[order]
  ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the positives
  precision_at_hits = np.arange(1, ranks.size + 1) / ranks
  return float(precision_at_hits.mean())


def ap_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """[num_classes] AP from scores and targets [num_images, num_classes]."""
  return np.array([average_precision(scores[:, c], targets[:, c])
                   for c in range(scores.shape[1])])


def mean_ap(scores, targets, classes=None) -> float:
  """100 x mean AP over ``classes`` (default: all columns)."""
  if classes is not None:
    classes = np.asarray(classes, np.int64)
    scores, targets = scores[:, classes], targets[:, classes]
  if scores.shape[1] == 0:
    return 0.0
  return float(100.0 * ap_per_class(scores, targets).mean())


def f1_scores(scores, targets, threshold: float = 0.8) -> dict:
  """CP/CR/CF1 (both definitions), OP/OR/OF1, FPR, in percent.

  A prediction is ``score > threshold`` (strict) for every one of them.
  """
  pred = np.asarray(scores) > threshold
  true = np.asarray(targets) > 0
  tp = (pred & true).sum(0)
  fp = (pred & ~true).sum(0)
  fn = (~pred & true).sum(0)
  tn = (~pred & ~true).sum(0)
  per_class_p = _safe_div(tp, tp + fp)
  per_class_r = _safe_div(tp, tp + fn)
  per_class_f1 = _safe_div(2 * per_class_p * per_class_r,
                           per_class_p + per_class_r)
  cp, cr = per_class_p.mean(), per_class_r.mean()
  op = _safe_div(tp.sum(), (tp + fp).sum())
  orr = _safe_div(tp.sum(), (tp + fn).sum())
  return {
      "cp": float(100 * cp), "cr": float(100 * cr),
      "cf1": float(100 * per_class_f1.mean()),
      "cf1_cp_cr": float(100 * _safe_div(2 * cp * cr, cp + cr)),
      "op": float(100 * op), "or": float(100 * orr),
      "of1": float(100 * _safe_div(2 * op * orr, op + orr)),
      "fpr": float(100 * _safe_div(fp.sum(), (fp + tn).sum())),
  }


def forgetting(map_matrix: list[list[float]]) -> dict:
  """Forgetting from the mAP matrix (row t: after task t; column j: task j).

  For each task j before the last, the best mAP it ever had minus its mAP
  after the last task. Returns per-task values and their mean (0 if one task).
  """
  num_tasks = len(map_matrix)
  per_task = []
  for j in range(num_tasks - 1):
    history = [map_matrix[t][j] for t in range(j, num_tasks - 1)]
    per_task.append(float(max(history) - map_matrix[-1][j]))
  mean = float(np.mean(per_task)) if per_task else 0.0
  return {"per_task": per_task, "mean": mean}
