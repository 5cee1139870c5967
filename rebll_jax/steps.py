"""The jitted steps: train, predict. Pure functions of arrays.

``train_step(state, old_variables, batch, context, key, truth) ->
(state, metrics)``. Which classes are current / old / seen is an array in
``context``, so every task after the first reuses one executable; the first
task (no past model) has its own. The old model is an input under
``stop_gradient``.

A batch holds ``images`` (uint8 NHWC), ``labels`` and ``known`` ([B, C]:
what the trainer may see) and ``is_memory`` ([B] bool); with
``train.last_batch=keep`` also ``row_weight`` ([B] float 0/1: an epoch's
short last batch is padded to B with rows of weight 0, which count in no
loss, statistic or diagnostic). ``truth`` (the
hidden full ground truth, [B, C]) is a separate argument, passed only when
label diagnostics are on (``None`` otherwise); no loss ever reads it.

Every method-specific decision is a question to the ``Method``
(``rebll_jax.methods``); this module holds the mechanisms.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rebll_jax import diagnostics, losses, optim, relabel
from rebll_jax.data import augment
from rebll_jax.methods import Method


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # global step counter, int32 scalar
  params: Any
  batch_stats: Any
  opt_state: Any


def variables_of(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


# One program each instead of one small eager compile per parameter shape
# (optax's zeros, the copies): ~45 of them per run of the default
# experiment, 0.6 s of compiling on 2 CPU cores plus their dispatch.
@functools.partial(jax.jit, static_argnums=0)
def initial_train_state(tx: optax.GradientTransformation,
                        variables: dict) -> TrainState:
  """Step 0, ``variables``' parameters and statistics, a fresh optimizer."""
  return TrainState(step=jnp.zeros((), jnp.int32),
                    params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]))


HEAD_ROWS = ("kept", "fresh")  # model.head_rows


@functools.partial(jax.jit, static_argnames=("head_name", "kernel_std"))
def fresh_head_rows(params, classes, key, *, head_name: str,
                    kernel_std: float | None = None):
  """``params`` with the head's outputs ``classes`` drawn anew, as a fresh
  ``torch.nn.Linear(D, n)`` draws them: kernel and bias U(-1/sqrt(D),
  1/sqrt(D)). The PyTorch baseline builds each task's head rows this way
  when the task starts (``model.head_rows=fresh``); the other outputs keep
  their values. ``classes``: int [n]. ``kernel_std``: the kernel drawn
  N(0, kernel_std^2) instead (the first head of a TResNet, whose
  constructor re-draws it; ``models.FIRST_HEAD_KERNEL_STD``)."""
  head = params[head_name]
  kernel, bias = head["kernel"], head["bias"]  # [D, C], [C]
  bound = 1.0 / jnp.sqrt(jnp.float32(kernel.shape[0]))
  k_kernel, k_bias = jax.random.split(key)
  n = classes.shape[0]
  if kernel_std is None:
    new_kernel = jax.random.uniform(k_kernel, (kernel.shape[0], n),
                                    kernel.dtype, -bound, bound)
  else:
    new_kernel = kernel_std * jax.random.normal(
        k_kernel, (kernel.shape[0], n), kernel.dtype)
  new_bias = jax.random.uniform(k_bias, (n,), bias.dtype, -bound, bound)
  return {**params, head_name: {**head,
                                "kernel": kernel.at[:, classes].set(new_kernel),
                                "bias": bias.at[classes].set(new_bias)}}


@functools.partial(jax.jit, static_argnums=0)
def fresh_opt_state(tx: optax.GradientTransformation, params):
  """``tx.init(params)`` in one program (a new task's optimizer)."""
  return tx.init(params)


@jax.jit
def copy_tree(tree):
  """A copy of every array of ``tree`` in new buffers (the past model must
  not share buffers with the train state, whose buffers steps donate)."""
  return jax.tree.map(jnp.copy, tree)


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


