r"""Every method on the synthetic benchmark, several seeds: a markdown table.

  python experiments/method_table.py --settings b0c4,b10c2 --seeds 0,1,2 \
      --out workdirs/method_table

Each run is ``python -m rebll_jax.main --config=configs/synthetic.py:SETTING``
with ``--config.method=M --config.seed=S`` (plus any ``--set key=value``
overrides), in its own workdir ``OUT/SETTING/M/seedS``. A run whose
results.json exists is not run again, so an interrupted table resumes.
``joint`` (the upper bound) does not depend on the setting and runs once per
seed. ``--val`` evaluates on a validation split carved out of train
(``data.val_fraction``) instead of the test split: use it to choose
hyperparameters, never the test numbers.

Columns: average and last mAP, CF1 (mean of per-class F1) and OF1 at 0.8,
the test false-positive rate at 0.8, the FPR and FNR of the relabeled buffer
entries against the hidden ground truth (entries left unknown by a
two-threshold band are not relabeled and do not count), and the training
time of one run; mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ft", "lwf", "er", "asl_pl", "rebll_akd", "rebll_or", "rebll",
           "joint")


def _workdir(out, setting, method, seed):
  setting = "joint" if method == "joint" else setting
  return os.path.join(out, setting, method, f"seed{seed}")


def run_one(out, setting, method, seed, overrides, val):
  workdir = _workdir(out, setting, method, seed)
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    return workdir, 0.0, "cached"
  config = f"configs/synthetic.py:{'joint' if method == 'joint' else setting}"
  cmd = [sys.executable, "-m", "rebll_jax.main", f"--config={config}",
         f"--workdir={workdir}", f"--config.method={method}",
         f"--config.seed={seed}", "--config.train.progress=False"]
  if val:
    cmd.append("--config.data.val_fraction=0.2")
  cmd += [f"--config.{o}" for o in overrides]
  started = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  return workdir, time.time() - started, "ran"


def _buffer_rate(task, wrong, right):
  """100 * wrong / (wrong + right) summed over the buffer's relabeled
  entries after a task (FPR: "fp", "tn"; FNR: "fn", "tp"), or None."""
  blocks = (task.get("labels_buffer") or {}).values()
  bad = sum(b.get(wrong, 0) for b in blocks)
  total = bad + sum(b.get(right, 0) for b in blocks)
  return 100 * bad / total if total else None


def summarise(workdir, seconds):
  r = json.load(open(os.path.join(workdir, "results.json")))
  last = r["tasks"][-1]
  return {"avg_map": r["avg_map"], "last_map": r["last_map"],
          "cf1": r["cf1"], "of1": r["of1"],
          "test_fpr": last.get("fpr_at_threshold", float("nan")),
          "relabel_fpr": _buffer_rate(last, "fp", "tn"),
          "relabel_fnr": _buffer_rate(last, "fn", "tp"),
          "seconds": sum(t["train_seconds"] for t in r["tasks"]),
          "wall": seconds}


def _cell(values, digits=1):
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(rows: dict, settings, methods) -> str:
  lines = []
  for setting in settings:
    lines += [f"\n**Synthetic {setting.upper()}**\n",
              "| method | seeds | avg mAP | last mAP | CF1 | OF1 | "
              "test FPR@0.8 | relabel FPR | relabel FNR | train s/run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
      runs = rows.get(("joint" if method == "joint" else setting, method))
      if not runs:
        continue
      col = lambda k: [r[k] for r in runs]  # noqa: E731
      lines.append(
          f"| {method} | {len(runs)} | {_cell(col('avg_map'))} | "
          f"{_cell(col('last_map'))} "
          f"| {_cell(col('cf1'))} | {_cell(col('of1'))} | "
          f"{_cell(col('test_fpr'))} | {_cell(col('relabel_fpr'))} | "
          f"{_cell(col('relabel_fnr'))} | {_cell(col('seconds'), 0)} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", default="b0c4,b10c2")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--out", default="workdirs/method_table")
  parser.add_argument("--set", action="append", default=[],
                      metavar="KEY=VALUE",
                      help="config override for every run, e.g. "
                      "train.epochs_later=4 (repeatable)")
  parser.add_argument("--val", action="store_true",
                      help="score on a validation split carved from train")
  parser.add_argument("--report_only", action="store_true",
                      help="tabulate the runs already in --out, run nothing")
  parser.add_argument("--jobs", type=int, default=1,
                      help="runs at once (each uses all cores)")
  args = parser.parse_args(argv)
  settings = args.settings.split(",")
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; valid: {list(METHODS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  jobs = []
  for setting in settings:
    for method in methods:
      if method == "joint" and setting != settings[0]:
        continue
      for seed in seeds:
        jobs.append((setting, method, seed))
  rows = {}
  if args.report_only:
    jobs = [j for j in jobs if os.path.exists(
        os.path.join(_workdir(args.out, *j), "results.json"))]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(run_one, args.out, s, m, seed, args.set, args.val):
               (s, m, seed) for s, m, seed in jobs}
    for i, future in enumerate(concurrent.futures.as_completed(futures)):
      setting, method, seed = futures[future]
      workdir, seconds, how = future.result()
      summary = summarise(workdir, seconds)
      key = ("joint" if method == "joint" else setting, method)
      rows.setdefault(key, []).append(summary)
      print(f"[{i + 1}/{len(jobs)}] {setting} {method} seed {seed} ({how}): "
            f"avg {summary['avg_map']:.2f} last {summary['last_map']:.2f}",
            flush=True)
  text = table(rows, settings, methods)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
