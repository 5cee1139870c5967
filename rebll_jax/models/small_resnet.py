"""The small ResNet of the synthetic benchmark (depth and width from config).

A 3x3 stem (stride from config), then stages of basic residual blocks, each stage after the first
halving the resolution and doubling the width; global mean pool; a linear
multi-label head with one column per class of the dataset.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rebll_jax.models.conv import Conv
from rebll_jax.models.norm import norm_act


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # see rebll_jax.models.conv
  norm_impl: str = "auto"  # see rebll_jax.models.norm
  norm_groups: int = 1  # train-mode BatchNorm groups (models.norm)
  norm_row_weight: Any = None  # [B] rows that count in them (models.norm)

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name, slope=None, zero_scale=False: norm_act(
        self.norm_impl, train, self.dtype, name, slope, zero_scale,
        self.norm_groups, self.norm_row_weight)
    residual = x
    y = Conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)),
             use_bias=False, dtype=self.dtype, impl=self.conv_impl,
             name="conv1")(x)
    y = norm("bn1", slope=0.0)(y)
    y = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)),
             use_bias=False, dtype=self.dtype, impl=self.conv_impl,
             name="conv2")(y)
    # Zero-initialised last norm: each block starts as the identity.
    y = norm("bn2", zero_scale=True)(y)
    if residual.shape != y.shape:
      residual = Conv(self.features, (1, 1), self.strides, use_bias=False,
                      dtype=self.dtype, impl=self.conv_impl,
                      name="shortcut_conv")(residual)
      residual = norm("shortcut_bn")(residual)
    return nn.relu(residual + y)


class SmallResNet(nn.Module):
  """Returns {"logits": [N, num_classes] f32, "features": [N, D] f32}."""

  num_classes: int
  width: int = 32
  stage_sizes: Sequence[int] = (1, 1, 1)
  stem_stride: int = 1  # 2 halves the resolution early, as real ResNets do
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # see rebll_jax.models.conv
  norm_impl: str = "auto"  # see rebll_jax.models.norm
  norm_groups: int = 1  # train-mode BatchNorm groups (models.norm)
  norm_row_weight: Any = None  # [B] rows that count in them (models.norm)
  head_name = "head"  # the classifier's params (steps.fresh_head_rows)

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images.astype(self.dtype)
    x = Conv(self.width, (3, 3), self.stem_stride,
             padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
             impl=self.conv_impl, name="stem_conv")(x)
    x = norm_act(self.norm_impl, train, self.dtype, "stem_bn", 0.0,
                 groups=self.norm_groups,
                 row_weight=self.norm_row_weight)(x)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, self.dtype,
                       self.conv_impl, self.norm_impl, self.norm_groups,
                       self.norm_row_weight,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(features)
    return {"logits": logits, "features": features}
