"""Per-task optimizers, learning-rate schedules and the update of one step.

The schedule's numbers (peak rate, task length) are arrays in the train
state, not Python constants: rebuilding them at a task boundary does not
retrace the train step. The optax transformation itself only depends on the
config, so it is built once per run.

``step_updates`` is the whole optimizer side of a train step: the direction
from ``tx``, Adam's beta1 of this step when ``optim.cycle_beta1`` is on, and
the scaling by -lr(step).

``optim.loss_scale=torch_fp16`` wraps ``tx`` in the skipping rule of the
PyTorch baseline's ``GradScaler`` (``skip_like_fp16_scaler``): the baseline
trains under fp16 autocast, where a step whose scaled gradients overflow
float16 is skipped and the scale halves. Our gradients are float32; the
rule asks whether they *would* overflow at the current scale.

The one-cycle shape is PyTorch's ``OneCycleLR`` (cosine annealing,
``div_factor`` 25, ``final_div_factor`` 1e4, two phases) step for step: with
``T`` steps and warm-up fraction ``p``, phase 1 ends at the (float) step
``e = p * T - 1`` and phase 2 at ``T - 1``; step ``s <= e`` anneals from
peak/25 to peak over ``s / e``, later steps from peak to peak/25/1e4 over
``(s - e) / (T - 1 - e)``. So the peak is reached at step ``p * T - 1`` and
the last step of the task runs at the minimum rate. With
``cycle_momentum=True`` (``optim.cycle_beta1``) torch moves Adam's beta1
along the same phases the other way: 0.95 -> 0.85 -> 0.95.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rebll_jax.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("one_cycle", "cosine", "constant")
LOSS_SCALES = ("none", "torch_fp16")  # optim.loss_scale

# torch.amp.GradScaler's defaults (the baseline passes none).
SCALE_INIT = 2.0 ** 16
SCALE_GROWTH = 2.0
SCALE_BACKOFF = 0.5
SCALE_GROWTH_INTERVAL = 2000
# float16's largest finite value is 65504; casting rounds to nearest, so
# anything from halfway to the next power of two (65520) up becomes inf.
FP16_OVERFLOW = 65520.0

# torch OneCycleLR's defaults.
DIV_FACTOR = 25.0  # first lr = peak / DIV_FACTOR
FINAL_DIV_FACTOR = 1e4  # last lr = first lr / FINAL_DIV_FACTOR
BETA1_MAX = 0.95  # max_momentum: beta1 at the start and the end
BETA1_MIN = 0.85  # base_momentum: beta1 at the lr peak


def _kernels_only(params):
  # L2 on weights only: conv and dense kernels, not biases or norm scales.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def scale_by_adam_beta1_arg(b2: float = 0.999, eps: float = 1e-8
                            ) -> optax.GradientTransformationExtraArgs:
  """Adam's direction with beta1 given per step: ``update(..., beta1=b)``.

  The state is optax's ``ScaleByAdamState`` (same tree and shapes as
  ``optax.scale_by_adam``); with a constant beta1 the numbers are those of
  ``optax.scale_by_adam(b1=beta1)`` up to 1 - beta1 being taken in float32.
  Like torch's Adam under a momentum schedule, both the first-moment average
  and its bias correction use the current step's beta1.
  """
  init = optax.scale_by_adam(b2=b2, eps=eps).init

  def update(updates, state, params=None, *, beta1, **extra):
    del params, extra
    mu = optax.tree.update_moment(updates, state.mu, beta1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, beta1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps),
                             mu_hat, nu_hat)
    return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


class LossScaleState(NamedTuple):
  """``skip_like_fp16_scaler``'s state around the inner optimizer's."""
  inner: Any
  scale: jax.Array  # float32, GradScaler's scale
  good_steps: jax.Array  # int32, steps since the last overflow or growth
  skipped: jax.Array  # int32, steps skipped since init (the task's)


def _fp16_computed(tree) -> list:
  """The leaves of ``tree`` (params or grads) that autocast computes in
  float16: every parameter of a layer with a ``kernel`` (convolutions and
  dense layers: kernel and bias), not the norms' scales and biases (batch
  norm keeps its weight gradients in float32)."""
  if not isinstance(tree, Mapping):
    return []
  if "kernel" in tree:
    return jax.tree.leaves(tree)
  return [leaf for value in tree.values() for leaf in _fp16_computed(value)]


def fp16_overflow(grads, scale) -> jax.Array:
  """Would ``scale`` x ``grads`` overflow where autocast computes fp16?

  Under fp16 autocast, convolutions and dense layers produce their weight
  and bias gradients in float16, from the scaled loss. A step overflows
  when one of those, times the scale, rounds to inf (``_fp16_computed``;
  in a tree with no such layer, every leaf), or when any gradient is not
  finite. Activation gradients are not checked, and float16's own rounding
  is not modelled. Checked against torch's own fp16 autocast and
  ``GradScaler`` on CPU (``experiments/loss_scale_check.py``): the same
  skip decision on 279 of 280 steps of a small ResNet with the summed ASL,
  most of them at a scale probing the limit; in the one miss the stem's
  weight gradient overflowed in float16 while the largest float32 one was
  at 0.94 of the limit. Leaving the dense bias out (a first version did) missed
  every skip where the head's bias gradient, the sum of the logit
  gradients over the batch, was the one to overflow."""
  leaves = jax.tree.leaves(grads)
  checked = _fp16_computed(grads) or leaves
  biggest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in checked]))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
  return ~finite | (biggest * scale >= FP16_OVERFLOW)


def skip_like_fp16_scaler(inner, growth_interval: int = SCALE_GROWTH_INTERVAL
                          ) -> optax.GradientTransformationExtraArgs:
  """``inner``, skipped on steps ``fp16_overflow`` flags, with torch
  ``GradScaler``'s dynamic scale: starts at 2^16, halves on an overflow,
  doubles after ``growth_interval`` (torch: 2000) steps in a row without
  one.

  A skipped step is torch's skipped ``optimizer.step()``: zero update and
  ``inner``'s state (Adam's moments and count) unchanged; the caller's
  learning-rate schedule still advances, as the baseline's scheduler steps
  regardless. A new task's fresh optimizer state is a new ``GradScaler``,
  as the baseline makes one per task."""

  def init(params):
    return LossScaleState(inner=inner.init(params),
                          scale=jnp.asarray(SCALE_INIT, jnp.float32),
                          good_steps=jnp.zeros((), jnp.int32),
                          skipped=jnp.zeros((), jnp.int32))

  def update(grads, state, params=None, **extra):
    overflow = fp16_overflow(grads, state.scale)
    updates, inner_state = inner.update(grads, state.inner, params, **extra)
    inner_state = jax.tree.map(lambda new, old: jnp.where(overflow, old, new),
                               inner_state, state.inner)
    updates = jax.tree.map(lambda u: jnp.where(overflow, 0, u), updates)
    good = jnp.where(overflow, 0, state.good_steps + 1)
    grow = good >= growth_interval
    scale = jnp.where(overflow, state.scale * SCALE_BACKOFF,
                      jnp.where(grow, state.scale * SCALE_GROWTH,
                                state.scale))
    return updates, LossScaleState(
        inner=inner_state, scale=scale, good_steps=jnp.where(grow, 0, good),
        skipped=state.skipped + overflow.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init, update)


def loss_scale_metrics(opt_state) -> dict:
  """{"loss_scale", "skipped_steps"} under ``skip_like_fp16_scaler``, else
  {}: the scale after this step and the task's skipped steps so far."""
  if not isinstance(opt_state, LossScaleState):
    return {}
  return {"loss_scale": opt_state.scale,
          "skipped_steps": opt_state.skipped}


