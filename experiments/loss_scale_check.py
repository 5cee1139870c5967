r"""Does ``optim.loss_scale=torch_fp16``'s rule skip the steps torch skips?

  python experiments/loss_scale_check.py [--batch 64 --steps 120 \
      --growth_interval 3 --size 64 --classes 20 --seed 0]

Trains PyTorch's twin of the small ResNet (``experiments/torch_baseline``)
with the KRT baseline's summed ASL (gamma- 4, clip 0.05, focusing weights
without gradient) and Adam, under fp16 ``autocast`` on the CPU with a real
``torch.amp.GradScaler``: the baseline's recipe, on random images and
labels. Before each step, a float32 copy of the model takes the same
batch's gradient, named as Flax names it, and our rule itself
(``rebll_jax.optim.fp16_overflow``: a conv or dense layer's weight or bias
gradient times the scaler's current scale at or above 65,520, or any
non-finite gradient) predicts whether the scaler will skip the step; then
the scaler decides. A small
``--growth_interval`` keeps doubling the scale back up to the limit, so
most steps are close calls.

Prints one JSON line: steps, torch's skips, agreements, and the scaled
gradient / limit ratio of every disagreement (the rule's misses, where
torch skipped, and its false alarms).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

def asl_sum(logits, labels, gamma_neg=4.0, clip=0.05, eps=1e-8):
  """The baseline's ASL, summed over the batch and the classes."""
  import torch  # pylint: disable=g-import-not-at-top
  p = torch.sigmoid(logits)
  p_neg = (1 - p + clip).clamp(max=1)
  log_pos = labels * torch.log(p.clamp(min=eps))
  log_neg = (1 - labels) * torch.log(p_neg.clamp(min=eps))
  with torch.no_grad():  # disable_torch_grad_focal_loss=True
    p_true = p * labels + p_neg * (1 - labels)
    weight = torch.pow(1 - p_true, gamma_neg * (1 - labels))
  return -((log_pos + log_neg) * weight).sum()


def grads_as_flax_tree(model) -> dict:
  """The model's gradients named as Flax names parameters: a conv or
  linear layer's weight is its ``kernel`` (its bias ``bias``), a batch
  norm's weight its ``scale``; one dict per module."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  tree = {}
  for name, module in model.named_modules():
    own = dict(module.named_parameters(recurse=False))
    if not own:
      continue
    weight_name = ("kernel" if isinstance(module, (torch.nn.Conv2d,
                                                   torch.nn.Linear))
                   else "scale")
    tree[name or "root"] = {
        (weight_name if key == "weight" else key):
            np.asarray(param.grad.detach()) for key, param in own.items()}
  return tree


def run(batch, steps, growth_interval, size=64, classes=20, seed=0) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from experiments.torch_baseline.rebll_step import SmallResNet  # pylint: disable=g-import-not-at-top
  from rebll_jax import optim  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = SmallResNet(classes, width=16, stage_sizes=(1, 1, 1))
  opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
  scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
  skips = agree = 0
  missed, false_alarms = [], []
  for _ in range(steps):
    images = torch.rand(batch, 3, size, size)
    labels = (torch.rand(batch, classes) < 0.15).float()
    twin = copy.deepcopy(model)
    asl_sum(twin(images)["logits"], labels).backward()
    scale = scaler.get_scale()
    grads = grads_as_flax_tree(twin)
    predicted = bool(optim.fp16_overflow(grads, scale))
    ratio = max(float(np.abs(g).max()) for g in optim._fp16_computed(  # pylint: disable=protected-access
        grads)) * scale / optim.FP16_OVERFLOW
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
      logits = model(images)["logits"]
    scaler.scale(asl_sum(logits.float(), labels)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    skipped = all(torch.equal(a, p) for a, p in zip(before,
                                                   model.parameters()))
    skips += skipped
    agree += predicted == skipped
    if skipped and not predicted:
      missed.append(round(ratio, 3))
    elif predicted and not skipped:
      false_alarms.append(round(ratio, 3))
  return {"batch": batch, "steps": steps, "growth_interval": growth_interval,
          "torch_skipped": skips, "rule_agreed": agree,
          "missed_ratios": missed, "false_alarm_ratios": false_alarms}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--growth_interval", type=int, default=3,
                 help="GradScaler's (torch: 2000); small keeps the scale "
                      "at the limit")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--classes", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for flag in ("batch", "steps", "growth_interval", "size", "classes"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  if args.size % 8:
    p.error(f"--size must be a multiple of 8, got {args.size}")
  if not 0 <= args.seed <= 2**32 - 1:  # torch.manual_seed: OverflowError
    p.error(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
  print(json.dumps(run(args.batch, args.steps, args.growth_interval,
                       args.size, args.classes, args.seed)))


if __name__ == "__main__":
  main()
