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
