"""Is the PyTorch baseline an honest one? Times it against a textbook step.

  python experiments/torch_baseline/profile_step.py --model resnet50 \\
      --batch 16 --size 64 --steps 10 [--profile]

Runs, in one process and alternating step by step (so machine load hits all
alike), ``rebll_step.RebllStep`` in its variants (``channels_last`` or NCHW
``contiguous`` memory format, Adam ``fused`` or not) and ``PlainStep``: the
step a PyTorch user writes from the tutorials (NCHW float input, past-model
forward under ``no_grad``, current forward and backward, BCE-with-logits on
the labels filled in by the past model plus sigmoid-BCE distillation, default
Adam). The plain step does less (no asymmetric weighting, no masks), so the
baseline is honest if it is not slower than the plain one. One JSON line per
variant: median ms per step of wall time and of this process's CPU time
(the CPU figure is what a loaded, shared machine distorts least), and the
ratio to the plain step. ``--profile`` also prints ``torch.profiler``'s top
operators for the default variant.

On CPU it uses 2 threads unless ``--threads`` says otherwise and sets
``OMP_WAIT_POLICY=PASSIVE`` as the benchmark does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


class PlainStep:
  """The textbook PyTorch step (see the module docstring)."""

  def __init__(self, arch, num_classes, *, device="cpu", lr=1e-3,
               weight_decay=1e-4, tau_old=0.5, seed=0):
    import torch  # pylint: disable=g-import-not-at-top
    from experiments.torch_baseline import rebll_step  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    self.torch = torch
    self.model = rebll_step.MODELS[arch](num_classes=num_classes).to(
        device).train()
    self.old = rebll_step.MODELS[arch](num_classes=num_classes).to(
        device).eval()
    self.old.load_state_dict(self.model.state_dict())
    for p in self.old.parameters():
      p.requires_grad_(False)
    self.opt = torch.optim.Adam(self.model.parameters(), lr=lr,
                                weight_decay=weight_decay)
    self.tau_old = tau_old

  def __call__(self, batch):
    torch = self.torch
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    x = batch["images"].permute(0, 3, 1, 2).float().div(255).contiguous()
    with torch.no_grad():
      old = self.old(x)["logits"]
    q = torch.sigmoid(old)
    labels = torch.where(batch["known"], batch["labels"],
                         (q > self.tau_old).float())
    logits = self.model(x)["logits"]
    n = logits.shape[0]
    loss = (bce(logits, labels, reduction="sum")
            + bce(logits, q, reduction="sum")) / n
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return loss.detach()


def _median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet50")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--num_classes", type=int, default=80)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--profile", action="store_true")
  args = p.parse_args(argv)
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch  # pylint: disable=g-import-not-at-top
  from experiments import benchmark_step  # pylint: disable=g-import-not-at-top
  from experiments.torch_baseline import rebll_step  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(args.threads)
  host, masks = benchmark_step.make_inputs(args.batch, args.size,
                                           args.num_classes)
  batch = {k: torch.as_tensor(v).to(device) for k, v in host.items()}
  tmasks = {k: torch.as_tensor(v) for k, v in masks.items()}
  runs = {"plain": PlainStep(args.model, args.num_classes, device=device)}
  fused_options = (False, True) if rebll_step.has_fused_adam() else (False,)
  for fmt in ("channels_last", "contiguous"):
    for fused in fused_options:
      runs[f"rebll[{fmt},fused_adam={fused}]"] = rebll_step.RebllStep(
          args.model, args.num_classes, tmasks, device=device,
          memory_format=fmt, fused_adam=fused, total_steps=1000,
          warmup_frac=0.0)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def one(run):
    loss = float(run(batch))  # the loss fetch a trainer does at log steps
    sync()
    return loss

  for run in runs.values():
    for _ in range(args.warmup + 1):
      one(run)
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for i in range(args.steps):
    items = list(runs.items())
    for name, run in (items if i % 2 == 0 else items[::-1]):
      t, c = time.perf_counter(), time.process_time()
      one(run)
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
  plain_cpu = _median(cpu["plain"])
  lines = []
  for name in runs:
    lines.append({
        "variant": name, "model": args.model, "batch": args.batch,
        "size": args.size, "device": device,
        "threads": torch.get_num_threads(),
        "wall_ms": round(_median(wall[name]) * 1e3, 1),
        "cpu_ms": round(_median(cpu[name]) * 1e3, 1),
        "cpu_vs_plain": round(_median(cpu[name]) / plain_cpu, 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()]})
    print(json.dumps(lines[-1]), flush=True)
  if args.profile:
    from torch.profiler import profile, ProfilerActivity  # pylint: disable=g-import-not-at-top
    run = runs[next(k for k in runs if k.startswith("rebll"))]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
      for _ in range(3):
        one(run)
    print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                    row_limit=20))
  return lines


if __name__ == "__main__":
  main()
