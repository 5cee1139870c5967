"""ResNet-18/50/101 in torchvision's layout, weight-compatible with it and timm.

The stride of a bottleneck sits on its 3x3 conv ("v1.5"), every padding is
explicit and symmetric as in PyTorch (XLA's 'SAME' pads asymmetrically at
stride 2), and submodules are named after the PyTorch state-dict keys with
'.' written as '_' (``layer1_0/downsample_1`` is ``layer1.0.downsample.1``),
so that ``rebll_jax.models.pretrained`` maps names by rule, not by table.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rebll_jax.models.conv import Conv, resolve_impl
from rebll_jax.models.norm import norm_act
from rebll_jax.models.pool import max_pool

# name -> (block kind, blocks per stage)
SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# torchvision's conv init: He normal over fan-out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class _Layers:
  """Conv / norm factories bound to one module's dtype and train flag."""

  def __init__(self, dtype, train: bool, conv_impl: str = "auto",
               norm_impl: str = "auto", norm_groups: int = 1,
               norm_row_weight=None):
    self.dtype, self.train = dtype, train
    self.conv_impl, self.norm_impl = conv_impl, norm_impl
    self.norm_groups, self.norm_row_weight = norm_groups, norm_row_weight

  def conv(self, features, k, stride=1, name=None):
    return Conv(features, (k, k), (stride, stride), padding=_pad(k),
                use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                impl=self.conv_impl, name=name)

  def norm(self, name, zero=False, relu=False):
    # torch momentum 0.1 == Flax momentum 0.9; eps as in torch.
    return norm_act(self.norm_impl, self.train, self.dtype, name,
                    0.0 if relu else None, zero_scale=zero,
                    groups=self.norm_groups, row_weight=self.norm_row_weight)


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  zero_init_residual: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  norm_impl: str = "auto"
  norm_groups: int = 1
  norm_row_weight: Any = None
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    L = _Layers(self.dtype, train, self.conv_impl, self.norm_impl,
                self.norm_groups, self.norm_row_weight)
    y = L.conv(self.planes, 3, self.stride, "conv1")(x)
    y = L.norm("bn1", relu=True)(y)
    y = L.conv(self.planes, 3, 1, "conv2")(y)
    y = L.norm("bn2", zero=self.zero_init_residual)(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = L.conv(self.planes, 1, self.stride, "downsample_0")(x)
      x = L.norm("downsample_1")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  zero_init_residual: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  norm_impl: str = "auto"
  norm_groups: int = 1
  norm_row_weight: Any = None
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    L = _Layers(self.dtype, train, self.conv_impl, self.norm_impl,
                self.norm_groups, self.norm_row_weight)
    out = self.planes * self.expansion
    y = L.norm("bn1", relu=True)(L.conv(self.planes, 1, 1, "conv1")(x))
    y = L.conv(self.planes, 3, self.stride, "conv2")(y)
    y = L.norm("bn2", relu=True)(y)
    y = L.conv(out, 1, 1, "conv3")(y)
    y = L.norm("bn3", zero=self.zero_init_residual)(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = L.conv(out, 1, self.stride, "downsample_0")(x)
      x = L.norm("downsample_1")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Returns {"logits": [N, num_classes] f32, "features": [N, D] f32}.

  D is 512 (basic blocks) or 2048 (bottlenecks). ``num_classes=0`` gives
  an empty [N, 0] logits array (feature extraction without a head).
  Images are NHWC in whatever range the weights expect ([0, 1] here).
  """

  num_classes: int
  block: str = "bottleneck"
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  zero_init_residual: bool = True  # last norm of a block starts at 0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # see rebll_jax.models.conv
  norm_impl: str = "auto"  # see rebll_jax.models.norm
  norm_groups: int = 1  # train-mode BatchNorm groups (models.norm)
  norm_row_weight: Any = None  # [B] rows that count in them (models.norm)

  head_name = "fc"  # top-level params the converter leaves out

  @nn.compact
  def __call__(self, images, train: bool = False):
    L = _Layers(self.dtype, train, self.conv_impl, self.norm_impl,
                self.norm_groups, self.norm_row_weight)
    x = images.astype(self.dtype)
    x = L.norm("bn1", relu=True)(L.conv(64, 7, 2, "conv1")(x))
    # XLA's own gradient with XLA's convolutions; the CPU formulations take
    # the pool's gradient as tap slices too (rebll_jax.models.pool).
    pool_impl = "xla" if resolve_impl(self.conv_impl) == "xla" else "slices"
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), pool_impl)
    block = BasicBlock if self.block == "basic" else Bottleneck
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block(64 * 2**stage, stride, self.zero_init_residual, self.dtype,
                  self.conv_impl, self.norm_impl, self.norm_groups,
                  self.norm_row_weight, name=f"layer{stage + 1}_{i}")(x, train)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes == 0:
      return {"logits": jnp.zeros((x.shape[0], 0), jnp.float32),
              "features": features}
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(features)
    return {"logits": logits, "features": features}


def resnet(arch: str, num_classes: int, dtype=jnp.float32, **kw) -> ResNet:
  block, stages = SPECS[arch]
  return ResNet(num_classes=num_classes, block=block, stage_sizes=stages,
                dtype=dtype, **kw)
