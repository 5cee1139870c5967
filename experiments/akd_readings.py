r"""The defensible readings of AKD / OR, scored on validation only.

  python experiments/akd_readings.py --setting pretrained_b0c4 --seeds 0 \
      --jobs 2 --out workdirs/akd_readings

Each reading is ``rebll`` with a few ``--config.loss.*`` / ``relabel.*``
overrides (the table ``READINGS`` below) that set every knob the reading is
about (the decay readings set the OR thresholds too, and the OR band
readings the decay: the shipped settings differ in both), so that METHOD.md's
reading (``decay on |2q-1|``, single threshold) is one of them on every
setting. ``default`` is the setting as shipped, and so is the config of one
of the four decay / OR readings: readings that are one config on
``--setting`` (``method_table.expected_config``) run once, under the name
that is not ``default``, with a ``note:`` line on stderr and a note under
the table. Each is run on a validation split carved
out of train (``data.val_fraction=0.2``: the test split is never scored), in
its own workdir ``OUT/READING/SETTING/rebll/seedS``; ``lwf`` and
``krt_baseline`` run on the same split as the bars to clear. A run whose
results.json exists is reused, so an interrupted sweep resumes (through
``experiments/method_table.py``'s ``run_one``: a finished run whose config
differs from the reading's is refused, not reported). Ctrl-C or SIGTERM
stops the runs, keeping their checkpoints: exit 130 / 143.

Prints (and writes ``OUT/readings.md``) one markdown row per reading: its
overrides that change METHOD.md's reading (the base config), those that
hold a knob at METHOD.md's value (``decay on q``'s single threshold), avg
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
import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import method_table  # noqa: E402  pylint: disable=g-import-not-at-top
from method_table import child_runs  # noqa: E402  pylint: disable=g-import-not-at-top

# The 2 x 2 of AKD's distillation decay (METHOD.md's |2q - 1|, or the old
# score q) and OR's thresholds (METHOD.md's single 0.5, or the two-threshold
# band that leaves scores in (0.05, 0.5] unknown). Each reading of the four
# sets both knobs: the shipped settings differ in both (pretrained_*: q,
# single; from scratch: |2q - 1|, band), so a reading that set one would be
# another's config, or "default"'s, on some setting.
_DECAY_2Q_1 = ("loss.decay_on=confidence",)
_DECAY_Q = ("loss.decay_on=score",)
_SINGLE = ("relabel.tau_old_low=-1.0", "relabel.tau_cur_low=-1.0")
_BAND = ("relabel.tau_old_low=0.05", "relabel.tau_cur_low=0.05")

# name -> (method, overrides). "default" is the setting as shipped; the
# others set every knob they are about (the rest as shipped). The table's
# "overrides" column lists those that change METHOD.md's reading (the base
# config, rebll_jax/config_base.py), "held at METHOD.md's" those that hold a
# knob at it (``split_overrides``). Readings that are one config on the
# chosen setting (compared by method_table.expected_config) run once, under
# the first name that is not "default"; a note under the table names the
# others (``same_config``).
READINGS = {
    "default": ("rebll", ()),
    "cls BCE (g_pos 0)": ("rebll", ("loss.g_pos=0.0",)),
    "negatives up (g_pos 0, w_neg 2)": ("rebll", ("loss.g_pos=0.0",
                                                   "loss.w_neg=2.0")),
    "both (g_pos 1, w_neg 2)": ("rebll", ("loss.g_pos=1.0",
                                          "loss.w_neg=2.0")),
    "decay on |2q-1|": ("rebll", _DECAY_2Q_1 + _SINGLE),  # METHOD.md's
    "decay on q": ("rebll", _DECAY_Q + _SINGLE),
    "no adaptive normalisation": ("rebll", ("loss.adaptive=False",)),
    "no decay (beta 0)": ("rebll", ("loss.beta=0.0",)),
    "lambda_kd 0.3": ("rebll", ("loss.lambda_kd=0.3",)),
    "lambda_kd 3": ("rebll", ("loss.lambda_kd=3.0",)),
    "OR band 0.05-0.5": ("rebll", _DECAY_2Q_1 + _BAND),
    "decay on q + OR band": ("rebll", _DECAY_Q + _BAND),
    "bar: lwf": ("lwf", ()),
    "bar: krt_baseline": ("krt_baseline", ()),
}


@functools.lru_cache(maxsize=None)
def _run_config(setting, name) -> dict:
  """A reading's run config on ``setting`` (seed 0, validation split), as
  method_table builds and checks it; parsed once per reading (the table
  and the duplicate check both read it). Not to be modified."""
  method, overrides = READINGS[name]
  return method_table.expected_config(method_table.run_flags(
      setting, method, 0, list(overrides), True))


def reading_config(setting, name) -> dict:
  """The compared fields of a reading's run config on ``setting``."""
  from rebll_jax import run_identity  # pylint: disable=g-import-not-at-top
  return {k: v for k, v in run_identity.flatten(
      _run_config(setting, name)).items()
          if method_table._compared(k)}  # pylint: disable=protected-access


