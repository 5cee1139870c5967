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


def _stats(x):
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
  return mean, var


def _normalize(x, mean, var, scale, bias, epsilon, slope):
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (scale * inv) + bias
  if slope is None:
    return y
  return jnp.maximum(y, 0.0) if slope == 0 else jnp.where(y > 0, y, slope * y)


def _fused_batch_norm(x, scale, bias, epsilon, slope):
  mean, var = _stats(x)
  return _normalize(x, mean, var, scale, bias, epsilon, slope), mean, var


def _train_norm_fwd(x, scale, bias, epsilon, slope):
  y, mean, var = _fused_batch_norm(x, scale, bias, epsilon, slope)
  return (y, mean, var), (x, mean, var, scale, y)


def _train_norm_bwd(epsilon, slope, residuals, cotangents):
  # The batch statistics feed only the running averages, never the loss:
  # their cotangents are dropped.
  x, mean, var, scale, y = residuals
  g = cotangents[0]
  if slope is not None:  # y > 0 exactly where the pre-activation is > 0
    g = jnp.where(y > 0, g, slope * g)
  axes = tuple(range(x.ndim - 1))
  inv = jax.lax.rsqrt(var + epsilon)
  xhat = (x - mean) * inv
  g_sum = jnp.sum(g, axes)
  gx_sum = jnp.sum(g * xhat, axes)
  count = x.size // x.shape[-1]
  dx = (scale * inv) * (g - g_sum / count - xhat * (gx_sum / count))
  return dx, gx_sum, g_sum


_train_norm = jax.custom_vjp(_fused_batch_norm, nondiff_argnums=(3, 4))
_train_norm.defvjp(_train_norm_fwd, _train_norm_bwd)


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` over the last axis, then a leaky ReLU of negative
  slope ``slope`` (0: ReLU; None: no activation)."""

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  slope: Optional[float] = None
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

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
      y, mean, var = _train_norm(x32, scale, bias, self.epsilon, self.slope)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var
    return y.astype(self.dtype)


def norm_act(impl: str, train: bool, dtype, name: str,
             slope: Optional[float] = None, zero_scale: bool = False):
  """BatchNorm (torch's momentum and epsilon) + optional leaky ReLU, as
  ``impl`` ("auto" | "flax" | "fused") computes it; returns a function of
  the activations. ``zero_scale`` starts the scale at 0 (a block's last
  norm)."""
  kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5,
            dtype=dtype, name=name,
            scale_init=nn.initializers.zeros if zero_scale
            else nn.initializers.ones)
  if resolve_impl(impl) == "fused":
    return BatchNorm(slope=slope, **kw)
  module = nn.BatchNorm(**kw)
  if slope is None:
    return module
  if slope == 0:
    return lambda x: nn.relu(module(x))
  return lambda x: nn.leaky_relu(module(x), slope)
