"""The losses of RebLL's AKD module (METHOD.md section 4), and POD-flat.

Every function is keyword-only, works inside ``jax.jit``, and returns one value
per example (a float32 vector of length N) summed over the classes its mask
selects; the caller takes the mean over examples and combines
``L = L_cls + lambda_kd * L_kd``. ``reduction="mean" | "sum"`` reduces over the
examples instead (the PyTorch baseline trainer sums its ASL over batch and
classes, see ``reduce_examples``).

Masks are arrays (float or bool, one entry per example and class), never
Python constants, so the classes a task sees can change without a recompile.
A mask entry of 0 removes that entry from the value *and* from the gradient,
even where the logits are huge: the per-entry terms are finite for any finite
logit because every log-probability goes through a ``log_sigmoid`` form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _compute_dtype(x):
  """float32, or float64 when x is float64 (x64 mode, used by grad checks)."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _masked_sum(terms, mask):
  """Sums terms [N, C] over classes with mask [N, C] weights -> [N]."""
  mask = jnp.asarray(mask)
  weight = mask.astype(terms.dtype)
  # where(), not only a product: a masked-out entry contributes exactly 0
  # even if its term were inf/nan (e.g. garbage padding columns).
  return jnp.sum(jnp.where(mask != 0, terms * weight, 0.0), axis=-1)


def _log_one_minus_clipped(logits, margin):
  """log(1 - max(sigmoid(z) - m, 0)) for m >= 0, stable for any finite z.

  1 - max(p - m, 0) = min(1 - p + m, 1) = min(sigmoid(-z) + m, 1). For m > 0 the
  argument of the log is at least m, so it is finite even when sigmoid(-z)
  underflows to 0 (z = +1e4). For m = 0 that bound vanishes, so we use the
  exact log_sigmoid(-z). ``margin`` may be a Python number or a traced scalar;
  the unused branch is kept finite so where() does not leak nan gradients.
  """
  margin = jnp.asarray(margin, logits.dtype)
  positive = margin > 0
  safe_margin = jnp.where(positive, margin, 1.0)
  clipped = jnp.minimum(jnp.log(jax.nn.sigmoid(-logits) + safe_margin), 0.0)
  return jnp.where(positive, clipped, jax.nn.log_sigmoid(-logits))


def _floored(log_prob, prob_floor):
  """max(log_prob, log(prob_floor)); unchanged where prob_floor <= 0."""
  floor = jnp.asarray(prob_floor, log_prob.dtype)
  use = floor > 0
  log_floor = jnp.log(jnp.where(use, floor, 1.0))
  return jnp.where(use, jnp.maximum(log_prob, log_floor), log_prob)


REDUCTIONS = ("none", "mean", "sum")
POD_FLAT_EPS = 1e-12  # added to squared norms, as torch's cosine_embedding_loss


def reduce_examples(values, *, reduction, weight=None):
  """Per-example values [N] -> themselves ("none"), their mean or their sum.

  ``weight`` ([N] 0/1, or None for all 1): the rows that count; rows of
  weight 0 pad a short batch (``train.last_batch=keep``) and add nothing.

  "sum" is the PyTorch baseline trainer's reduction of ASL (``-loss.sum()``
  over batch and classes). Inside a data-parallel jit the sum and the mean
  are over the global batch; the baseline under DDP with W processes steps
  on the average of per-process sums, i.e. the global sum / W.
  """
  if reduction == "none":
    return values
  if weight is not None:
    weighted = jnp.sum(values * weight)
    if reduction == "mean":
      return weighted / jnp.maximum(jnp.sum(weight), 1.0)
    if reduction == "sum":
      return weighted
  elif reduction == "mean":
    return jnp.mean(values)
  elif reduction == "sum":
    return jnp.sum(values)
  raise ValueError(f"reduction={reduction!r}; valid: {REDUCTIONS}")


