"""Metrics against values worked out by hand."""

import numpy as np
import pytest

from rebll_jax import metrics


def test_average_precision_by_hand():
  # Ranked: pos(0.9) neg(0.8) pos(0.7) neg(0.1): precision at hits 1/1, 2/3.
  scores = np.array([0.9, 0.8, 0.7, 0.1])
  targets = np.array([1, 0, 1, 0])
  assert metrics.average_precision(scores, targets) == pytest.approx(
      (1 + 2 / 3) / 2)


def test_average_precision_edge_cases():
  assert metrics.average_precision(np.array([0.3, 0.2]), np.array([0, 0])) == 0
  assert metrics.average_precision(np.array([0.1, 0.9]), np.array([1, 1])) == 1
  # The only positive ranked last of three: 1/3.
  assert metrics.average_precision(np.array([0.9, 0.8, 0.1]),
                                   np.array([0, 0, 1])) == pytest.approx(1 / 3)


def _field_ap(output, target):
  """The field's AP (ranking by ``output.argsort()[::-1]``), written from
  its description: mean precision at each positive's rank."""
  hits = target[np.argsort(output, kind="stable")[::-1]] == 1
  ranks = np.flatnonzero(hits) + 1
  return float(np.mean(np.arange(1, ranks.size + 1) / ranks))


def test_tied_scores_rank_the_later_row_first_as_the_field():
  # Saturated sigmoids: rows 0-2 all score 1.0; the field ranks row 2 (the
  # positive) first: AP 1. Ranking the earlier row first gave 1/3.
  scores = np.array([1.0, 1.0, 1.0, 0.2], np.float32)
  targets = np.array([0, 0, 1, 0])
  assert metrics.average_precision(scores, targets) == 1.0
  rng = np.random.default_rng(0)
  for _ in range(50):
    scores = rng.choice([0.1, 0.5, 1.0], size=40).astype(np.float32)
    targets = (rng.random(40) < 0.3).astype(np.int64)
    targets[0] = 1
    assert metrics.average_precision(scores, targets) == pytest.approx(
        _field_ap(scores, targets), abs=1e-12)


def test_mean_ap_over_classes_counts_empty_class_as_zero():
  scores = np.array([[0.9, 0.2], [0.1, 0.8]])
  targets = np.array([[1, 0], [0, 0]])
  assert metrics.mean_ap(scores, targets) == pytest.approx(50.0)
  assert metrics.mean_ap(scores, targets, classes=[0]) == pytest.approx(100.0)
  assert metrics.mean_ap(scores[:, :0], targets[:, :0]) == 0.0


