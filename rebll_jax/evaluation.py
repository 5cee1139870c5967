"""Sharded inference and the evaluation after each task.

``Predictor.predict(variables, uint8_images)`` is the one way the trainer
runs a model outside the train step: it pads the rows to a multiple of the
devices, gives this process its slice, runs one jitted function over the
mesh and returns replicated device arrays (not fetched, so callers can
dispatch several chunks before reading any). ``predict_split`` runs it over
rows of a split in fixed-size batches and returns host arrays; ``evaluate``
turns scores into the per-task metrics row.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from rebll_jax import metrics, parallel, protocol, steps, xla_cpu
from rebll_jax.data import loader

log = logging.getLogger("rebll_jax")


def to_host(tree):
  """Device arrays -> numpy on every process (gathers across hosts)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


class Predictor:
  """Eval-mode scores and pooled features of a model, sharded on a mesh."""

  def __init__(self, model, config, mesh):
    self.mesh = mesh
    self.batch = config.train.eval_batch
    self._fn = jax.jit(steps.make_predict(model, config.data.normalize),
                       out_shardings=parallel.replicated(mesh),
                       compiler_options=xla_cpu.options_for(config.model))

  def predict(self, variables, images: np.ndarray):
    """uint8 [n, H, W, 3] (the same rows on every process) ->
    (sigmoid scores [n, C], pooled features [n, D]), replicated jax arrays.

    Rows are zero-padded to a multiple of the mesh size (eval-mode
    BatchNorm treats rows independently, so padding changes nothing);
    call it with a fixed ``n`` to keep to one compiled shape.
    """
    n = images.shape[0]
    pad = -n % self.mesh.size
    if pad:
      images = np.concatenate(
          [images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    rows = parallel.local_batch_slice(images.shape[0])
    scores, features = self._fn(variables,
                                parallel.to_global(self.mesh, images[rows]))
    return (scores[:n], features[:n]) if pad else (scores, features)

  def predict_split(self, variables, split, indices):
    """Host (scores, features) of ``split`` rows ``indices``, in batches of
    ``train.eval_batch`` (the last one padded)."""
    scores, features = [], []
    for images, valid in loader.eval_batches(split, indices, self.batch):
      s, f = to_host(self.predict(variables, images))
      scores.append(s[:valid])
      features.append(f[:valid])
    if not scores:
      return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(scores), np.concatenate(features)


def evaluate(predictor, variables, source, task, tasks, threshold, *,
             protocol_cfg=None) -> dict:
  """mAP on the seen classes after ``task``, plus per-task and F1 stats.

  Scored on the test images that hold at least one seen class
  (``protocol.eval_rows``: with ``protocol.keep_crowd_only_images`` in
  ``protocol_cfg`` also those holding one only as crowd boxes).
  """
  view_rows = protocol.eval_rows(
      source, task.seen, {} if protocol_cfg is None else protocol_cfg)
  scores, _ = predictor.predict_split(variables, source.test, view_rows)
  targets = source.test.labels[view_rows]
  absent = [source.class_names[c] for c in task.classes
            if not targets[:, c].any()]
  if absent:  # said once, at the task that brings the class
    log.warning("task %d: no test image holds %s; each such class scores AP "
                "0 in every mAP from now on (the baseline's rule)",
                task.index + 1, ", ".join(absent))
  per_task = [metrics.mean_ap(scores, targets, t.classes)
              for t in tasks[:task.index + 1]]
  seen_scores, seen_targets = scores[:, task.seen], targets[:, task.seen]
  return {"map_seen": metrics.mean_ap(seen_scores, seen_targets),
          "map_per_task": per_task,
          "calibration": metrics.calibration(
              scores, targets, old_classes=np.flatnonzero(task.old_mask),
              current_classes=task.classes),
          **metrics.f1_scores(seen_scores, seen_targets, threshold)}