def asymmetric_bce(*, logits, labels, mask, g_pos=0., g_neg=0., margin=0.,
                   w_pos=1., w_neg=1., prob_floor=0., reduction="none"):
  """The asymmetric BCE family (L_cls of METHOD.md section 4), per example.

    L = - sum_c mask_c * [ w_pos * y_c * (1 - p_c)^g_pos * log(p_c)
                         + w_neg * (1 - y_c) * p_m^g_neg * log(1 - p_m) ]
    p_c = sigmoid(z_c),  p_m = max(p_c - margin, 0)

  The focusing weights (1 - p)^g_pos and p_m^g_neg are under stop_gradient
  (as in ASL's reference code). Settings:
    BCE     g_pos=0, g_neg=0, margin=0
    ASL     g_pos=0, g_neg=4, margin=0.05   (damps easy negatives)
    AKD-cls g_pos=1, g_neg=0, margin=0      (damps confident positives)

  Args:
    logits: float [N, C] (any float dtype; computed in float32, or float64
      for float64 input).
    labels: float [N, C] in {0, 1} (soft values in [0, 1] also work).
    mask: float or bool [N, C]; the ``known`` mask times the class-column
      mask. Unknown entries contribute nothing.
    g_pos, g_neg, margin, w_pos, w_neg: Python numbers or traced scalars.
    prob_floor: 0, or the eps of ASL's reference code: each log reads
      max(probability, prob_floor), so a term is capped at -log(prob_floor)
      and has no gradient past it (ASL's ``clamp(min=eps)``, eps = 1e-8).
      Only a positive with logit below log(eps) ~ -18.4 (or, with margin 0,
      a negative above +18.4) feels it. Number or traced scalar.
    reduction: "none" (per example), "mean" or "sum" over the examples.

  Returns:
    float32 [N] (float64 for float64 logits), the loss of each example
    summed over its masked classes; a scalar for "mean" / "sum".
  """
  dtype = _compute_dtype(logits)
  z = jnp.asarray(logits, dtype)
  y = jnp.asarray(labels, dtype)
  log_p = _floored(jax.nn.log_sigmoid(z), prob_floor)
  log_1m_pm = _floored(_log_one_minus_clipped(z, margin), prob_floor)
  p = jax.nn.sigmoid(z)
  p_m = jnp.maximum(p - jnp.asarray(margin, dtype), 0.0)
  # jnp.power(0, 0) == 1, so g = 0 gives weight 1 even at saturated p.
  focus_pos = jax.lax.stop_gradient(jnp.power(jax.nn.sigmoid(-z), g_pos))
  focus_neg = jax.lax.stop_gradient(jnp.power(p_m, g_neg))
  terms = (w_pos * y * focus_pos * log_p +
           w_neg * (1.0 - y) * focus_neg * log_1m_pm)
  return reduce_examples(-_masked_sum(terms, mask), reduction=reduction)


# What the distillation decay is a function of (``loss.decay_on``, our
# reading): the old model's confidence |2q - 1| (METHOD.md, default: damps
# confident negatives and positives alike) or its score q (damps only
# confident positives, the over-confidence the paper describes).
DECAY_ON = ("confidence", "score")


def distillation_weights(*, old_logits, mask, temperature=1., beta=0.,
                         adaptive=False, decay_on="confidence"):
  """The decay factors a_c of the distillation loss (no gradient) [N, C].

    q_c = sigmoid(z'_c / T),  a_c = exp(-beta * |2 q_c - 1|)
    (``decay_on="score"``: a_c = exp(-beta * q_c))

  With ``adaptive``, a is divided by its mean over the entries ``mask``
  selects in this batch (so it has mean 1 there and the loss keeps the scale
  of plain distillation). Inside a data-parallel jit over a mesh that mean is
  over the global batch. With no selected entry a is left as is (the loss is
  0 anyway). beta = 0 gives a = 1 for every setting of ``adaptive``.
  """
  dtype = _compute_dtype(old_logits)
  z_old = jax.lax.stop_gradient(jnp.asarray(old_logits, dtype))
  q = jax.nn.sigmoid(z_old / temperature)
  if decay_on not in DECAY_ON:
    raise ValueError(f"decay_on must be one of {DECAY_ON}, got {decay_on!r}")
  conf = jnp.abs(2.0 * q - 1.0) if decay_on == "confidence" else q
  a = jnp.exp(-beta * conf)
  if adaptive:
    w = jnp.asarray(mask).astype(dtype)
    total = jnp.sum(w)
    mean = jnp.sum(a * w) / jnp.maximum(total, 1e-12)
    a = jnp.where(total > 0, a / jnp.maximum(mean, 1e-30), a)
  return jax.lax.stop_gradient(a)