def test_f1_by_hand():
  # Threshold 0.8. Class 0: TP=1, FP=1, FN=0. Class 1: TP=1, FP=0, FN=1.
  scores = np.array([[0.9, 0.85], [0.95, 0.1], [0.2, 0.3]])
  targets = np.array([[1, 1], [0, 0], [0, 1]])
  f = metrics.f1_scores(scores, targets, 0.8)
  p0, r0, p1, r1 = 0.5, 1.0, 1.0, 0.5
  f1_0, f1_1 = 2 * p0 * r0 / (p0 + r0), 2 * p1 * r1 / (p1 + r1)
  assert f["cf1"] == pytest.approx(100 * (f1_0 + f1_1) / 2)
  cp, cr = (p0 + p1) / 2, (r0 + r1) / 2
  assert f["cf1_cp_cr"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
  op, orr = 2 / 3, 2 / 3
  assert f["of1"] == pytest.approx(100 * 2 * op * orr / (op + orr))
  assert f["fpr"] == pytest.approx(100 * 1 / 3)  # 1 FP of 3 negative entries


def test_f1_threshold_is_strict():
  # A score equal to the threshold is not a prediction (the field's "> th").
  scores = np.array([[0.8, 0.8], [0.81, 0.2], [0.8, 0.79]])
  targets = np.array([[1, 0], [1, 0], [0, 1]])
  f = metrics.f1_scores(scores, targets, 0.8)
  # Only (1, 0) is predicted: class 0 TP=1, FN=1; class 1 nothing predicted.
  assert f["cp"] == pytest.approx(100 * (1.0 + 0.0) / 2)
  assert f["cr"] == pytest.approx(100 * (0.5 + 0.0) / 2)
  assert f["op"] == pytest.approx(100.0)
  assert f["or"] == pytest.approx(100 / 3)  # 1 of 3 positive entries
  assert f["fpr"] == 0.0  # the negatives at exactly 0.8 are not false pos.
  # One float step above the threshold counts: TP 2 of 3, FP 2 of 3.
  g = metrics.f1_scores(np.nextafter(scores, 1.0), targets, 0.8)
  assert g["or"] == pytest.approx(100 * 2 / 3)
  assert g["fpr"] == pytest.approx(100 * 2 / 3)


def test_f1_never_nan():
  scores = np.zeros((4, 3))
  targets = np.zeros((4, 3))
  f = metrics.f1_scores(scores, targets, 0.8)
  assert all(np.isfinite(v) for v in f.values())
  assert f["cf1"] == 0 and f["of1"] == 0 and f["cf1_cp_cr"] == 0
  # Positives but no prediction above the threshold.
  f = metrics.f1_scores(np.zeros((2, 1)), np.ones((2, 1)), 0.8)
  assert f["cf1"] == 0 and f["of1"] == 0


def test_forgetting():
  matrix = [[80.0], [70.0, 60.0], [65.0, 50.0, 90.0]]
  f = metrics.forgetting(matrix)
  assert f["per_task"] == pytest.approx([15.0, 10.0])
  assert f["mean"] == pytest.approx(12.5)
  assert metrics.forgetting([[50.0]])["mean"] == 0.0


def test_calibration_by_hand():
  # Column 0 old, column 1 current, column 2 unseen (ignored).
  scores = np.array([[0.95, 0.85, 0.5], [0.45, 0.15, 0.5],
                     [0.6, 0.55, 0.5], [0.05, 0.25, 0.5]])
  targets = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1], [0, 0, 1]])
  c = metrics.calibration(scores, targets, old_classes=[0],
                          current_classes=[1])
  old = c["old"]
  assert (old["num_pos"], old["num_neg"]) == (2, 2)
  assert old["pos_mean"] == pytest.approx(0.7)
  assert old["neg_mean"] == pytest.approx(0.325)
  assert old["frac_pos_below"] == pytest.approx(0.5)
  assert old["frac_neg_above"] == pytest.approx(0.5)
  assert old["bias"] == pytest.approx(0.5125 - 0.5)
  # One entry per bin (9, 4, 6, 0): |0.95-1|, |0.45-1|, |0.6-0|, |0.05-0|.
  assert old["ece"] == pytest.approx((0.05 + 0.55 + 0.6 + 0.05) / 4)
  cur = c["current"]
  assert cur["pos_mean"] == pytest.approx(0.7)
  assert cur["neg_mean"] == pytest.approx(0.2)
  assert cur["frac_pos_below"] == 0.0 and cur["frac_neg_above"] == 0.0
  # Bins 8, 1, 5, 2: |0.85-1|, |0.15-0|, |0.55-1|, |0.25-0|.
  assert cur["ece"] == pytest.approx((0.15 + 0.15 + 0.45 + 0.25) / 4)
  # Seen pools the 8 entries: 0.45 and 0.55 fall into bins 4 and 5, so the
  # same per-entry gaps, averaged over 8.
  assert c["seen"]["ece"] == pytest.approx(
      (0.05 + 0.55 + 0.6 + 0.05 + 0.15 + 0.15 + 0.45 + 0.25) / 8)
  assert c["seen"]["num_pos"] == 4 and c["seen"]["num_neg"] == 4
  assert c["threshold"] == 0.5 and c["num_bins"] == 10


def test_calibration_shares_bins_and_edges():
  # 0.12 (positive) and 0.18 (negative) share bin 1: |0.15 - 0.5| for both;
  # 1.0 lands in the closed last bin; 0.5 is not predicted positive (a
  # score strictly above the threshold is, as in F1; until 2026-12-07 the
  # calibration counted >=).
  scores = np.array([[0.12], [0.18], [1.0], [0.5]])
  targets = np.array([[1], [0], [1], [0]])
  c = metrics.calibration(scores, targets, old_classes=[],
                          current_classes=[0])
  cur = c["current"]
  assert cur["ece"] == pytest.approx((2 * 0.35 + 0.0 + 0.5) / 4)
  assert cur["frac_neg_above"] == 0.0  # 0.5 is not above 0.5
  assert cur["frac_pos_below"] == pytest.approx(0.5)  # 0.12 <= 0.5
  # No old classes (the first task): counts 0, every rate None, no NaN.
  old = c["old"]
  assert old["num_pos"] == old["num_neg"] == 0
  assert all(old[k] is None for k in ("pos_mean", "neg_mean", "ece", "bias",
                                      "frac_pos_below", "frac_neg_above"))


def test_calibration_matches_a_loop_reference():
  rng = np.random.default_rng(0)
  scores = rng.uniform(size=(50, 6))
  targets = (rng.uniform(size=(50, 6)) < 0.3).astype(np.uint8)
  c = metrics.calibration(scores, targets, old_classes=[0, 3],
                          current_classes=[4], num_bins=5)
  entries = [(scores[i, j], targets[i, j]) for i in range(50)
             for j in (0, 3, 4)]
  total = 0.0
  for b in range(5):
    inside = [(s, y) for s, y in entries
              if b / 5 <= s < (b + 1) / 5 or (b == 4 and s == 1.0)]
    if inside:
      gap = abs(np.mean([s for s, _ in inside]) -
                np.mean([y for _, y in inside]))
      total += len(inside) * gap
  assert c["seen"]["ece"] == pytest.approx(total / len(entries))
  negatives = [s for s, y in entries if y == 0]
  assert c["seen"]["frac_neg_above"] == pytest.approx(
      np.mean([s >= 0.5 for s in negatives]))