def check_choices(cfg):
  """UserError for an ``optim`` block no transform can be made of (run by
  ``validate.check_config``, so a dry run refuses it too)."""
  if cfg.name not in OPTIMIZERS:
    raise UserError(f"unknown optim.name {cfg.name!r}; valid: {list(OPTIMIZERS)}")
  if cfg.cycle_beta1 and (cfg.name not in ("adam", "adamw")
                          or cfg.schedule != "one_cycle"):
    raise UserError("optim.cycle_beta1 needs optim.name adam or adamw and "
                    f"optim.schedule one_cycle (got {cfg.name!r}, "
                    f"{cfg.schedule!r})")


def make_transform(cfg) -> optax.GradientTransformation:
  """The direction of the update; ``step_updates`` scales it by -lr(step)."""
  check_choices(cfg)
  decay = optax.add_decayed_weights(cfg.weight_decay, mask=_kernels_only)
  adam = (scale_by_adam_beta1_arg() if cfg.cycle_beta1
          else optax.scale_by_adam())
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.name == "adam":  # PyTorch Adam's L2: decay joins the gradient
    parts += [decay, adam]
  elif cfg.name == "adamw":  # decoupled decay
    parts += [adam, decay]
  else:
    parts += [decay, optax.trace(decay=cfg.momentum)]
  tx = optax.chain(*parts)
  loss_scale = cfg.get("loss_scale", "none")
  if loss_scale not in LOSS_SCALES:
    raise UserError(f"unknown optim.loss_scale {loss_scale!r}; valid: "
                    f"{list(LOSS_SCALES)}")
  return skip_like_fp16_scaler(tx) if loss_scale == "torch_fp16" else tx


