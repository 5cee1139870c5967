"""PyTorch reference backbones: TResNet-M and torchvision-layout ResNets.

Written from the facts in shared/BACKBONES.md so that their state-dict keys
equal timm's (``tresnet_m``) and torchvision's (``resnet18/50/101``). They
serve as the reference in the Flax parity tests (random weights through the
converter) and as the PyTorch side of the speed comparison. ``forward``
takes NCHW float images and returns ``{"logits", "features"}`` like the Flax
modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------- ResNet ---

class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes, 1, stride, bias=False),
          nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    s = x if self.downsample is None else self.downsample(x)
    return F.relu(y + s)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    out = planes * 4
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    # The stride sits on the 3x3 conv (torchvision's "v1.5").
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    s = x if self.downsample is None else self.downsample(x)
    return F.relu(y + s)


class ResNet(nn.Module):
  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for stage, n in enumerate(layers):
      planes = 64 * 2**stage
      blocks = []
      for i in range(n):
        blocks.append(block(inplanes, planes, 2 if stage and not i else 1))
        inplanes = planes * block.expansion
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.num_features = inplanes
    self.fc = nn.Linear(inplanes, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    features = x.mean((2, 3))
    return {"logits": self.fc(features), "features": features}


def resnet18(num_classes=1000):
  return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes=1000):
  return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def resnet101(num_classes=1000):
  return ResNet(Bottleneck, (3, 4, 23, 3), num_classes)


# --------------------------------------------------------------- TResNet ---

class SpaceToDepth(nn.Module):
  def forward(self, x):
    n, c, h, w = x.shape
    x = x.view(n, c, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, 16 * c, h // 4, w // 4)  # channel (dy*4 + dx)*C + c


class BlurPool(nn.Module):
  """Reflect-pad 1, depthwise [1,2,1]x[1,2,1]/16 filter, stride 2."""

  def __init__(self, channels):
    super().__init__()
    f = torch.tensor([1., 2., 1.])
    f = (f[:, None] * f[None, :]) / 16
    # Not persistent: timm's state dicts hold no blur filters.
    self.register_buffer("filt", f[None, None].repeat(channels, 1, 1, 1),
                         persistent=False)

  def forward(self, x):
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, self.filt, stride=2, groups=x.shape[1])


class ConvNormAct(nn.Module):
  """Conv (stride 1, no bias), batch norm with fused leaky ReLU, blur."""

  def __init__(self, cin, cout, k, slope=None, blur=False):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, 1, k // 2, bias=False)
    self.bn = nn.BatchNorm2d(cout)
    self.slope = slope
    self.aa = BlurPool(cout) if blur else None

  def forward(self, x):
    x = self.bn(self.conv(x))
    if self.slope is not None:
      x = F.leaky_relu(x, self.slope)
    return x if self.aa is None else self.aa(x)


class SEModule(nn.Module):
  def __init__(self, channels, hidden):
    super().__init__()
    self.fc1 = nn.Conv2d(channels, hidden, 1)
    self.fc2 = nn.Conv2d(hidden, channels, 1)

  def forward(self, x):
    s = F.relu(self.fc1(x.mean((2, 3), keepdim=True)))
    return x * torch.sigmoid(self.fc2(s))


def _shortcut(cin, cout, stride):
  layers = []
  if stride == 2:
    layers.append(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))
  layers.append(ConvNormAct(cin, cout, 1))
  return nn.Sequential(*layers)


class TBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, use_se=True):
    super().__init__()
    self.conv1 = ConvNormAct(inplanes, planes, 3, 1e-3, blur=stride == 2)
    self.conv2 = ConvNormAct(planes, planes, 3)
    self.se = SEModule(planes, max(planes // 4, 64)) if use_se else None
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = _shortcut(inplanes, planes, stride)

  def forward(self, x):
    y = self.conv2(self.conv1(x))
    if self.se is not None:
      y = self.se(y)
    s = x if self.downsample is None else self.downsample(x)
    return F.relu(y + s)


class TBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, use_se=True):
    super().__init__()
    out = planes * 4
    self.conv1 = ConvNormAct(inplanes, planes, 1, 1e-3)
    self.conv2 = ConvNormAct(planes, planes, 3, 1e-3, blur=stride == 2)
    self.se = SEModule(planes, max(out // 8, 64)) if use_se else None
    self.conv3 = ConvNormAct(planes, out, 1)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = _shortcut(inplanes, out, stride)

  def forward(self, x):
    y = self.conv2(self.conv1(x))
    if self.se is not None:
      y = self.se(y)
    y = self.conv3(y)
    s = x if self.downsample is None else self.downsample(x)
    return F.relu(y + s)


class ClassifierHead(nn.Module):
  def __init__(self, cin, num_classes):
    super().__init__()
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, features):
    return self.fc(features)


class TResNet(nn.Module):
  def __init__(self, layers=(3, 4, 11, 3), num_classes=1000, width=64):
    super().__init__()
    body = [("s2d", SpaceToDepth()),
            ("conv1", ConvNormAct(48, width, 3, 1e-2))]
    inplanes = width
    kinds = (TBasicBlock, TBasicBlock, TBottleneck, TBottleneck)
    for stage, (block, n) in enumerate(zip(kinds, layers)):
      planes = width * 2**stage
      blocks = []
      for i in range(n):
        blocks.append(block(inplanes, planes, 2 if stage and not i else 1,
                            use_se=stage < 3))
        inplanes = planes * block.expansion
      body.append((f"layer{stage + 1}", nn.Sequential(*blocks)))
    self.body = nn.Sequential()
    for name, m in body:
      self.body.add_module(name, m)
    self.num_features = inplanes
    self.head = ClassifierHead(inplanes, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                nonlinearity="leaky_relu")
      elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
    # Residual branches start at zero, as in timm.
    for m in self.modules():
      if isinstance(m, TBasicBlock):
        nn.init.zeros_(m.conv2.bn.weight)
      elif isinstance(m, TBottleneck):
        nn.init.zeros_(m.conv3.bn.weight)

  def forward(self, x):
    features = self.body(x).mean((2, 3))
    return {"logits": self.head(features), "features": features}


def tresnet_m(num_classes=1000):
  return TResNet((3, 4, 11, 3), num_classes)


MODELS = {"resnet18": resnet18, "resnet50": resnet50,
          "resnet101": resnet101, "tresnet_m": tresnet_m}
