"""BatchNorm (optionally with its (leaky) ReLU) with a hand-written gradient.

``BatchNorm`` has the parameters and running statistics of ``nn.BatchNorm``
(``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``;
same momentum update, biased batch variance E[x^2] - E[x]^2), so weights and
checkpoints move between the two. What differs is how the train-mode
gradient is computed. Autodiff through ``nn.BatchNorm`` + ``nn.relu`` keeps
several [N, H, W, C] intermediates alive and makes XLA:CPU walk the
activation map more times than needed; here the backward pass is the
textbook closed form, two per-channel sums then one elementwise pass:

    g  = dy * where(y > 0, 1, slope)       (only with the activation fused)
    dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat))

Same function to float32 rounding (``tests/test_norm.py`` checks values and
all gradients against ``nn.BatchNorm``). Statistics over the batch axes are
global on a sharded batch (the compiler inserts the cross-device sums).

``groups`` > 1 emulates PyTorch DistributedDataParallel over ``groups``
processes without SyncBatchNorm (``train.ddp_processes``): each process
normalises its own rows with its own statistics. Torch's
``DistributedSampler`` deals the rows of a global batch out in turn, so
group g is rows g, g + groups, g + 2 * groups, ...; the running averages
follow group 0's statistics (process 0's, the model the baseline saves and
evaluates).

``row_weight`` ([B] 0/1, ``train.last_batch=keep``) takes the rows of
weight 0, which pad an epoch's short last batch to the static batch size,
out of the statistics; they get no gradient either.

``norm_act`` builds either implementation for the models, so that every
backbone takes ``model.norm_impl`` the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ("auto", "flax", "fused")


def resolve_impl(impl: str) -> str:
  """"auto" -> "fused" on a CPU backend (a faster step there), "flax"
  elsewhere (not yet measured on GPU/TPU)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown model.norm_impl {impl!r}; valid: {list(IMPLS)}")
  if impl == "auto":
    return "fused" if jax.default_backend() == "cpu" else "flax"
  return impl


def _group_rows(x, groups: int):
  """[B, ...] -> [B / groups, groups, ...]: group g is rows g, g + groups,
  ... of the batch (torch's DistributedSampler deals rows out in turn)."""
  return x.reshape((x.shape[0] // groups, groups) + x.shape[1:])


def _stat_axes(x, groups: int) -> tuple:
  """The axes one set of statistics reduces over: all but the channels
  (and, with groups, the group axis of ``_group_rows``)."""
  if groups == 1:
    return tuple(range(x.ndim - 1))
  return (0,) + tuple(range(2, x.ndim - 1))


def _stats(x, groups: int = 1):
  """Biased batch mean and variance per channel ([C]; per group and
  channel, shaped to broadcast against ``_group_rows(x)``, with groups)."""
  keep = groups > 1
  axes = _stat_axes(x, groups)
  mean = jnp.mean(x, axes, keepdims=keep)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes, keepdims=keep)
                    - jnp.square(mean), 0.0)
  return mean, var


def _normalize(x, mean, var, scale, bias, epsilon, slope):
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (scale * inv) + bias
  if slope is None:
    return y
  return jnp.maximum(y, 0.0) if slope == 0 else jnp.where(y > 0, y, slope * y)


def _fused_batch_norm(x, scale, bias, epsilon, slope, groups=1):
  """(y, mean, var); with groups, x is ``_group_rows``' [B / G, G, ...] and
  the statistics are per group."""
  mean, var = _stats(x, groups)
  return _normalize(x, mean, var, scale, bias, epsilon, slope), mean, var


def _train_norm_fwd(x, scale, bias, epsilon, slope, groups):
  y, mean, var = _fused_batch_norm(x, scale, bias, epsilon, slope, groups)
  return (y, mean, var), (x, mean, var, scale, y)


def _backward_terms(epsilon, slope, groups, x, mean, var, y, g):
  """The output cotangent through the activation, inv, xhat and the two
  sums (per channel, and per group with groups) of the closed form."""
  if slope is not None:  # y > 0 exactly where the pre-activation is > 0
    g = jnp.where(y > 0, g, slope * g)
  axes = _stat_axes(x, groups)
  keep = groups > 1
  inv = jax.lax.rsqrt(var + epsilon)
  xhat = (x - mean) * inv
  g_sum = jnp.sum(g, axes, keepdims=keep)
  gx_sum = jnp.sum(g * xhat, axes, keepdims=keep)
  return g, inv, xhat, g_sum, gx_sum


def _per_channel(group_sums, groups, x):
  """scale's and bias's gradients: shared by the groups, their sums add."""
  if groups == 1:
    return group_sums
  return jnp.sum(group_sums, tuple(range(x.ndim - 1)))


def _train_norm_bwd(epsilon, slope, groups, residuals, cotangents):
  # The batch statistics feed only the running averages, never the loss:
  # their cotangents are dropped.
  x, mean, var, scale, y = residuals
  g, inv, xhat, g_sum, gx_sum = _backward_terms(epsilon, slope, groups, x,
                                                mean, var, y, cotangents[0])
  count = x.size // (x.shape[-1] * groups)
  dx = (scale * inv) * (g - g_sum / count - xhat * (gx_sum / count))
  return (dx, _per_channel(gx_sum, groups, x),
          _per_channel(g_sum, groups, x))


