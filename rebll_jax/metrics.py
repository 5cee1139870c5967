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
  # Descending as the field's ``scores.argsort()[::-1]``: among equal
  # scores (float32 sigmoids saturate at 1.0 above logit ~16.6) the later
  # row ranks first. A stable sort makes that exact; numpy's default sort
  # may order ties otherwise on long arrays, the field's code included.
  order = np.argsort(np.asarray(scores, np.float64), kind="stable")[::-1]
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


def _calibration_of(scores: np.ndarray, positive: np.ndarray,
                    threshold: float, num_bins: int) -> dict:
  """Calibration facts of one pool of (score, {0,1} target) entries."""
  scores = scores.astype(np.float64)
  num_pos, num_neg = int(positive.sum()), int((~positive).sum())
  mean = lambda x: float(x.mean()) if x.size else None  # noqa: E731
  out = {"num_pos": num_pos, "num_neg": num_neg,
         "pos_mean": mean(scores[positive]),
         "neg_mean": mean(scores[~positive]),
         # Predicted positive means score > threshold, as in f1_scores.
         "frac_pos_below": mean(scores[positive] <= threshold),
         "frac_neg_above": mean(scores[~positive] > threshold),
         "bias": None, "ece": None}
  if scores.size:
    out["bias"] = float(scores.mean() - positive.mean())
    bins = np.minimum((scores * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    score_sums = np.bincount(bins, weights=scores, minlength=num_bins)
    pos_sums = np.bincount(bins, weights=positive.astype(np.float64),
                           minlength=num_bins)
    out["ece"] = float(np.abs(score_sums - pos_sums).sum() / scores.size)
  return out


def calibration(scores, targets, old_classes, current_classes,
                threshold: float = 0.5, num_bins: int = 10) -> dict:
  """Calibration of sigmoid scores on old, current and all seen classes.

  ``scores`` and {0,1} ``targets`` are [num_images, num_classes] over all
  columns; ``old_classes`` / ``current_classes`` index the columns. Every
  (image, class) entry of a group is one binary prediction. Per group
  ("old", "current", "seen" = both): the count of positive and negative
  entries; the mean score of positives (``pos_mean``) and of negatives
  (``neg_mean``); the fraction of positives scored below ``threshold``
  (``frac_pos_below``) and of negatives scored at or above it
  (``frac_neg_above``); ``bias`` = mean score - positive rate (> 0: the
  scores claim more objects than there are); and the expected calibration
  error ``ece`` = sum over bins of (entries in bin / entries) x |mean score
  in bin - positive rate in bin|, with ``num_bins`` equal-width bins on
  [0, 1] (the last one closed). Values are fractions in [0, 1]; a value
  over an empty set (no old classes at the first task, no positives) is
  None, never NaN.
  """
  scores = np.asarray(scores)
  targets = np.asarray(targets) > 0
  old = np.asarray(old_classes, np.int64).reshape(-1)
  current = np.asarray(current_classes, np.int64).reshape(-1)
  out = {"threshold": float(threshold), "num_bins": int(num_bins)}
  for name, columns in (("old", old), ("current", current),
                        ("seen", np.concatenate([old, current]))):
    out[name] = _calibration_of(scores[:, columns].reshape(-1),
                                targets[:, columns].reshape(-1), threshold,
                                num_bins)
  return out