def objective(*, method: Method, config, out, old_out, labels, mask,
              context, row_weight=None):
  """The method's loss on one batch: (scalar loss, logged terms).

  ``L_cls`` (asymmetric BCE on ``mask``, reduced over examples as the method
  says; a sum over ``train.ddp_processes`` emulated processes is their
  mean) plus its distillation toward the past model's outputs ``old_out``
  (None in the first task): logit distillation weighted by
  ``loss.lambda_kd``, or POD-flat on pooled features. ``row_weight`` ([B]
  0/1 or None): the rows every term reduces over (a short batch's padding
  has 0).
  """
  logits = out["logits"]
  cls = losses.asymmetric_bce(logits=logits, labels=labels, mask=mask,
                              **method.cls_loss_params(config.loss))
  reduction = method.reduction(config.loss)
  loss = losses.reduce_examples(cls, reduction=reduction, weight=row_weight)
  processes = config.train.get("ddp_processes", 1)
  if reduction == "sum" and processes > 1:
    # DDP averages the processes' gradients of their own sums: a mean
    # is the same either way, a sum is divided by the process count.
    loss = loss / processes
  terms = {"loss_cls": loss}
  if old_out is None:
    return loss, terms
  kd_params = method.distill_params(config.loss)
  if kd_params is not None:
    kd_mask = jnp.broadcast_to(context["old_mask"], logits.shape)
    if row_weight is not None:  # out of the adaptive decay's batch mean too
      kd_mask = kd_mask * row_weight[:, None]
    kd = losses.asymmetric_distillation(
        logits=logits, old_logits=jax.lax.stop_gradient(old_out["logits"]),
        mask=kd_mask, **kd_params)
    terms["loss_kd"] = losses.reduce_examples(kd, reduction="mean",
                                              weight=row_weight)
    loss = loss + config.loss.lambda_kd * terms["loss_kd"]
  elif method.distill == "pod_flat":
    terms["loss_pod_flat"] = losses.pod_flat(
        features=out["features"], old_features=old_out["features"],
        n_seen=jnp.sum(context["seen_mask"]),
        task_size=config.protocol.increment,
        weight=config.loss.pod_flat_weight)
    terms["loss_pod_flat"] = losses.reduce_examples(
        terms["loss_pod_flat"], reduction="mean", weight=row_weight)
    loss = loss + terms["loss_pod_flat"]
  return loss, terms


def make_train_step(*, model: nn.Module, method: Method, config,
                    tx: optax.GradientTransformation, has_old: bool,
                    on_trace: Callable[[], None] | None = None):
  """Builds the (unjitted) pure train step for one method and config."""
  taus = method.thresholds(config.relabel)
  past_temperature = method.past_model_temperature(config.loss)

  def train_step(state: TrainState, old_variables, batch, context, key,
                 truth=None):
    if on_trace is not None:
      on_trace()  # runs at trace time only: counts compilations in tests
    task_step = state.step - context["task_start"]
    key = jax.random.fold_in(key, state.step)
    images = augment.augment_batch(key, batch["images"], config.augment,
                                   normalize_images=config.data.normalize)
    is_memory = batch["is_memory"]
    labels, known = batch["labels"], batch["known"].astype(bool)
    given_known = known
    label_counts = {}
    row_weight = batch.get("row_weight")
    counted = None if row_weight is None else row_weight > 0
    only_counted = lambda rows: rows if counted is None else rows & counted  # noqa: E731
    train_model = (model if row_weight is None
                   else model.clone(norm_row_weight=row_weight))

    old_out = old_logits = None
    if has_old:
      old_out = model.apply(old_variables, images, train=False)
      old_logits = jax.lax.stop_gradient(old_out["logits"])
      if method.relabel_new_online:
        labels, known = relabel.relabel_new_rows(
            labels=labels, known=known,
            old_probs=jax.nn.sigmoid(old_logits / past_temperature),
            old_class_mask=context["old_mask"], row_is_new=~is_memory,
            tau_old=taus["tau_old"], tau_old_low=taus["tau_old_low"])
        if truth is not None:
          label_counts["new"] = diagnostics.relabel_counts(
              known_before=given_known, known_after=known, labels=labels,
              truth=truth, rows=only_counted(~is_memory))

    columns = method.loss_columns(context)
    warm = relabel.warmup_active(step=task_step,
                                 total_steps=context["total_steps"],
                                 warmup_frac=config.relabel.warmup_frac)

    def loss_fn(params):
      out, updates = train_model.apply(
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
        if truth is not None:
          extra["memory"] = diagnostics.relabel_counts(
              known_before=before, known_after=k, labels=y, truth=truth,
              rows=only_counted(is_memory))
      y, mask = method.loss_targets(y, k, columns)
      loss, terms = objective(
          method=method, config=config, out=out, old_out=old_out, labels=y,
          mask=mask, context=context, row_weight=row_weight)
      if row_weight is not None:
        mask = mask * row_weight[:, None]
      terms["cls_positives"] = jnp.sum(mask * y)
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
    label_counts.update(extra)
    metrics = {"loss": loss, "lr": lr, "grad_norm": optax.tree.norm(grads),
               **optim.loss_scale_metrics(opt_state), **terms,
               "labels": label_counts}
    return new_state, metrics

  return train_step


def make_predict(model: nn.Module, normalize: bool):
  """(variables, uint8 images) -> (sigmoid scores, pooled features)."""

  def predict(variables, images):
    x = augment.eval_transform(images, normalize)
    out = model.apply(variables, x, train=False)
    return jax.nn.sigmoid(out["logits"]), out["features"]

  return predict
