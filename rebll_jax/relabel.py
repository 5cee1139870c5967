"""Online relabeling (OR, METHOD.md section 5).

Two places fill the missing blocks of the label block matrix (section 3):

- inside the jitted train step, per batch (``relabel_new_rows``,
  ``relabel_memory_rows``): pure jnp on [batch, num_classes] arrays, where
  every class/row selection is an array mask so tasks never recompile
  (given only numpy arrays, the same functions run in numpy: the
  between-task pass uses ``relabel_new_rows`` on the host);
- between tasks, over the whole replay buffer (``relabel_buffer``): the
  trained model runs over fixed-size chunks through one jitted function the
  caller supplies; the buffer stays numpy on the host.

Every fill reads two thresholds: a score above ``tau`` is a positive, one
below ``tau_low`` a negative, and one in between stays *unknown* (out of
``L_cls``). ``tau_low = tau`` (the default) is METHOD.md's single threshold;
``tau_low < tau`` is our two-threshold reading, for under-confident models
whose present objects score below 0.5 (see the README's findings).

Only *unknown* entries are ever filled online: an entry that is already known
(ground truth, or an earlier relabel) keeps its label. ``relabel_buffer``
writes exactly the entries its column mask selects; pass a per-row mask that
excludes ground truth (``column_mask & ~memory.ground_truth``) to keep it.

Scoring relabeled entries against the hidden ground truth is
``rebll_jax.diagnostics``' job.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _namespace(*arrays):
  """jnp if any input is a JAX array (or tracer), else numpy: host callers
  (the between-task pass) then run no eager op, so no compile per shape."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _as_bool(x, xp):
  x = xp.asarray(x)
  return x if x.dtype == np.bool_ else x != 0


def decide(probs, tau, tau_low=None):
  """(label, decided): 1[p > tau], and whether p is outside (tau_low, tau].

  tau_low None means tau_low = tau: every entry is decided. jnp or numpy.
  """
  tau_low = tau if tau_low is None else tau_low
  positive = probs > tau
  return positive, positive | (probs <= tau_low)


def _fill(labels, known, fill, probs, tau, tau_low, xp):
  """Writes 1[p > tau] where fill and decided; returns (labels, known)."""
  labels, known, probs = (xp.asarray(a) for a in (labels, known, probs))
  if xp is jnp:
    probs = jax.lax.stop_gradient(probs)
  values, decided = decide(probs, tau, tau_low)
  fill = fill & decided
  new_labels = xp.where(fill, values.astype(labels.dtype), labels)
  new_known = xp.where(fill, xp.ones_like(known), known)
  return new_labels, new_known


def tempered(scores, temperature: float):
  """sigmoid(z / T) from scores sigmoid(z) (host numpy; float32 scores
  saturate at 0 and 1, which stay 0 and 1). T = 1 returns ``scores``."""
  if temperature == 1.0:
    return scores
  s = np.asarray(scores, np.float64)
  with np.errstate(divide="ignore", over="ignore"):
    logits = np.log(s) - np.log1p(-s)
    q = 1.0 / (1.0 + np.exp(-logits / temperature))
  return q.astype(np.asarray(scores).dtype)


def relabel_new_rows(*, labels, known, old_probs, old_class_mask, row_is_new,
                     tau_old, tau_old_low=None):
  """Below-diagonal block: old-class labels of new rows from the past model.

  Fills entry (i, c) with 1[q_ic > tau_old] and marks it known where row i is
  a new-task row, c is an old class, the entry is still unknown, and q_ic is
  not in the band (tau_old_low, tau_old] (see ``decide``).

  Args:
    labels: float [batch, num_classes].
    known: bool (or float 0/1) [batch, num_classes].
    old_probs: float [batch, num_classes], q = sigmoid(past-model logits / T),
      the same forward the distillation loss uses (no gradient flows here).
    old_class_mask: bool/float [num_classes] (or [batch, num_classes]), the
      classes of tasks before the current one.
    row_is_new: bool/float [batch], rows drawn from the current task's data
      (not from memory, not padding).
    tau_old: float threshold (c.relabel.tau_old), Python or traced.
    tau_old_low: float <= tau_old (c.relabel.tau_old_low), or None.

  Returns:
    (labels, known) with the input shapes and dtypes.
  """
  xp = _namespace(labels, known, old_probs, old_class_mask, row_is_new,
                  tau_old, tau_old_low)
  fill = (_as_bool(row_is_new, xp)[:, None] & _as_bool(old_class_mask, xp) &
          ~_as_bool(known, xp))
  return _fill(labels, known, fill, old_probs, tau_old, tau_old_low, xp)