def split_overrides(setting, name) -> tuple[list[str], list[str]]:
  """(changed, held): a reading's overrides that change METHOD.md's reading
  of the knob (``config_base.base_config``'s value), and those that hold it
  there (e.g. ``decay on q``'s single threshold)."""
  from rebll_jax import config_base, run_identity  # pylint: disable=g-import-not-at-top
  _, overrides = READINGS[name]
  base = run_identity.flatten(json.loads(
      config_base.base_config().to_json_best_effort()))
  ours = run_identity.flatten(_run_config(setting, name))
  changed, held = [], []
  for override in overrides:
    key = override.partition("=")[0].strip()
    (held if key in base and base[key] == ours[key] else changed).append(
        override)
  return changed, held


def same_config(setting, names) -> dict[str, list[str]]:
  """{kept reading: the chosen readings that are its config on
  ``setting``}: a reading is kept unless an earlier one (in ``names``'
  order, "default" last) has its config. RuntimeError if the CLI refuses a
  reading's flags on ``setting``."""
  kept: dict[str, list[str]] = {}
  configs = {}
  for name in sorted(names, key=lambda n: n == "default"):  # stable
    config = reading_config(setting, name)
    twin = next((k for k, c in configs.items() if c == config), None)
    if twin is None:
      configs[name] = config
      kept[name] = []
    else:
      kept[twin].append(name)
  return kept


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
  try:
    kept = same_config(args.setting, [by_slug[slug] for slug in chosen])
  except RuntimeError as e:
    parser.error(f"{args.setting}: {e}")
  for name, twins in kept.items():
    for twin in twins:
      print(f"note: reading {twin!r} is the same config as {name!r} on "
            f"{args.setting}: run and reported once, as {name!r}",
            file=sys.stderr, flush=True)
  jobs = [(by_slug[slug], seed) for slug in chosen for seed in seeds
          if by_slug[slug] in kept]
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
           "| reading | overrides | held at METHOD.md's | seeds | "
           "val avg mAP | val last mAP | relabel FPR | relabel FNR | "
           "pos mean old | pos mean cur |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  notes = []
  for name in READINGS:
    got = rows.get(name)
    if not got:
      continue
    changed, held = (", ".join(f"`{o}`" for o in part) or "–"
                     for part in split_overrides(args.setting, name))
    notes += [f"{name}: the same config as {twin!r} on {args.setting} (run "
              "once)." for twin in kept[name]]
    calib = [s["calibration"] for s in got]
    cell_name = name.replace("|", r"\|")  # "decay on |2q-1|" in a table
    lines.append(
        f"| {cell_name} | {changed} | {held} | {len(got)} | "
        f"{cell([s['avg_map'] for s in got])} | "
        f"{cell([s['last_map'] for s in got])} | "
        f"{cell([s['relabel_fpr'] for s in got])} | "
        f"{cell([s['relabel_fnr'] for s in got])} | "
        f"{cell([c['pos mean old'] for c in calib])} | "
        f"{cell([c['pos mean cur'] for c in calib])} |")
  if notes:
    lines += [""] + notes
  text = "\n".join(lines)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "readings.md"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
