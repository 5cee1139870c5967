"""One incremental RebLL train step in PyTorch: the baseline of the benchmark.

The same computation as ``rebll_jax.steps.make_train_step`` with
``method="rebll"`` and ``has_old=True`` (augmentation off on both sides):

1. images uint8 -> float in [0, 1];
2. past model forward (eval mode, no grad) -> old logits;
3. online relabeling of new rows x old classes: unknown entries take
   ``sigmoid(old) > tau_old``;
4. current model forward in train mode (batch statistics);
5. online relabeling of memory rows x current classes from the detached
   current probabilities, once past the warm-up fraction of the task;
6. AKD: asymmetric BCE (g_pos, g_neg, margin) on known x seen entries plus
   lambda * decayed distillation (exp(-beta |2q - 1|), renormalised to mean
   1 over the old-class entries) on the old classes;
7. backward, Adam with L2 decay on conv/linear weights (PyTorch Adam's
   ``weight_decay``), one-cycle learning rate.

``bfloat16`` runs under ``torch.autocast`` (float32 weights, bfloat16
compute), like ``model.dtype="bfloat16"`` in Flax. ``compile=True`` wraps the
two models with ``torch.compile``.

Written as a PyTorch user would write a fast step: no host syncs inside it
(every data-dependent choice is a ``torch.where``; the caller fetches the
loss), relabeling on whole tensors, ``channels_last`` weights and
activations by default (oneDNN's native layout on CPU, the tensor-core
layout on GPU; ``memory_format="contiguous"`` gives NCHW), and Adam's
single-kernel ``fused=True`` update where this PyTorch has it (CPU and
CUDA since 2.4). ``experiments/torch_baseline/profile_step.py`` times it
against a plain textbook step.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from experiments.torch_baseline import models as torch_models


def asymmetric_bce(logits, labels, mask, g_pos=1.0, g_neg=0.0, margin=0.0):
  """Per-example sum over masked classes; as rebll_jax.losses.asymmetric_bce."""
  z = logits.float()
  p = torch.sigmoid(z)
  log_p = F.logsigmoid(z)
  if margin > 0:
    log_1m = torch.clamp(torch.log(torch.sigmoid(-z) + margin), max=0.0)
  else:
    log_1m = F.logsigmoid(-z)
  p_m = torch.clamp(p - margin, min=0.0)
  focus_pos = torch.sigmoid(-z).detach() ** g_pos
  focus_neg = p_m.detach() ** g_neg
  terms = labels * focus_pos * log_p + (1 - labels) * focus_neg * log_1m
  return -(terms * mask).sum(-1)


def asymmetric_distillation(logits, old_logits, mask, temperature=1.0,
                            beta=1.0, adaptive=True):
  z = logits.float()
  q = torch.sigmoid(old_logits.float().detach() / temperature)
  a = torch.exp(-beta * torch.abs(2 * q - 1))
  if adaptive:
    # torch.where, not `if total > 0`: a Python branch on a tensor is a
    # device sync (.item()) every step.
    total = mask.sum()
    mean = (a * mask).sum() / torch.clamp(total, min=1e-12)
    a = torch.where(total > 0, a / torch.clamp(mean, min=1e-30), a)
  terms = a * (q * F.logsigmoid(z) + (1 - q) * F.logsigmoid(-z))
  return -(terms * mask).sum(-1)


def one_cycle(step, total, peak, warmup_frac=0.2):
  warm = max(warmup_frac * total, 1.0)
  start, end = peak / 25, peak / 25 / 1e4
  if step < warm:
    return peak + (start - peak) * 0.5 * (1 + math.cos(math.pi * step / warm))
  down = min(max((step - warm) / max(total - warm, 1.0), 0.0), 1.0)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * down))


class SmallResNet(torch.nn.Module):
  """PyTorch twin of rebll_jax.models.small_resnet (the benchmark's tiny
  model): 3x3 stem (stride 2), basic-block stages doubling the width."""

  def __init__(self, num_classes, width=16, stage_sizes=(1, 1, 1)):
    super().__init__()
    self.stem = torch.nn.Conv2d(3, width, 3, 2, 1, bias=False)
    self.bn = torch.nn.BatchNorm2d(width)
    blocks, cin = [], width
    for stage, n in enumerate(stage_sizes):
      for i in range(n):
        planes = width * 2**stage
        blocks.append(torch_models.BasicBlock(
            cin, planes, 2 if stage and not i else 1))
        cin = planes
    self.blocks = torch.nn.Sequential(*blocks)
    self.head = torch.nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.bn(self.stem(x))))
    features = x.mean((2, 3))
    return {"logits": self.head(features), "features": features}


def tiny_resnet(num_classes):
  """SmallResNet at width 4 with one stage: rehearsals and tests only."""
  return SmallResNet(num_classes, width=4, stage_sizes=(1,))


MODELS = {**torch_models.MODELS, "small_resnet": SmallResNet,
          "tiny_resnet": tiny_resnet}
MEMORY_FORMATS = {"channels_last": torch.channels_last,
                  "contiguous": torch.contiguous_format}


def has_fused_adam() -> bool:
  """Whether torch.optim.Adam takes fused=True here (CPU and CUDA, 2.4+)."""
  return "fused" in inspect.signature(torch.optim.Adam).parameters


class RebllStep:
  """Holds the current and past models and the optimizer; ``__call__(batch)``.

  ``batch``: ``images`` uint8 [B, H, W, 3] (NHWC, converted here as a
  PyTorch input pipeline would), ``labels`` float [B, C], ``known`` bool
  [B, C], ``is_memory`` bool [B]. ``masks``: bool [C] tensors ``current``,
  ``old``, ``seen``.
  """

  def __init__(self, arch, num_classes, masks, *, device="cpu",
               dtype="float32", compile=False, lr=1e-3, weight_decay=1e-4,
               total_steps=100, tau_old=0.5, tau_cur=0.5, warmup_frac=0.5,
               lambda_kd=1.0, seed=0, memory_format="channels_last",
               fused_adam=None):
    if memory_format not in MEMORY_FORMATS:
      raise ValueError(f"unknown memory_format {memory_format!r}; valid: "
                       f"{sorted(MEMORY_FORMATS)}")
    torch.manual_seed(seed)
    self.device = torch.device(device)
    self.memory_format = MEMORY_FORMATS[memory_format]
    self.model = MODELS[arch](num_classes=num_classes).to(
        self.device, memory_format=self.memory_format).train()
    self.old = MODELS[arch](num_classes=num_classes).to(
        self.device, memory_format=self.memory_format).eval()
    self.old.load_state_dict(self.model.state_dict())
    for p in self.old.parameters():
      p.requires_grad_(False)
    self.forward, self.old_forward = self.model, self.old
    if compile:
      self.forward = torch.compile(self.model)
      self.old_forward = torch.compile(self.old)
    decay = [p for p in self.model.parameters() if p.ndim > 1]
    no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
    if fused_adam is None:
      fused_adam = has_fused_adam()
    self.fused_adam = bool(fused_adam)
    self.opt = torch.optim.Adam([
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                **({"fused": True} if fused_adam else {}))
    self.masks = {k: v.to(self.device) for k, v in masks.items()}
    self.dtype = dtype
    self.lr, self.total = lr, total_steps
    self.tau_old, self.tau_cur = tau_old, tau_cur
    self.warmup_frac, self.lambda_kd = warmup_frac, lambda_kd
    self.step = 0

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16,
                          enabled=self.dtype == "bfloat16")

  def to_device(self, batch):
    return {k: torch.as_tensor(v).to(self.device) for k, v in batch.items()}

  def __call__(self, batch) -> torch.Tensor:
    images = batch["images"].permute(0, 3, 1, 2).float().div_(255.0)
    images = images.contiguous(memory_format=self.memory_format)
    is_mem = batch["is_memory"]
    labels, known = batch["labels"].clone(), batch["known"].clone()
    cur, old_m, seen = (self.masks["current"], self.masks["old"],
                        self.masks["seen"])
    with torch.no_grad(), self._autocast():
      old_logits = self.old_forward(images)["logits"].float()
    fill = (~is_mem)[:, None] & old_m[None] & ~known
    labels = torch.where(fill, (torch.sigmoid(old_logits) > self.tau_old
                                ).float(), labels)
    known = known | fill

    for g in self.opt.param_groups:
      g["lr"] = one_cycle(self.step, self.total, self.lr)
    with self._autocast():
      logits = self.forward(images)["logits"].float()
    if self.step >= self.warmup_frac * self.total:
      fill = is_mem[:, None] & cur[None] & ~known
      labels = torch.where(fill, (torch.sigmoid(logits.detach()) >
                                  self.tau_cur).float(), labels)
      known = known | fill
    mask = (known & seen[None]).float()
    loss = asymmetric_bce(logits, labels, mask).mean()
    kd_mask = old_m[None].float().expand_as(logits)
    loss = loss + self.lambda_kd * asymmetric_distillation(
        logits, old_logits, kd_mask).mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self.step += 1
    return loss.detach()