def relabel_memory_rows(*, labels, known, probs, current_class_mask,
                        row_is_memory, tau_cur, active, tau_cur_low=None):
  """Above-diagonal block: current-task labels of memory rows, online.

  When ``active`` (after the warm-up fraction of the task's steps, see
  ``warmup_active``), fills entry (i, c) with 1[p_ic > tau_cur] and marks it
  known where row i comes from memory, c is a current-task class, the entry
  is still unknown, and p_ic is not in the band (tau_cur_low, tau_cur].
  Before that the entries stay unknown, so L_cls ignores them.

  Args:
    labels: float [batch, num_classes]; known: bool/float [batch, num_classes].
    probs: float [batch, num_classes], the current model's sigmoid outputs on
      the batch (detached here, so the step may pass its own forward).
    current_class_mask: bool/float [num_classes] (or [batch, num_classes]).
    row_is_memory: bool/float [batch].
    tau_cur: float threshold (c.relabel.tau_cur).
    active: bool scalar, Python or traced.
    tau_cur_low: float <= tau_cur (c.relabel.tau_cur_low), or None.

  Returns:
    (labels, known) with the input shapes and dtypes.
  """
  xp = _namespace(labels, known, probs, current_class_mask, row_is_memory,
                  tau_cur, active, tau_cur_low)
  fill = (_as_bool(active, xp) & _as_bool(row_is_memory, xp)[:, None] &
          _as_bool(current_class_mask, xp) & ~_as_bool(known, xp))
  return _fill(labels, known, fill, probs, tau_cur, tau_cur_low, xp)


def warmup_active(*, step, total_steps, warmup_frac):
  """bool scalar: step (0-based, within the task) >= warmup_frac * total_steps.

  All arguments may be traced (the step counter lives in the train state).
  """
  step = jnp.asarray(step, jnp.float32)
  return step >= jnp.asarray(warmup_frac, jnp.float32) * jnp.asarray(
      total_steps, jnp.float32)


def relabel_buffer(predict_fn: Callable, images: np.ndarray,
                   labels: np.ndarray, known: np.ndarray, valid: np.ndarray,
                   column_mask: np.ndarray, tau: float, chunk: int,
                   tau_low: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Between-task pass: relabels columns of the buffer with the trained model.

  Gathers the valid rows that have a column to write, runs ``predict_fn``
  over them in chunks of exactly ``chunk`` rows (the last one zero-padded, so
  there is a single compile), and writes 1[p > tau] into the selected
  entries whose p is outside (tau_low, tau], marking them known; the others
  keep their label and known flag. All chunks are dispatched before any result
  is read back, so host gathering overlaps device compute.

  Args:
    predict_fn: jitted, uint8 [chunk, H, W, 3] -> float probs [chunk, C]; it
      must treat rows independently (eval-mode BatchNorm), so padding rows do
      not change real ones.
    images: uint8 [capacity, H, W, 3]; labels: float [capacity, C];
      known: bool [capacity, C]; valid: bool [capacity].
    column_mask: bool [C] (e.g. the task just learned) or [capacity, C]
      (e.g. that & ~ground_truth, to keep ground-truth entries).
    tau: threshold (c.relabel.tau_cur).
    chunk: rows per call (c.relabel.chunk).
    tau_low: lower threshold <= tau (c.relabel.tau_cur_low), or None = tau.

  Returns:
    (labels, known), new numpy arrays; the inputs are not modified. The
    entries written are ``column_mask & valid[:, None]`` minus the band.
  """
  labels, known = np.array(labels), np.array(known)
  write = np.broadcast_to(np.asarray(column_mask, bool), labels.shape)
  write = write & np.asarray(valid, bool)[:, None]
  rows = np.flatnonzero(write.any(axis=1))
  if rows.size == 0:
    return labels, known
  outs = []
  for start in range(0, rows.size, chunk):  # per chunk, not per row
    batch = images[rows[start:start + chunk]]
    if batch.shape[0] < chunk:
      pad = np.zeros((chunk - batch.shape[0], *batch.shape[1:]), batch.dtype)
      batch = np.concatenate([batch, pad])
    outs.append(predict_fn(batch))  # async: dispatch everything first
  probs = np.concatenate([np.asarray(o) for o in outs])[:rows.size]
  positive, decided = decide(probs, tau, tau_low)
  sel = write[rows] & decided
  labels[rows] = np.where(sel, positive.astype(labels.dtype), labels[rows])
  known[rows] = known[rows] | sel
  return labels, known
