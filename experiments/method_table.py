r"""Every method on the synthetic benchmark, several seeds: a markdown table.

  python experiments/method_table.py --settings b0c4,b10c2 --seeds 0,1,2 \
      --out workdirs/method_table

Each run is ``python -m rebll_jax.main --config=configs/synthetic.py:SETTING``
with ``--config.method=M --config.seed=S`` (plus any ``--set key=value``
overrides; not ``method`` or ``seed``, the table's own axes), in its own
workdir ``OUT/SETTING/M/seedS``. A run whose results.json exists is not run
again, so an interrupted table resumes; if that run's config (results.json's
``config``, every field) differs from the config this table builds for the
row, as ``python -m rebll_jax.main`` would from the same flags, the table
stops and says so rather than report it as its own. Only the fields that
may change on resume without changing a run's numbers are not compared
(``rebll_jax.run_identity.MAY_CHANGE_ON_RESUME`` less ``RESULTS_DEPEND_ON``:
devices, logging, checkpoint cadence, paths). Ctrl-C or SIGTERM stops the
runs started (their checkpoints are kept), then the table: one line, exit
130 / 143; the same command resumes (experiments/child_runs.py).
``joint`` (the upper bound) does not depend on the setting and runs once per
seed, regime and recipe (``joint`` from scratch; ``pretrained_joint`` for the
``pretrained_*`` settings, which fine-tune the cached upstream backbone;
``pretrained_joint_field`` for ``pretrained_*_field``). configs/synthetic.py
has no ``joint_field``: the joint row of a from-scratch ``*_field`` table is
the plain recipe's ``joint`` run, named ``joint (plain recipe)`` with a note
under the table. ``--val`` evaluates on a validation split carved out of train
(``data.val_fraction``) instead of the test split: use it to choose
hyperparameters, never the test numbers.

Columns: average and last mAP, CF1 (mean of per-class F1) and OF1 and the
test false-positive rate at the runs' ``eval.threshold`` (0.8 unless set;
the header and a note under each table give it, from the runs' config, or
say that the rows differ), the FPR and FNR of the relabeled buffer
entries against the hidden ground truth (entries left unknown by a
two-threshold band are not relabeled and do not count), and the training
time of one run; mean ± std over seeds, the population std (ddof=0,
``STD_DDOF``; the table's footnote says so).

The runs share JAX's persistent compilation cache (``--compile_cache``,
default ``OUT/xla_cache``): after the first run of a setting, a run loads
its programs instead of compiling them (same executables, same numbers).

A second table (``calibration.md``) gives the calibration facts of the test
scores after the last task (``metrics.calibration``): mean score of positive
and of negative entries on old and on current classes, the share of
positives below 0.5 and of negatives at or above 0.5, the expected
calibration error (10 equal-width bins) and the bias (mean score - positive
rate) over all seen classes; all in percent.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import child_runs, cli_checks  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from rebll_jax import run_identity  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from rebll_jax.errors import UserError  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

METHODS = ("ft", "ft_masked", "lwf", "er", "asl_pl", "krt_baseline", "rebll_akd",
           "rebll_or", "rebll", "joint")


_FIELD = "_field"


@functools.lru_cache(maxsize=None)
def _setting_exists(setting) -> bool:
  """Whether configs/synthetic.py accepts ``setting``."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  try:
    synthetic.get_config(setting)
  except ValueError:
    return False
  return True


def _joint_setting(setting):
  """The upper bound's setting for ``setting``: its regime (``joint`` from
  scratch, ``pretrained_joint``) and, for a ``*_field`` setting, its recipe
  (``pretrained_joint_field``) where configs/synthetic.py has one. It has
  no ``joint_field``: a from-scratch ``*_field`` table's joint row is the
  plain recipe's run (``joint_is_plain``), and the table says so."""
  regime = "pretrained_joint" if setting.startswith("pretrained_") else "joint"
  if setting.endswith(_FIELD) and _setting_exists(regime + _FIELD):
    return regime + _FIELD
  return regime


