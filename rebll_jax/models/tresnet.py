"""TResNet-M (Ridnik et al., 2021), weight-compatible with timm's ``tresnet_m``.

The backbone of the multi-label class-incremental literature: a
space-to-depth stem, basic blocks then bottlenecks, squeeze-excitation in
the first three stages, anti-aliased downsampling (stride-1 conv, then a
fixed 3x3 blur at stride 2), average-pooled shortcuts, and batch norms with
the activation fused in (leaky slopes 1e-2 in the stem, 1e-3 in blocks).
The facts it reproduces are listed in shared/BACKBONES.md.

Submodules are named after timm's state-dict keys with '.' written as '_'
(``body_layer2_0/downsample_1/conv`` is ``body.layer2.0.downsample.1.conv``);
``rebll_jax.models.pretrained`` maps names by that rule.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rebll_jax.models.conv import Conv
from rebll_jax.models.norm import norm_act

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def space_to_depth(x, block: int = 4):
  """[N, H, W, C] -> [N, H/b, W/b, b*b*C], channel (dy*b + dx)*C + c."""
  n, h, w, c = x.shape
  if h % block or w % block:
    raise ValueError(f"TResNet needs image sides divisible by {block}; "
                     f"got {h}x{w}")
  x = x.reshape(n, h // block, block, w // block, block, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // block, w // block, block * block * c)


def blur_downsample(x):
  """Reflect-pad 1, depthwise outer([1,2,1],[1,2,1])/16 filter, stride 2.

  Written as strided slices of a separable filter rather than a grouped
  convolution: it is the same sum, and it fuses into one elementwise kernel.
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  h, w = x.shape[1] - 2, x.shape[2] - 2  # input sides
  oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  rows = lambda d: x[:, d:d + 2 * oh - 1:2]
  x = (rows(0) + 2 * rows(1) + rows(2)) * 0.25
  cols = lambda d: x[:, :, d:d + 2 * ow - 1:2]
  return (cols(0) + 2 * cols(1) + cols(2)) * 0.25


class ConvNormAct(nn.Module):
  """Conv (no bias) -> norm -> optional leaky ReLU -> optional blur.

  ``slope=None`` means no activation. ``blur`` is the anti-aliased stride 2:
  the conv itself always runs at stride 1.
  """

  features: int
  kernel: int = 3
  slope: Optional[float] = None
  blur: bool = False
  zero_norm: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  norm_impl: str = "auto"
  norm_groups: int = 1
  norm_row_weight: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    p = self.kernel // 2
    x = Conv(self.features, (self.kernel, self.kernel),
             padding=((p, p), (p, p)), use_bias=False, kernel_init=conv_init,
             dtype=self.dtype, impl=self.conv_impl, name="conv")(x)
    x = norm_act(self.norm_impl, train, self.dtype, "bn", self.slope,
                 zero_scale=self.zero_norm, groups=self.norm_groups,
                 row_weight=self.norm_row_weight)(x)
    return blur_downsample(x) if self.blur else x


class SqueezeExcite(nn.Module):
  hidden: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    # 1x1 convs with bias on the pooled map (names fc1/fc2 as in timm).
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    s = s.astype(self.dtype)
    s = nn.relu(Conv(self.hidden, (1, 1), dtype=self.dtype,
                     impl=self.conv_impl, name="fc1")(s))
    s = Conv(x.shape[-1], (1, 1), dtype=self.dtype, impl=self.conv_impl,
             name="fc2")(s)
    return x * nn.sigmoid(s)


def _kernels(module) -> dict:
  """The dtype and kernel choices a block hands to its layers."""
  return dict(dtype=module.dtype, conv_impl=module.conv_impl,
              norm_impl=module.norm_impl, norm_groups=module.norm_groups,
              norm_row_weight=module.norm_row_weight)


class Shortcut(nn.Module):
  """2x2/2 ceil-mode average pool (padding not counted), 1x1 conv, norm."""

  features: int
  pool: bool
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  norm_impl: str = "auto"
  norm_groups: int = 1
  norm_row_weight: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.pool:
      h, w = x.shape[1], x.shape[2]
      x = nn.avg_pool(x, (2, 2), (2, 2), padding=((0, h % 2), (0, w % 2)),
                      count_include_pad=False)
    # Named as the module at index 1 of timm's Sequential(pool, conv-norm).
    return ConvNormAct(self.features, 1, name="1" if self.pool else "0",
                       **_kernels(self))(x, train)


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  use_se: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  norm_impl: str = "auto"
  norm_groups: int = 1
  norm_row_weight: Any = None
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    kw = _kernels(self)
    y = ConvNormAct(self.planes, 3, 1e-3, blur=self.stride == 2,
                    name="conv1", **kw)(x, train)
    y = ConvNormAct(self.planes, 3, zero_norm=True, name="conv2",
                    **kw)(y, train)
    if self.use_se:
      y = SqueezeExcite(max(self.planes // 4, 64), self.dtype,
                        self.conv_impl, name="se")(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = Shortcut(self.planes, self.stride == 2, name="downsample",
                   **kw)(x, train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  use_se: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  norm_impl: str = "auto"
  norm_groups: int = 1
  norm_row_weight: Any = None
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    kw = _kernels(self)
    out = self.planes * self.expansion
    y = ConvNormAct(self.planes, 1, 1e-3, name="conv1", **kw)(x, train)
    y = ConvNormAct(self.planes, 3, 1e-3, blur=self.stride == 2,
                    name="conv2", **kw)(y, train)
    if self.use_se:
      # On the unexpanded width, between conv2 and conv3.
      y = SqueezeExcite(max(out // 8, 64), self.dtype, self.conv_impl,
                        name="se")(y)
    y = ConvNormAct(out, 1, zero_norm=True, name="conv3", **kw)(y, train)
    if self.stride != 1 or x.shape[-1] != out:
      x = Shortcut(out, self.stride == 2, name="downsample", **kw)(x, train)
    return nn.relu(x + y)


class TResNet(nn.Module):
  """Returns {"logits": [N, num_classes] f32, "features": [N, 2048] f32}.

  Image sides must be multiples of 4. ``num_classes=0`` gives an empty
  [N, 0] logits array (feature extraction without a head).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 11, 3)
  width: int = 64
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # see rebll_jax.models.conv
  norm_impl: str = "auto"  # see rebll_jax.models.norm
  norm_groups: int = 1  # train-mode BatchNorm groups (models.norm)
  norm_row_weight: Any = None  # [B] rows that count in them (models.norm)

  head_name = "head_fc"  # top-level params the converter leaves out

  @nn.compact
  def __call__(self, images, train: bool = False):
    kw = _kernels(self)
    x = space_to_depth(images.astype(self.dtype))
    x = ConvNormAct(self.width, 3, 1e-2, name="body_conv1", **kw)(x, train)
    kinds = (BasicBlock, BasicBlock, Bottleneck, Bottleneck)
    for stage, (block, num_blocks) in enumerate(zip(kinds, self.stage_sizes)):
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block(self.width * 2**stage, stride, use_se=stage < 3,
                  name=f"body_layer{stage + 1}_{i}", **kw)(x, train)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes == 0:
      return {"logits": jnp.zeros((x.shape[0], 0), jnp.float32),
              "features": features}
    head = nn.Dense(self.num_classes, dtype=jnp.float32, name="head_fc",
                    kernel_init=nn.initializers.normal(0.01))
    return {"logits": head(features), "features": features}


def tresnet_m(num_classes: int, dtype=jnp.float32) -> TResNet:
  return TResNet(num_classes=num_classes, dtype=dtype)
