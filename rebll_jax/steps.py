"""The jitted steps: train, predict. Pure functions of arrays.

``train_step(state, old_variables, batch, context, key) -> (state, metrics)``.
Which classes are current / old / seen is an array in ``context``, so every
task after the first reuses one executable; the first task (no past model) has
its own. The old model is an input under ``stop_gradient``.

A batch holds ``images`` (uint8 NHWC), ``labels`` and ``known`` ([B, C]: what
the trainer may see), ``is_memory`` ([B] bool) and ``true_labels`` (the
hidden full ground truth, read only by the label diagnostics, never by a
loss).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rebll_jax import losses, optim, relabel
from rebll_jax.data import augment
from rebll_jax.methods import (Method, cls_loss_params, distill_params,
                               relabel_thresholds)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # global step counter, int32 scalar
  params: Any
  batch_stats: Any
  opt_state: Any


def variables_of(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def task_context(task, *, task_start, total_steps, lr_peak) -> dict:
  """The per-task arrays the train step reads (no Python constants)."""
  return {
      "current_mask": jnp.asarray(task.current_mask),
      "old_mask": jnp.asarray(task.old_mask),
      "seen_mask": jnp.asarray(task.seen_mask),
      "task_start": jnp.asarray(task_start, jnp.int32),
      "total_steps": jnp.asarray(total_steps, jnp.int32),
      "lr_peak": jnp.asarray(lr_peak, jnp.float32),
  }


def _relabel_counts(before_known, after_known, labels, true_labels, rows):
  """tp/fp/tn/fn of the entries relabeled in this batch (diagnostics)."""
  relabeled = (after_known & ~before_known) & rows[:, None]
  return relabel.confusion_counts(pred_labels=labels, mask=relabeled,
                                  true_labels=true_labels)


def make_train_step(*, model: nn.Module, method: Method, config,
                    tx: optax.GradientTransformation, has_old: bool,
                    on_trace: Callable[[], None] | None = None):
  """Builds the (unjitted) pure train step for one method and config."""
  cls_params = cls_loss_params(method, config.loss)
  kd_params = distill_params(method, config.loss)
  lambda_kd = config.loss.lambda_kd
  taus = relabel_thresholds(method, config.relabel)

  def train_step(state: TrainState, old_variables, batch, context, key):
    if on_trace is not None:
      on_trace()  # runs at trace time only: counts compilations in tests
    task_step = state.step - context["task_start"]
    key = jax.random.fold_in(key, state.step)
    images = augment.augment_batch(key, batch["images"], config.augment,
                                   normalize_images=config.data.normalize)
    is_memory = batch["is_memory"]
    labels, known = batch["labels"], batch["known"].astype(bool)
    given_known = known
    diagnostics = {}

    old_logits = None
    if has_old:
      old_out = model.apply(old_variables, images, train=False)
      old_logits = jax.lax.stop_gradient(old_out["logits"])
      if method.relabel_new_online:
        labels, known = relabel.relabel_new_rows(
            labels=labels, known=known,
            old_probs=jax.nn.sigmoid(old_logits),
            old_class_mask=context["old_mask"], row_is_new=~is_memory,
            tau_old=taus["tau_old"], tau_old_low=taus["tau_old_low"])
        diagnostics["new"] = _relabel_counts(
            given_known, known, labels, batch["true_labels"], ~is_memory)

    columns = (context["current_mask"] if method.cls_columns == "current"
               else context["seen_mask"])
    warm = relabel.warmup_active(step=task_step,
                                 total_steps=context["total_steps"],
                                 warmup_frac=config.relabel.warmup_frac)

    def loss_fn(params):
      out, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images,
          train=True, mutable=["batch_stats"])
      logits = out["logits"]
      y, k = labels, known
      extra = {}
      if method.relabel_memory_online and has_old:
        before = k
        y, k = relabel.relabel_memory_rows(
            labels=y, known=k,
            probs=jax.nn.sigmoid(jax.lax.stop_gradient(logits)),
            current_class_mask=context["current_mask"],
            row_is_memory=is_memory, tau_cur=taus["tau_cur"],
            tau_cur_low=taus["tau_cur_low"], active=warm)
        extra["memory"] = _relabel_counts(
            before, k, y, batch["true_labels"], is_memory)
      if method.unknown_as_negative:
        mask = jnp.broadcast_to(columns, y.shape)
        y = y * k  # unknown -> negative
      else:
        mask = k * columns
      cls = losses.asymmetric_bce(logits=logits, labels=y, mask=mask,
                                  **cls_params)
      loss = jnp.mean(cls)
      terms = {"loss_cls": loss}
      if method.distill != "none" and has_old:
        kd_mask = jnp.broadcast_to(context["old_mask"], logits.shape)
        kd = losses.asymmetric_distillation(
            logits=logits, old_logits=old_logits, mask=kd_mask, **kd_params)
        terms["loss_kd"] = jnp.mean(kd)
        loss = loss + lambda_kd * terms["loss_kd"]
      positives = jnp.sum(mask * y)
      terms["cls_positives"] = positives
      terms["cls_negatives"] = jnp.sum(mask * (1 - y))
      return loss, (updates["batch_stats"], terms, extra)

    (loss, (batch_stats, terms, extra)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    if config.debug.nan_at_step >= 0:  # fault injection for tests
      loss = jnp.where(state.step == config.debug.nan_at_step, jnp.nan, loss)
    updates, opt_state, lr = optim.step_updates(
        tx, grads, state.opt_state, state.params, task_step=task_step,
        total_steps=context["total_steps"], lr_peak=context["lr_peak"],
        cfg=config.optim)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    diagnostics.update(extra)
    metrics = {"loss": loss, "lr": lr, "grad_norm": optax.tree.norm(grads),
               **terms, "labels": diagnostics}
    return new_state, metrics

  return train_step


def make_predict(model: nn.Module, normalize: bool):
  """(variables, uint8 images) -> (sigmoid scores, pooled features)."""

  def predict(variables, images):
    x = augment.eval_transform(images, normalize)
    out = model.apply(variables, x, train=False)
    return jax.nn.sigmoid(out["logits"]), out["features"]

  return predict