def joint_is_plain(setting) -> bool:
  """Whether ``setting``'s joint row runs another recipe than ``setting``
  (a ``*_field`` setting whose regime has no ``joint_field`` setting)."""
  return setting.endswith(_FIELD) and not _joint_setting(setting).endswith(
      _FIELD)


def _row_setting(setting, method):
  """The setting a run of ``method`` is filed under (joint: its regime)."""
  return _joint_setting(setting) if method == "joint" else setting


def _workdir(out, setting, method, seed):
  return os.path.join(out, _row_setting(setting, method), method,
                      f"seed{seed}")


_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def child_environment(cache_dir: str) -> dict:
  """The runs' environment: JAX's persistent compilation cache in
  ``cache_dir`` ("" or "off": none), unless the caller's environment
  already names one. Runs of a table compile the same train step,
  prediction and init programs again and again; a cache hit is the same
  executable (XLA:CPU also checks the host's CPU features on load), so the
  results do not change, only the seconds (about 10 s of a run)."""
  env = dict(os.environ)
  if cache_dir not in ("", "off") and not env.get(_CACHE_ENV):
    env[_CACHE_ENV] = os.path.abspath(cache_dir)
  return env


# The table's own axes: a --set of one would make every row the same run.
TABLE_AXES = ("method", "seed")
# Fields on run_identity.MAY_CHANGE_ON_RESUME that a finished run's numbers
# depend on: a resume may extend a run with them (more tasks, other epochs
# or rate later), but a run made with other values is not this table's run.
# Fault injection and dry runs are compared too. The rest of that list
# (devices, threads, logging, checkpoint cadence, paths, kernel choices)
# changes how a run is executed, not its results.
RESULTS_DEPEND_ON = ("train.epochs_later", "optim.lr_later",
                     "protocol.num_tasks", "debug.", "dry_run")
_CONFIG_FILE = os.path.join(ROOT, "configs", "synthetic.py")


def _compared(field: str) -> bool:
  """Whether a finished run's ``field`` must equal the table's value."""
  return (run_identity.matches(field, RESULTS_DEPEND_ON)
          or not run_identity.may_change(field))


def run_flags(setting, method, seed, overrides, val) -> list[str]:
  """The ``rebll_jax.main`` flags of one row's run, ``--workdir`` aside."""
  flags = [f"--config={_CONFIG_FILE}:{_row_setting(setting, method)}",
           f"--config.method={method}", f"--config.seed={seed}",
           "--config.train.progress=False"]
  if val:
    flags.append("--config.data.val_fraction=0.2")
  return flags + [f"--config.{o}" for o in overrides]


_BUILD_LOCK = threading.Lock()  # absl/ml_collections parsing: one at a time


def expected_config(flags) -> dict:
  """The config (as results.json stores it) of a run with ``flags``,
  parsed and checked as the CLI parses and checks them; RuntimeError with
  the CLI's line if it refuses them."""
  from rebll_jax import config_checks  # pylint: disable=g-import-not-at-top
  from rebll_jax import main as cli  # pylint: disable=g-import-not-at-top
  with _BUILD_LOCK:
    try:
      config = cli.build_config(flags)
      config_checks.check_values(config)
    except UserError as e:
      raise RuntimeError(f"bad run flags: {e}") from None
  return json.loads(config.to_json_best_effort())


def check_run_flags(parser, jobs, overrides, val):
  """parser.error, before any run starts, for a --set the CLI refuses in
  some row (else it would be found only when that row's run failed)."""
  rows = {}
  for setting, method, seed in jobs:  # one check per row: seeds are alike
    rows.setdefault((_row_setting(setting, method), method),
                    (setting, method, seed))
  for setting, method, seed in rows.values():
    try:
      expected_config(run_flags(setting, method, seed, overrides, val))
    except RuntimeError as e:
      parser.error(f"{setting} {method}: {e}")


