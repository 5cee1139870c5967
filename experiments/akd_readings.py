r"""The defensible readings of AKD / OR, scored on validation only.

  python experiments/akd_readings.py --setting pretrained_b0c4 --seeds 0 \
      --jobs 2 --out workdirs/akd_readings

Each reading is ``rebll`` with a few ``--config.loss.*`` / ``relabel.*``
overrides (the table ``READINGS`` below), run on a validation split carved
out of train (``data.val_fraction=0.2``: the test split is never scored), in
its own workdir ``OUT/READING/SETTING/rebll/seedS``; ``lwf`` and
``krt_baseline`` run on the same split as the bars to clear. A run whose
results.json exists is reused, so an interrupted sweep resumes (through
``experiments/method_table.py``'s ``run_one``: a finished run whose config
differs from the reading's is refused, not reported). Ctrl-C or SIGTERM
stops the runs, keeping their checkpoints: exit 130 / 143.

Prints (and writes ``OUT/readings.md``) one markdown row per reading: avg
and last validation mAP (mean ± std over seeds, the population std as in
method_table.py), the relabeled buffer
entries' FPR / FNR against the hidden ground truth after the last task, and
the mean validation score of positive entries of old and of current classes
(calibration). Pick a reading by its validation mAP; report the test numbers
of the pick only through ``experiments/method_table.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import method_table  # noqa: E402  pylint: disable=g-import-not-at-top
from method_table import child_runs  # noqa: E402  pylint: disable=g-import-not-at-top

# name -> (method, overrides); "default" is the setting as shipped.
READINGS = {
    "default": ("rebll", ()),
    "cls BCE (g_pos 0)": ("rebll", ("loss.g_pos=0.0",)),
    "negatives up (g_pos 0, w_neg 2)": ("rebll", ("loss.g_pos=0.0",
                                                   "loss.w_neg=2.0")),
    "both (g_pos 1, w_neg 2)": ("rebll", ("loss.w_neg=2.0",)),
    "decay on q": ("rebll", ("loss.decay_on=score",)),
    "no adaptive normalisation": ("rebll", ("loss.adaptive=False",)),
    "no decay (beta 0)": ("rebll", ("loss.beta=0.0",)),
    "lambda_kd 0.3": ("rebll", ("loss.lambda_kd=0.3",)),
    "lambda_kd 3": ("rebll", ("loss.lambda_kd=3.0",)),
    "OR band 0.05-0.5": ("rebll", ("relabel.tau_old_low=0.05",
                                   "relabel.tau_cur_low=0.05")),
    "decay on q + OR band": ("rebll", ("loss.decay_on=score",
                                       "relabel.tau_old_low=0.05",
                                       "relabel.tau_cur_low=0.05")),
    "bar: lwf": ("lwf", ()),
    "bar: krt_baseline": ("krt_baseline", ()),
}


def _slug(name: str) -> str:
  """"negatives up (g_pos 0, w_neg 2)" -> "negatives_up_g_pos_0_w_neg_2"."""
  return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def _workdir(args, name, seed):
  method = READINGS[name][0]
  return method_table._workdir(os.path.join(args.out, _slug(name)),  # pylint: disable=protected-access
                               args.setting, method, seed)


def _summary(args, name, seed):
  """A reading's run, run (or reused: its config checked) and summarised."""
  method, overrides = READINGS[name]
  workdir, seconds, _ = method_table.run_one(
      os.path.join(args.out, _slug(name)), args.setting, method, seed,
      list(overrides), val=True)
  return method_table.summarise(workdir, seconds)


def _run_jobs(args, jobs, rows):
  """Fills ``rows`` {reading: [summary per seed]} from ``jobs``."""
  with child_runs.pool(args.jobs) as pool:
    futures = {pool.submit(_summary, args, name, seed): (name, seed)
               for name, seed in jobs}
    for future in concurrent.futures.as_completed(futures):
      name, seed = futures[future]
      try:
        summary = future.result()
      except RuntimeError as e:  # a failed run, a damaged or foreign one
        sys.exit(f"error: {name} seed {seed}: {e}" + (
            "" if args.report_only else "\n(runs already started finish "
            "first; rerun the same command to resume)"))
      rows.setdefault(name, []).append(summary)
      print(f"{name} seed {seed}: val avg {summary['avg_map']:.2f} "
            f"last {summary['last_map']:.2f}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--setting", default="pretrained_b0c4")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--readings", default=",".join(map(_slug, READINGS)),
                      help="comma list of reading slugs (default: all)")
  parser.add_argument("--out", default="workdirs/akd_readings")
  parser.add_argument("--jobs", type=method_table.cli_checks.positive_int,
                      default=1)
  parser.add_argument("--report_only", action="store_true")
  args = parser.parse_args(argv)
  by_slug = {_slug(name): name for name in READINGS}
  chosen = args.readings.split(",")
  method_table.cli_checks.refuse_repeats(parser, "--readings", chosen)
  unknown = sorted(set(chosen) - set(by_slug))
  if unknown:
    parser.error(f"unknown readings {unknown}; valid: {sorted(by_slug)}")
  seeds = method_table.cli_checks.parse_seeds(parser, args.seeds)
  method_table.check_settings(parser, [args.setting])
  jobs = [(by_slug[slug], seed) for slug in chosen for seed in seeds]
  if args.report_only:
    jobs = [(name, seed) for name, seed in jobs
            if os.path.exists(os.path.join(_workdir(args, name, seed),
                                           "results.json"))]
    if not jobs:
      sys.exit(f"error: no finished run under {args.out}; nothing to report")
  rows: dict[str, list] = {}
  child_runs.call(lambda: _run_jobs(args, jobs, rows))
  cell = method_table._cell  # pylint: disable=protected-access
  lines = [f"**Readings on validation, {args.setting}** (rebll unless "
           f"named; {method_table.std_note(method_table.STD_DDOF)})", "",
           "| reading | overrides | seeds | val avg mAP | val last mAP | "
           "relabel FPR | relabel FNR | pos mean old | pos mean cur |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name in READINGS:
    got = rows.get(name)
    if not got:
      continue
    overrides = ", ".join(f"`{o}`" for o in READINGS[name][1]) or "–"
    calib = [s["calibration"] for s in got]
    lines.append(
        f"| {name} | {overrides} | {len(got)} | "
        f"{cell([s['avg_map'] for s in got])} | "
        f"{cell([s['last_map'] for s in got])} | "
        f"{cell([s['relabel_fpr'] for s in got])} | "
        f"{cell([s['relabel_fnr'] for s in got])} | "
        f"{cell([c['pos mean old'] for c in calib])} | "
        f"{cell([c['pos mean cur'] for c in calib])} |")
  text = "\n".join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "readings.md"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
