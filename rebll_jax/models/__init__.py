"""Model registry: ``build_model(config.model, num_classes)``.

Every architecture is a Flax Linen module called as
``module.apply(variables, images, train=bool)`` on NHWC float images in
[0, 1] and returning ``{"logits": [N, num_classes], "features": [N, D]}``
(pooled backbone features, used by herding), both float32.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rebll_jax import xla_cpu
from rebll_jax.models import conv
from rebll_jax.models import norm
from rebll_jax.models import pretrained
from rebll_jax.models import small_resnet
from rebll_jax.models.pretrained import restore_backbone

# Compute dtypes. No float16: its gradients need loss scaling, which the
# train step does not do (bfloat16 has float32's range).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _conv_impl(cfg) -> str:
  # Resolved here ("auto" -> this backend's choice) so a model's repr says
  # which backward pass it runs; see rebll_jax.models.conv.
  return conv.resolve_impl(cfg.get("conv_impl", "auto"))


def _norm_impl(cfg) -> str:
  # A config saved before the field existed ran nn.BatchNorm.
  return norm.resolve_impl(cfg.get("norm_impl", "flax"))


def _small_resnet(cfg, num_classes, dtype):
  return small_resnet.SmallResNet(num_classes=num_classes, width=cfg.width,
                                  stage_sizes=tuple(cfg.stage_sizes),
                                  stem_stride=cfg.stem_stride, dtype=dtype)


# name -> factory(model_config, num_classes, dtype) -> nn.Module
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "small_resnet": _small_resnet,
    "resnet18": pretrained.arch_factory("resnet18"),
    "resnet50": pretrained.arch_factory("resnet50"),
    "resnet101": pretrained.arch_factory("resnet101"),
    "tresnet_m": pretrained.arch_factory("tresnet_m"),
}


# The first head's kernel as the PyTorch baseline's model constructor draws
# it (TResNet: ``weight.normal_(0, 0.01)``; the bias keeps nn.Linear's
# U(+-1/sqrt(D))): ``model.head_rows=fresh`` draws task 1's rows so. The
# others (torchvision's ResNets keep nn.Linear's init) draw U(+-1/sqrt(D)).
FIRST_HEAD_KERNEL_STD = {"tresnet_m": 0.01}


def build_model(cfg, num_classes: int, norm_groups: int = 1) -> nn.Module:
  """``norm_groups``: train-mode BatchNorm statistics per group of rows
  (``train.ddp_processes``; rebll_jax.models.norm)."""
  if cfg.arch not in ARCHS:
    raise ValueError(f"unknown model.arch {cfg.arch!r}; valid: {sorted(ARCHS)}")
  if cfg.dtype not in DTYPES:
    raise ValueError(f"unknown model.dtype {cfg.dtype!r}; valid: {sorted(DTYPES)}")
  model = ARCHS[cfg.arch](cfg, num_classes, DTYPES[cfg.dtype])
  return model.clone(conv_impl=_conv_impl(cfg), norm_impl=_norm_impl(cfg),
                     norm_groups=norm_groups)


def init_variables(model: nn.Module, key, image_size: int) -> dict:
  """The model's initial ``{"params", "batch_stats"}`` from ``key``.

  Jitted (an op-by-op init of a deep net costs far more than compiling
  it), with the cheap-to-compile options of ``xla_cpu.init_options``.
  """
  init = jax.jit(model.init, static_argnames="train",
                 compiler_options=xla_cpu.init_options())
  return init(key, jnp.zeros((1, image_size, image_size, 3)), train=False)
