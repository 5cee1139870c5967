"""Per-task optimizers and learning-rate schedules.

The schedule's numbers (peak rate, task length) are arrays in the train
state, not Python constants: rebuilding them at a task boundary does not
retrace the train step. The optax transformation itself only depends on the
config, so it is built once per run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rebll_jax.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("one_cycle", "cosine", "constant")


def _kernels_only(params):
  # L2 on weights only: conv and dense kernels, not biases or norm scales.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_transform(cfg) -> optax.GradientTransformation:
  """The direction of the update; the caller scales it by -lr(step)."""
  if cfg.name not in OPTIMIZERS:
    raise UserError(f"unknown optim.name {cfg.name!r}; valid: {list(OPTIMIZERS)}")
  decay = optax.add_decayed_weights(cfg.weight_decay, mask=_kernels_only)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.name == "adam":  # PyTorch Adam's L2: decay joins the gradient
    parts += [decay, optax.scale_by_adam()]
  elif cfg.name == "adamw":  # decoupled decay
    parts += [optax.scale_by_adam(), decay]
  else:
    parts += [decay, optax.trace(decay=cfg.momentum)]
  return optax.chain(*parts)


def learning_rate(step, *, total_steps, peak, warmup_frac, schedule: str):
  """Learning rate at ``step`` (arrays allowed) of a task of ``total_steps``.

  one_cycle: PyTorch's OneCycleLR (cosine annealing): from peak/25 up to peak
  over the warm-up fraction, then down to peak/(25 * 1e4).
  cosine: linear warm-up from 0, then cosine decay to 0.
  """
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warmup = jnp.maximum(warmup_frac * total, 1.0)
  if schedule == "constant":
    return jnp.asarray(peak, jnp.float32) * jnp.ones_like(step)
  if schedule == "one_cycle":
    start, end = peak / 25.0, peak / 25.0 / 1e4
    up = jnp.clip(step / warmup, 0.0, 1.0)
    down = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0, 1)
    rising = peak + (start - peak) * 0.5 * (1 + jnp.cos(jnp.pi * up))
    falling = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * down))
    return jnp.where(step < warmup, rising, falling)
  if schedule == "cosine":
    up = jnp.clip(step / warmup, 0.0, 1.0)
    down = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0, 1)
    return jnp.where(step < warmup, peak * up,
                     peak * 0.5 * (1 + jnp.cos(jnp.pi * down)))
  raise UserError(f"unknown optim.schedule {schedule!r}; valid: {list(SCHEDULES)}")