def _cosine_anneal(start, end, frac):
  return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * frac) + 1.0)


def _one_cycle(step, total, warmup_frac, start, middle, end):
  """torch OneCycleLR's two cosine phases (see the module docstring)."""
  up_end = warmup_frac * total - 1.0  # a float step, as in torch
  down_end = total - 1.0
  # up_end == 0 divides 0 by 0 in torch (it raises); here step 0 is the peak.
  up = jnp.where(up_end > 0, step / jnp.where(up_end > 0, up_end, 1.0), 1.0)
  down = (step - up_end) / jnp.maximum(down_end - up_end, 1e-6)
  return jnp.where(step <= up_end, _cosine_anneal(start, middle, up),
                   _cosine_anneal(middle, end, down))


def learning_rate(step, *, total_steps, peak, warmup_frac, schedule: str):
  """Learning rate at ``step`` (arrays allowed) of a task of ``total_steps``.

  one_cycle: PyTorch's OneCycleLR with its step boundaries (module
  docstring): from peak/25 up to peak, then down to peak/(25 * 1e4).
  cosine: linear warm-up from 0, then cosine decay to 0.
  """
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warmup = jnp.maximum(warmup_frac * total, 1.0)
  if schedule == "constant":
    return jnp.asarray(peak, jnp.float32) * jnp.ones_like(step)
  if schedule == "one_cycle":
    first = peak / DIV_FACTOR
    return _one_cycle(step, total, warmup_frac, first, peak,
                      first / FINAL_DIV_FACTOR)
  if schedule == "cosine":
    up = jnp.clip(step / warmup, 0.0, 1.0)
    down = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0, 1)
    return jnp.where(step < warmup, peak * up,
                     peak * 0.5 * (1 + jnp.cos(jnp.pi * down)))
  raise UserError(f"unknown optim.schedule {schedule!r}; valid: {list(SCHEDULES)}")


def beta1(step, *, total_steps, warmup_frac):
  """Adam's beta1 at ``step`` under torch's one-cycle momentum schedule."""
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  return _one_cycle(step, total, warmup_frac, BETA1_MAX, BETA1_MIN, BETA1_MAX)


def step_updates(tx, grads, opt_state, params, *, task_step, total_steps,
                 lr_peak, cfg):
  """The optimizer side of one train step (pure, jittable).

  Args:
    tx: from ``make_transform(cfg)``.
    grads, opt_state, params: this step's gradients, ``tx``'s state, params.
    task_step: the step within the task (0-based), an int array.
    total_steps: the task's length; lr_peak: its peak learning rate.
    cfg: ``config.optim``.

  Returns:
    (updates already scaled by -lr, the new optimizer state, lr).
  """
  if cfg.cycle_beta1:
    b1 = beta1(task_step, total_steps=total_steps,
               warmup_frac=cfg.warmup_frac)
    updates, opt_state = tx.update(grads, opt_state, params, beta1=b1)
  else:
    updates, opt_state = tx.update(grads, opt_state, params)
  lr = learning_rate(task_step, total_steps=total_steps, peak=lr_peak,
                     warmup_frac=cfg.warmup_frac, schedule=cfg.schedule)
  updates = jax.tree.map(lambda u: -lr * u, updates)
  return updates, opt_state, lr