def _started_config(workdir: str) -> dict | None:
  """The config.json of a run started in ``workdir`` (None if there is
  none); RuntimeError if it cannot be read."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise RuntimeError(f"{path} cannot be read ({' '.join(str(e).split())})"
                       "; delete that workdir to run it again") from None


def stale_tasks(tasks, config: dict) -> list[str]:
  """The task rows of a finished run that trained with other epochs or
  another peak rate than ``config`` (``expected_config``'s) gives them (a
  run extended over processes with other train.epochs_later /
  optim.lr_later; its config is the last process's). Rows from before the
  record are not judged."""
  stale = []
  for row in tasks:
    if not isinstance(row, dict) or "epochs" not in row:
      continue
    first = row.get("task") == 1
    wanted = (config["train"]["epochs_first" if first else "epochs_later"],
              config["optim"]["lr_first" if first else "lr_later"])
    have = (row["epochs"], row.get("lr_peak"))
    if have != wanted:
      stale.append(f"task {row.get('task')} trained with epochs {have[0]}, "
                   f"lr_peak {have[1]}; this table asks for {wanted[0]}, "
                   f"{wanted[1]}")
  return stale


def stale_fields(stored: dict, config: dict,
                 what: str = "results.json") -> list[str]:
  """The config fields in which a finished run (``stored``: its
  results.json's ``config``) differs from ``config`` (``expected_config``'s
  for the row's flags): a rerun of
  the table with other settings must not report it as its own. A field
  the run predates counts with ``run_identity.VALUE_BEFORE_THE_FIELD``."""
  if not isinstance(stored, dict) or not stored:
    return [f"{what} holds no config"]
  wanted = {k: v for k, v in run_identity.flatten(config).items()
            if _compared(k)}
  have = {**{k: v for k, v in run_identity.VALUE_BEFORE_THE_FIELD.items()
             if k in wanted},
          **{k: v for k, v in run_identity.flatten(stored).items()
             if _compared(k)}}
  differ, missing = [], []  # values that differ first: the telling ones
  for field in sorted(set(wanted) | set(have)):
    if field not in have:
      missing.append(f"{field}: the run has no such field, this table asks "
                     f"for {wanted[field]!r}")
    elif field not in wanted:
      missing.append(f"{field}: the run has {have[field]!r}, this table's "
                     "config has no such field")
    elif have[field] != wanted[field]:
      differ.append(f"{field}: the run has {have[field]!r}, this table asks "
                    f"for {wanted[field]!r}")
  return differ + missing


def run_one(out, setting, method, seed, overrides, val, env=None):
  workdir = _workdir(out, setting, method, seed)
  results = os.path.join(workdir, "results.json")
  flags = run_flags(setting, method, seed, overrides, val)
  if os.path.exists(results):
    summarise(workdir, 0.0)  # a damaged file is said so first
    finished = _read_results(results)
    expected = expected_config(flags)
    stale = (stale_fields(finished.get("config"), expected)
             + stale_tasks(finished.get("tasks", []), expected))
    if stale:
      raise RuntimeError(
          f"{workdir} holds a finished run made with other settings ("
          f"{run_identity.listing(stale)}); use another --out, or delete "
          "that workdir to run it again")
    return workdir, 0.0, "cached"
  started_config = _started_config(workdir)
  if started_config is not None:
    # An unfinished run (stopped, killed): the child would resume it, and a
    # resume may change epochs_later / lr_later / num_tasks between tasks,
    # so its first tasks would be another setting's.
    stale = stale_fields(started_config, expected_config(flags),
                         what="config.json")
    if stale:
      raise RuntimeError(
          f"{workdir} holds a run started with other settings ("
          f"{run_identity.listing(stale)}); use another --out, or delete "
          "that workdir to run it again")
  cmd = [sys.executable, "-m", "rebll_jax.main", f"--workdir={workdir}",
         *flags]
  started = time.time()
  proc = child_runs.run(cmd, cwd=ROOT, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  return workdir, time.time() - started, "ran"


def check_settings(parser, settings):
  """parser.error for a setting configs/synthetic.py does not know."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  for setting in settings:
    try:
      synthetic.get_config(setting)
    except ValueError as e:
      parser.error(str(e))


def _buffer_rate(task, wrong, right):
  """100 * wrong / (wrong + right) summed over the buffer's relabeled
  entries after a task (FPR: "fp", "tn"; FNR: "fn", "tp"), or None."""
  blocks = (task.get("labels_buffer") or {}).values()
  bad = sum(b.get(wrong, 0) for b in blocks)
  total = bad + sum(b.get(right, 0) for b in blocks)
  return 100 * bad / total if total else None


CALIBRATION_COLUMNS = (  # (header, group, key)
    ("pos mean old", "old", "pos_mean"), ("pos mean cur", "current", "pos_mean"),
    ("neg mean old", "old", "neg_mean"), ("neg mean cur", "current", "neg_mean"),
    ("pos<0.5 old", "old", "frac_pos_below"),
    ("pos<0.5 cur", "current", "frac_pos_below"),
    ("neg≥0.5 old", "old", "frac_neg_above"),
    ("neg≥0.5 cur", "current", "frac_neg_above"),
    ("ECE seen", "seen", "ece"), ("bias seen", "seen", "bias"))


def _calibration(task):
  """Percent values of CALIBRATION_COLUMNS after ``task`` (None: absent)."""
  calib = task.get("calibration") or {}
  values = {}
  for header, group, key in CALIBRATION_COLUMNS:
    value = (calib.get(group) or {}).get(key)
    values[header] = None if value is None else 100 * value
  return values


def _read_results(path) -> dict:
  """A finished run's results.json; RuntimeError naming it if unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      r = json.load(f)
  except (OSError, ValueError) as e:
    raise RuntimeError(f"{path} is unreadable ({' '.join(str(e).split())}); "
                       "delete that workdir to run it again") from None
  if not isinstance(r, dict):
    raise RuntimeError(f"{path} holds a {type(r).__name__}, not a run's "
                       "results; delete that workdir to run it again")
  return r


def _run_threshold(results: dict):
  """The eval.threshold of a finished run's CF1 / OF1 / test FPR (its
  results.json's config), None if it does not say."""
  config = results.get("config")
  evaluation = config.get("eval") if isinstance(config, dict) else None
  value = (evaluation.get("threshold") if isinstance(evaluation, dict)
           else None)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return value


def summarise(workdir, seconds):
  path = os.path.join(workdir, "results.json")
  r = _read_results(path)
  try:
    last = r["tasks"][-1]
    return {"calibration": _calibration(last), "avg_map": r["avg_map"],
            "threshold": _run_threshold(r),
            "last_map": r["last_map"], "cf1": r["cf1"], "of1": r["of1"],
            "test_fpr": last.get("fpr_at_threshold", float("nan")),
            "relabel_fpr": _buffer_rate(last, "fp", "tn"),
            "relabel_fnr": _buffer_rate(last, "fn", "tp"),
            "seconds": sum(t["train_seconds"] for t in r["tasks"]),
            "wall": seconds}
  except (KeyError, IndexError, TypeError, AttributeError) as e:
    what = f"no {e}" if isinstance(e, KeyError) else "no task"
    raise RuntimeError(f"{path} is not a finished run's results ({what}); "
                       "delete that workdir to run it again") from None


# The std of "mean ± std" over seeds: the population std (numpy's default),
# as the README's tables were computed. field_rows.py uses the sample std
# (ddof=1); each table's footnote says which (std_note).
STD_DDOF = 0


def std_note(ddof: int) -> str:
  """The footnote that says which std a table's "mean ± std" is."""
  kind = {0: "population", 1: "sample"}[ddof]
  return f"mean ± std over seeds; std: {kind} (ddof={ddof})"


def _cell(values, digits=1, ddof=STD_DDOF):
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return (f"{np.mean(values):.{digits}f} ± "
          f"{np.std(values, ddof=ddof):.{digits}f}")


def _method_cell(setting, method) -> str:
  """A row's name: ``joint`` of a ``*_field`` table that has no joint run
  with the field recipe says it is the plain recipe's."""
  if method == "joint" and joint_is_plain(setting):
    return "joint (plain recipe)"
  return method


def _plain_joint_note(setting, present) -> list[str]:
  if "joint" not in present or not joint_is_plain(setting):
    return []
  return [f"joint (plain recipe): configs/synthetic.py has no joint_field "
          f"setting, so this upper bound is the `{_joint_setting(setting)}` "
          "run, trained with the plain recipe (not the field recipe of the "
          "other rows); the same run as the joint row of the plain table."]


def _threshold_text(value) -> str:
  return "?" if value is None else f"{value:g}"


def _thresholds(rows, setting, methods):
  """(header suffix, note lines): the eval.threshold at which CF1, OF1 and
  the test FPR of ``setting``'s rows were computed (each run's config)."""
  found = {}  # method -> the distinct thresholds of its runs
  for method in methods:
    for run in rows.get((_row_setting(setting, method), method)) or ():
      found.setdefault(method, set()).add(run.get("threshold"))
  values = set().union(*found.values()) if found else set()
  if len(values) == 1 and None not in values:
    value = _threshold_text(next(iter(values)))
    return f"@{value}", [f"CF1, OF1 and test FPR at eval.threshold {value} "
                         "(the runs' config)."]
  if not values:
    return "", []
  listing = "; ".join(
      f"{m} " + ", ".join(sorted(map(_threshold_text, v),
                                 key=lambda t: (t == "?", t)))
      for m, v in found.items())
  return "@eval.threshold", [
      "The rows' runs differ in eval.threshold (? where results.json has "
      f"none); CF1, OF1 and test FPR are each run's own: {listing}."]


def table(rows: dict, settings, methods) -> str:
  lines = []
  for setting in settings:
    at, notes = _thresholds(rows, setting, methods)
    lines += [f"\n**Synthetic {setting.upper()}**\n",
              "| method | seeds | avg mAP | last mAP | CF1 | OF1 | "
              f"test FPR{at} | relabel FPR | relabel FNR | train s/run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    present = []
    for method in methods:
      runs = rows.get((_row_setting(setting, method), method))
      if not runs:
        continue
      present.append(method)
      col = lambda k: [r[k] for r in runs]  # noqa: E731
      lines.append(
          f"| {_method_cell(setting, method)} | {len(runs)} | "
          f"{_cell(col('avg_map'))} | "
          f"{_cell(col('last_map'))} "
          f"| {_cell(col('cf1'))} | {_cell(col('of1'))} | "
          f"{_cell(col('test_fpr'))} | {_cell(col('relabel_fpr'))} | "
          f"{_cell(col('relabel_fnr'))} | {_cell(col('seconds'), 0)} |")
    extra = notes + _plain_joint_note(setting, present)
    if extra:
      lines += [""] + extra
  lines += ["", std_note(STD_DDOF)]
  return "\n".join(lines)


def calibration_table(rows: dict, settings, methods) -> str:
  headers = [h for h, _, _ in CALIBRATION_COLUMNS]
  lines = []
  for setting in settings:
    lines += [f"\n**Calibration after the last task, synthetic "
              f"{setting.upper()}** (percent)\n",
              "| method | seeds | " + " | ".join(headers) + " |",
              "|---|---|" + "---|" * len(headers)]
    present = []
    for method in methods:
      runs = rows.get((_row_setting(setting, method), method))
      if not runs:
        continue
      present.append(method)
      cells = [_cell([r["calibration"][h] for r in runs]) for h in headers]
      lines.append(f"| {_method_cell(setting, method)} | {len(runs)} | "
                   + " | ".join(cells) + " |")
    extra = _plain_joint_note(setting, present)
    if extra:
      lines += [""] + extra
  lines += ["", std_note(STD_DDOF)]
  return "\n".join(lines)


def _run_jobs(args, jobs, env, rows):
  """Runs (or reuses) ``jobs``, filling ``rows`` with their summaries."""
  with child_runs.pool(args.jobs) as pool:
    futures = {pool.submit(run_one, args.out, s, m, seed, args.set, args.val,
                           env):
               (s, m, seed) for s, m, seed in jobs}
    for i, future in enumerate(concurrent.futures.as_completed(futures)):
      setting, method, seed = futures[future]
      try:
        workdir, seconds, how = future.result()
        summary = summarise(workdir, seconds)
      except RuntimeError as e:
        # Fail fast: the runs not started yet are dropped (a rerun resumes).
        sys.exit(f"error: {setting} {method} seed {seed}: {e}\n"
                 "(runs already started finish first; rerun the same "
                 "command to resume)")
      key = (_row_setting(setting, method), method)
      rows.setdefault(key, []).append(summary)
      print(f"[{i + 1}/{len(jobs)}] {setting} {method} seed {seed} ({how}): "
            f"avg {summary['avg_map']:.2f} last {summary['last_map']:.2f}",
            flush=True)


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
  parser.add_argument("--jobs", type=cli_checks.positive_int, default=1,
                      help="runs at once (each uses all cores)")
  parser.add_argument("--compile_cache", default=None, metavar="DIR",
                      help="JAX persistent compilation cache shared by the "
                      "runs (default OUT/xla_cache; 'off': none; a "
                      f"{_CACHE_ENV} already set wins)")
  args = parser.parse_args(argv)
  settings = args.settings.split(",")
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; valid: {list(METHODS)}")
  cli_checks.refuse_repeats(parser, "--methods", methods)
  cli_checks.refuse_repeats(parser, "--settings", settings)
  seeds = cli_checks.parse_seeds(parser, args.seeds)
  check_settings(parser, settings)
  for override in args.set:
    key = override.partition("=")[0].strip()
    if not key or "=" not in override:
      parser.error(f"--set {override!r}: expected KEY=VALUE, e.g. "
                   "train.epochs_later=4")
    if key in TABLE_AXES:
      parser.error(f"--set {override!r}: {key} is an axis of the table; "
                   f"use --{key}s")
  jobs = []
  for setting in settings:
    for method in methods:
      for seed in seeds:
        job = (setting, method, seed)
        if not any(_workdir("", *j) == _workdir("", *job) for j in jobs):
          jobs.append(job)  # joint: once per seed and regime
  if not args.report_only:
    check_run_flags(parser, jobs, args.set, args.val)
  rows = {}
  if args.report_only:
    finished = [j for j in jobs if os.path.exists(
        os.path.join(_workdir(args.out, *j), "results.json"))]
    print(f"{len(finished)} of {len(jobs)} runs finished in {args.out}",
          file=sys.stderr, flush=True)
    if not finished:
      sys.exit(f"error: no finished run under {args.out}; nothing to report")
    jobs = finished
  if not args.report_only:
    print(f"{len(jobs)} runs into {args.out} ({args.jobs} at a time); "
          "finished runs are kept and skipped on a rerun", flush=True)
  env = child_environment(os.path.join(args.out, "xla_cache")
                          if args.compile_cache is None
                          else args.compile_cache)
  child_runs.call(lambda: _run_jobs(args, jobs, env, rows))
  text = table(rows, settings, methods)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text + "\n")
  calib = calibration_table(rows, settings, methods)
  with open(os.path.join(args.out, "calibration.md"), "w") as f:
    f.write(calib + "\n")
  print(text)
  print(calib)


if __name__ == "__main__":
  main()