def asymmetric_distillation(*, logits, old_logits, mask, temperature=1.,
                            beta=0., adaptive=False, student_temperature=1.,
                            decay_on="confidence"):
  """Asymmetric (decayed) sigmoid-BCE distillation (L_kd, METHOD.md s. 4).

    L = - sum_c mask_c * a_c * [ q_c log p_c + (1 - q_c) log(1 - p_c) ]
    q_c = sigmoid(z'_c / T)          (old model, stop_gradient)
    p_c = sigmoid(z_c / T_s)         (current model)
    a_c = stop_gradient(exp(-beta * |2 q_c - 1|)), renormalised to mean 1
          over the batch's masked entries when ``adaptive``

  Confident old predictions (q near 0 or 1) get less weight, which is how AKD
  damps overconfident old-model outputs; beta = 0 is plain LwF-style BCE
  distillation.

  Student temperature (a documented choice): METHOD.md writes p = sigmoid(z),
  so ``student_temperature`` defaults to 1 and only the teacher is softened.
  Pass ``student_temperature=temperature`` for the Hinton-style symmetric
  form. There is no T^2 factor (for sigmoid BCE the gradient scale changes
  with T only as 1/T_s). With T = 1 (the config default) all readings agree.

  Args:
    logits: float [N, C], current model.
    old_logits: float [N, C], frozen past model (gradient is stopped here).
    mask: float or bool [N, C], selects old classes; may zero whole rows.
    temperature: teacher temperature T (c.loss.temperature).
    beta: decay strength (c.loss.beta); adaptive: c.loss.adaptive.
    decay_on: "confidence" (|2q - 1|) or "score" (q), c.loss.decay_on.
    student_temperature: T_s, see above.

  Returns:
    float32 [N] (float64 for float64 logits), the loss of each example
    summed over its masked classes.
  """
  dtype = _compute_dtype(logits)
  z = jnp.asarray(logits, dtype) / student_temperature
  q = jax.nn.sigmoid(
      jax.lax.stop_gradient(jnp.asarray(old_logits, dtype)) / temperature)
  a = distillation_weights(old_logits=old_logits, mask=mask,
                           temperature=temperature, beta=beta,
                           adaptive=adaptive, decay_on=decay_on)
  terms = a * (q * jax.nn.log_sigmoid(z) + (1.0 - q) * jax.nn.log_sigmoid(-z))
  return -_masked_sum(terms, mask)


def pod_flat(*, features, old_features, n_seen, task_size, weight,
             reduction="none"):
  """POD-flat distillation of pooled embeddings, per example.

    L_i = weight * sqrt(n_seen / task_size) * (1 - cos(e_old_i, e_new_i))

  The mean over examples of L_i is the PyTorch baseline trainer's term
  ``lambda_f * sqrt(num_classes / task_size) * cosine_embedding_loss(old,
  new, 1)``, with ``n_seen`` the classes seen including the current task and
  ``task_size`` the size of an incremental task (not of the first one).
  ``features`` are the model's ``features`` output (the pooled embedding the
  head reads); ``old_features`` come from the frozen past model (gradient
  stopped here).

  cos = <a, b> / sqrt((|a|^2 + eps) (|b|^2 + eps)), eps = 1e-12, as torch
  computes it: a zero vector gives cos = 0 (loss ``weight * scale``) with
  finite value and gradient.

  Args:
    features: float [N, D], current model (any float dtype; computed in
      float32, or float64 for float64 input).
    old_features: float [N, D], past model.
    n_seen, task_size, weight: Python numbers or traced scalars (n_seen can
      then change per task without a recompile); task_size > 0.
    reduction: "none" (per example), "mean" or "sum" over the examples.

  Returns:
    float32 [N] (or a scalar for "mean" / "sum").
  """
  for name, value in (("task_size", task_size), ("n_seen", n_seen)):
    if isinstance(value, (int, float)) and (
        value <= 0 if name == "task_size" else value < 0):
      raise ValueError(f"pod_flat: {name}={value} must be "
                       f"{'> 0' if name == 'task_size' else '>= 0'}")
  dtype = _compute_dtype(features)
  new = jnp.asarray(features, dtype)
  old = jax.lax.stop_gradient(jnp.asarray(old_features, dtype))
  dot = jnp.sum(new * old, axis=-1)
  # Two rsqrt factors, not sqrt of the product: no overflow of |a|^2 |b|^2.
  cos = (dot * jax.lax.rsqrt(jnp.sum(new * new, axis=-1) + POD_FLAT_EPS) *
         jax.lax.rsqrt(jnp.sum(old * old, axis=-1) + POD_FLAT_EPS))
  scale = weight * jnp.sqrt(jnp.asarray(n_seen, dtype) /
                            jnp.asarray(task_size, dtype))
  return reduce_examples(scale * (1.0 - cos), reduction=reduction)