_train_norm = jax.custom_vjp(_fused_batch_norm, nondiff_argnums=(3, 4, 5))
_train_norm.defvjp(_train_norm_fwd, _train_norm_bwd)


# Row weights (``train.last_batch=keep``): a batch padded to its static size
# with rows of weight 0, which must not move the statistics. ``w`` is shaped
# to broadcast against x (1 on every axis but the rows'). With weights 0/1:
#   mean = sum(w x) / N,  var = sum(w x^2) / N - mean^2,  N = sum(w) * H * W
#   dx_i = scale * inv * (g_i - w_i sum(g) / N - w_i xhat_i sum(g xhat) / N)
# (a weight-0 row's output depends on the statistics, not they on it).

def _weighted_stats(x, w, groups):
  keep = groups > 1
  axes = _stat_axes(x, groups)
  count = jnp.sum(jnp.broadcast_to(w, x.shape[:-1] + (1,)), axes,
                  keepdims=keep)
  mean = jnp.sum(w * x, axes, keepdims=keep) / count
  var = jnp.maximum(jnp.sum(w * jnp.square(x), axes, keepdims=keep) / count
                    - jnp.square(mean), 0.0)
  return mean, var, count


def _weighted_batch_norm(x, w, scale, bias, epsilon, slope, groups):
  mean, var, _ = _weighted_stats(x, w, groups)
  return _normalize(x, mean, var, scale, bias, epsilon, slope), mean, var


def _weighted_fwd(x, w, scale, bias, epsilon, slope, groups):
  mean, var, count = _weighted_stats(x, w, groups)
  y = _normalize(x, mean, var, scale, bias, epsilon, slope)
  return (y, mean, var), (x, w, count, mean, var, scale, y)


def _weighted_bwd(epsilon, slope, groups, residuals, cotangents):
  x, w, count, mean, var, scale, y = residuals
  g, inv, xhat, g_sum, gx_sum = _backward_terms(epsilon, slope, groups, x,
                                                mean, var, y, cotangents[0])
  dx = (scale * inv) * (g - w * (g_sum / count)
                        - w * xhat * (gx_sum / count))
  return (dx, jnp.zeros_like(w), _per_channel(gx_sum, groups, x),
          _per_channel(g_sum, groups, x))


_weighted_train_norm = jax.custom_vjp(_weighted_batch_norm,
                                      nondiff_argnums=(4, 5, 6))
_weighted_train_norm.defvjp(_weighted_fwd, _weighted_bwd)


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` over the last axis, then a leaky ReLU of negative
  slope ``slope`` (0: ReLU; None: no activation). ``groups``: train-mode
  statistics per group of rows (module docstring)."""

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  slope: Optional[float] = None
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  groups: int = 1
  # [B] 0/1 weights of the batch's rows for train-mode statistics (rows of
  # weight 0 pad a short batch); None: every row counts.
  row_weight: Any = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", self.bias_init, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,),
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,),
                           jnp.float32)
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      y = _normalize(x32, ra_mean.value, ra_var.value, scale, bias,
                     self.epsilon, self.slope)
    else:
      y, mean, var = self._train(x32, scale, bias)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    return y.astype(self.dtype)

  def _train(self, x, scale, bias):
    """(y, mean, var) in train mode: the statistics of the batch, of each
    group of rows, counting only the rows of weight 1; the running averages
    follow group 0's (process 0's)."""
    g = self.groups
    if x.shape[0] % g:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split into "
                       f"{g} BatchNorm groups")
    rows = x if g == 1 else _group_rows(x, g)
    if self.row_weight is None:
      y, mean, var = _train_norm(rows, scale, bias, self.epsilon, self.slope,
                                 g)
    else:  # shaped to broadcast against the rows: [B, 1, ...] / [B/G, G, ...]
      weight = self.row_weight.astype(jnp.float32).reshape(
          rows.shape[:rows.ndim - x.ndim + 1] + (1,) * (x.ndim - 1))
      y, mean, var = _weighted_train_norm(rows, weight, scale, bias,
                                          self.epsilon, self.slope, g)
    return (y.reshape(x.shape), mean.reshape(g, -1)[0],
            var.reshape(g, -1)[0])


def norm_act(impl: str, train: bool, dtype, name: str,
             slope: Optional[float] = None, zero_scale: bool = False,
             groups: int = 1, row_weight=None):
  """BatchNorm (torch's momentum and epsilon) + optional leaky ReLU, as
  ``impl`` ("auto" | "flax" | "fused") computes it; returns a function of
  the activations. ``zero_scale`` starts the scale at 0 (a block's last
  norm). ``groups`` > 1 (statistics per group of rows, module docstring)
  and ``row_weight`` ([B] 0/1: rows that count in the statistics) are the
  fused module's whatever ``impl`` says: nn.BatchNorm has neither."""
  kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5,
            dtype=dtype, name=name,
            scale_init=nn.initializers.zeros if zero_scale
            else nn.initializers.ones)
  if groups > 1 or row_weight is not None or resolve_impl(impl) == "fused":
    return BatchNorm(slope=slope, groups=groups, row_weight=row_weight, **kw)
  module = nn.BatchNorm(**kw)
  if slope is None:
    return module
  if slope == 0:
    return lambda x: nn.relu(module(x))
  return lambda x: nn.leaky_relu(module(x), slope)
