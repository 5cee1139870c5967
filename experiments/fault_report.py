"""Fault report: inject the faults a long run meets, count what survives.

  python experiments/fault_report.py [--workdir=/tmp/fault_report] [--seed=0]
      [--overhead]

Every run is the CLI in a subprocess on 8 virtual CPU devices, on the
3-task ``configs/test.py`` with a mid-task checkpoint every 3 steps. The
faults:

- SIGKILL from inside at a random step of every task (``debug.kill_at_step``),
  the same command restarted after each kill;
- SIGKILL from outside after a random delay (it can land during a save);
- a truncated array file, a deleted metadata file and a leftover orbax
  temporary directory in the newest checkpoint before a restart;
- a poisoned step (``debug.nan_at_step``): the run must stop with exit 1,
  keep its last good checkpoint, and the rerun without the poison must end
  as the uninterrupted run;
- bad configs and flags: each must end in one ``error:`` line, exit 2;
- a learning rate of 1e30 (finite loss, NaN parameters): exit 1, and no
  checkpoint may hold a non-finite parameter;
- two processes on one workdir: the second must refuse at once (exit 2,
  naming the first), the first must finish identically;
- an edited number in the newest checkpoint's metadata: skipped as damage,
  the rerun identical;
- a fingerprinted field (``loss.g_pos``) changed between a kill and the
  resume: refused (exit 2), ``config.json`` untouched.

Every finished run is also checked for finite parameters in every
checkpoint and for metrics.jsonl without a duplicated step.

A run "resumed identically" when its results.json equals the uninterrupted
run's within 1e-6 (wall times aside). "Results lost" counts runs that did
not finish or finished with other numbers: it must be 0.

``--overhead`` also measures the cost of periodic checkpointing on the
default synthetic config (task 1, 2 epochs, its own ``cpu_devices`` split
of the CPU, a save every 5 steps): the median seconds per save over the
median seconds per train step between two saves, as a fraction of training
time at ``train.checkpoint_every``. Compilation, the first steps and the
first save are left out, so the figure does not depend on the run's length.

``--workdir`` is deleted first: the report writes a ``.rebll_fault_report``
file into the folder it makes and refuses any folder that holds anything
but its own runs next to that file (or empty folders of their names).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from experiments.cli_checks import usage_error  # noqa: E402  pylint: disable=wrong-import-position

EVERY = 3


def _env(cache):
  env = dict(os.environ)
  env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
              "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
              "JAX_COMPILATION_CACHE_DIR": cache,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  return env


class Runner:
  def __init__(self, root):
    self.root = root
    self.cache = os.path.join(root, "jax_cache")

  def cmd(self, workdir, *extra, config="configs/test.py"):
    return [sys.executable, "-m", "rebll_jax.main", f"--config={config}",
            f"--workdir={workdir}",
            f"--config.train.checkpoint_every={EVERY}", *extra]

  def run(self, workdir, *extra, **kw):
    return subprocess.run(self.cmd(workdir, *extra, **kw), cwd=ROOT,
                          env=_env(self.cache), capture_output=True,
                          text=True, timeout=600)

  def run_killed_after(self, workdir, delay):
    """Starts the run, SIGKILLs it after ``delay`` s; returns its code."""
    proc = subprocess.Popen(self.cmd(workdir), cwd=ROOT, env=_env(self.cache),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
      proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    return proc.returncode


def _metrics(path):
  out = json.load(open(path))
  for key in ("compilations", "config", "versions"):
    out.pop(key, None)
  for task in out["tasks"]:
    task.pop("train_seconds", None)
  return out


def _same(a, b) -> bool:
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, float) or isinstance(b, float):
    return abs(a - b) <= 1e-6
  return a == b


def _checkpoints_finite(workdir) -> bool:
  """Every parameter and batch statistic of every checkpoint is finite."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
    if not name.isdigit():
      continue
    try:
      tree = ocp.StandardCheckpointer().restore(
          os.path.join(ckpt_dir, name, "state"))
    except Exception:  # pylint: disable=broad-except
      continue  # damaged on purpose by this report
    for leaf in jax.tree.leaves((tree["train"]["params"],
                                 tree["train"]["batch_stats"])):
      if not np.all(np.isfinite(np.asarray(leaf))):
        return False
  return True


def _metric_steps_unique(workdir) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return True
  steps = [json.loads(line)["step"] for line in open(path) if line.strip()]
  return len(steps) == len(set(steps))


def _edit_newest_meta(workdir) -> bool:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  numbers = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  path = os.path.join(ckpt_dir, str(numbers[-1]), "meta", "metadata")
  meta = json.load(open(path))
  if not meta.get("results"):
    return False
  meta["results"][0]["map_seen"] = 99.0  # valid JSON, a believable number
  json.dump(meta, open(path, "w"))
  return True


def _damage_newest(workdir, rng) -> str:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  numbers = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  if not numbers:
    return ""
  newest = os.path.join(ckpt_dir, str(numbers[-1]))
  kind = rng.choice(["truncate", "delete_meta", "tmp_dir"])
  if kind == "truncate":
    files = glob.glob(os.path.join(newest, "state", "**", "d", "*"),
                      recursive=True)
    path = rng.choice(files)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  elif kind == "delete_meta":
    os.remove(os.path.join(newest, "meta", "metadata"))
  else:  # what a crash in the middle of a save leaves behind
    shutil.copytree(newest, os.path.join(
        ckpt_dir, f"{numbers[-1] + 1}.orbax-checkpoint-tmp-{rng.randrange(9**9)}"))
  return kind


BAD_INPUTS = [
    ["--config.nope=1"],
    ["--config.protocol.base=10", "--config.protocol.increment=3"],
    ["--config.train.global_batch=12"],
    ["--config.method=nope"],
    ["--config.train.global_batch=abc"],
    ["--config.optim.lr_first=-1"],
    ["--config.optim.warmup_frac=nan"],
    ["--config.model.stage_sizes=()"],
    ["--config.data.synthetic.num_train=2"],
    ["--config.memory.mix=both"],
    ["--config.resume=maybe"],
    ["--config.num_devices=-1"],
    ["stray_argument"],
    ["--config.loss.temperature=inf"],
    ["--config.seed=99999999999999999999999"],
    ["--config.data.synthetic.seed=-1"],
]


# The folders a report makes in --workdir (a rerun empties only such a one).
_OWN_ENTRIES = re.compile(
    r"uninterrupted|kill_inside_\d+|kill_outside|nan|huge_lr|two_processes|"
    r"edited_meta|changed_config|bad|jax_cache|overhead")
# Written by the report into the --workdir it makes: what proves that a
# folder is a previous report's (names alone do not: a user's folder may
# hold a "nan" or "bad" folder of their own).
MARKER = ".rebll_fault_report"
_MARKER_TEXT = "made by experiments/fault_report.py, which deletes it\n"


def _is_marker(path) -> bool:
  try:
    with open(path) as f:
      return os.path.isfile(path) and f.read(200) == _MARKER_TEXT
  except (OSError, UnicodeDecodeError):
    return False


def _check_workdir(parser, workdir):
  """Exit 2 with one line unless ``workdir`` is new, empty or a previous
  report's (the report deletes it first). A previous report's folder holds
  the MARKER file; without one, only empty folders of the report's names
  are taken (nothing in them to lose)."""
  del parser  # one line, not argparse's usage + error
  if not workdir:
    usage_error("--workdir is empty")
  if not os.path.lexists(workdir):
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.lexists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      usage_error(f"--workdir {workdir}: {parent} is a file, not a folder")
    return
  if not os.path.isdir(workdir) or os.path.islink(workdir):
    usage_error(f"--workdir {workdir} is a file or a link, not a folder")
  entries = sorted(os.listdir(workdir))
  others = [e for e in entries if e != MARKER and not _OWN_ENTRIES.fullmatch(e)]
  if others:
    usage_error(f"--workdir {workdir} holds {', '.join(others[:3])}, not "
                "only a previous fault report, and would be deleted; choose "
                "another folder")
  if _is_marker(os.path.join(workdir, MARKER)):
    return
  for entry in entries:
    path = os.path.join(workdir, entry)
    if (os.path.islink(path) or not os.path.isdir(path)
        or os.listdir(path)):
      usage_error(f"--workdir {workdir} holds {entry} but no {MARKER} file, "
                  "so it is not known to be a previous fault report's, and "
                  "would be deleted; choose another folder (or delete it "
                  "yourself if it is an old report's)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/rebll_fault_report",
                      help="deleted and made again (refused unless new, "
                      "empty or a previous report's)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overhead", action="store_true")
  args = parser.parse_args(argv)
  _check_workdir(parser, args.workdir)
  rng = random.Random(args.seed)
  shutil.rmtree(args.workdir, ignore_errors=True)
  try:
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, MARKER), "w") as f:
      f.write(_MARKER_TEXT)
  except OSError as e:
    usage_error(f"--workdir {args.workdir}: {' '.join(str(e).split())}")
  runner = Runner(args.workdir)
  wd = lambda name: os.path.join(args.workdir, name)  # noqa: E731
  faults, identical, scenarios, lost = 0, 0, 0, 0
  non_finite_saved, duplicated_steps, mixed_runs = 0, 0, 0
  started = time.time()

  base = runner.run(wd("uninterrupted"))
  if base.returncode:
    sys.exit(f"the uninterrupted run failed:\n{base.stderr[-3000:]}")
  expected = _metrics(os.path.join(wd("uninterrupted"), "results.json"))
  steps = [t["train_steps"] for t in expected["tasks"]]
  bounds = [sum(steps[:i]) for i in range(len(steps) + 1)]

  def finish(workdir, note):
    nonlocal identical, lost, scenarios, non_finite_saved, duplicated_steps
    scenarios += 1
    for _ in range(5):  # a damaged newest checkpoint may cost a retry
      result = runner.run(workdir)
      if result.returncode == 0:
        break
    path = os.path.join(workdir, "results.json")
    finite = _checkpoints_finite(workdir)
    unique = _metric_steps_unique(workdir)
    non_finite_saved += not finite
    duplicated_steps += not unique
    ok = (result.returncode == 0 and os.path.exists(path) and finite
          and unique and _same(_metrics(path), expected))
    identical += ok
    lost += not ok
    print(f"  {note}: {'identical' if ok else 'LOST'}", flush=True)

  # 1. Kills from inside at a random step of every task, damage in between.
  for trial in range(2):
    workdir = wd(f"kill_inside_{trial}")
    notes = []
    for t in range(3):
      step = rng.randrange(bounds[t] + 1, bounds[t + 1])
      result = runner.run(workdir, f"--config.debug.kill_at_step={step}")
      assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
      faults += 1
      notes.append(f"kill@{step}")
      if trial == 1 and t > 0:
        damage = _damage_newest(workdir, rng)
        if damage:
          faults += 1
          notes.append(damage)
    finish(workdir, " ".join(notes))

  # 2. Kills from outside after random delays (may hit a save).
  workdir = wd("kill_outside")
  notes = []
  for _ in range(3):
    delay = rng.uniform(2.0, 12.0)
    code = runner.run_killed_after(workdir, delay)
    if code == -signal.SIGKILL:
      faults += 1
      notes.append(f"kill@{delay:.1f}s")
  finish(workdir, " ".join(notes) or "no kill landed")

  # 3. A poisoned step: exit 1, last good checkpoint kept, rerun identical.
  workdir = wd("nan")
  step = rng.randrange(bounds[1] + 1, bounds[2])
  result = runner.run(workdir, f"--config.debug.nan_at_step={step}")
  faults += 1
  line = result.stderr.strip().splitlines()[-1] if result.stderr else ""
  if result.returncode != 1 or "non-finite loss" not in line:
    lost += 1
    print(f"  nan@{step}: not stopped as expected ({result.returncode})")
  finish(workdir, f"nan@{step} ({line[:60]}...)")

  # 4. A huge learning rate: the loss stays finite while the parameters do
  # not. Exit 1, nothing non-finite saved.
  workdir = wd("huge_lr")
  result = runner.run(workdir, "--config.optim.lr_first=1e30",
                      "--config.train.log_every=2")
  faults += 1
  line = result.stderr.strip().splitlines()[-1] if result.stderr else ""
  finite = _checkpoints_finite(workdir)
  non_finite_saved += not finite
  if result.returncode != 1 or "non-finite" not in line or not finite:
    mixed_runs += 1
    print(f"  lr 1e30: exit {result.returncode}, finite={finite}, {line!r}")
  else:
    print(f"  lr 1e30: stopped ({line[:70]}...)")

  # 5. Two processes on one workdir: the second refuses at once.
  workdir = wd("two_processes")
  first = subprocess.Popen(runner.cmd(workdir), cwd=ROOT,
                           env=_env(runner.cache),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  time.sleep(4.0)  # let it take the lock
  second = runner.run(workdir)
  first_err = first.communicate(timeout=600)[1]
  faults += 1
  refused = second.returncode == 2 and f"pid {first.pid}" in second.stderr
  path = os.path.join(workdir, "results.json")
  same = (first.returncode == 0 and os.path.exists(path)
          and _same(_metrics(path), expected)
          and _metric_steps_unique(workdir))
  if not (refused and same):
    mixed_runs += 1
    print(f"  two processes: second exit {second.returncode} "
          f"({second.stderr.strip()[-120:]!r}), first ok={same} "
          f"{first_err[-200:]!r}")
  else:
    print("  two processes: second refused, first identical")

  # 6. An edited number in the newest checkpoint's metadata.
  workdir = wd("edited_meta")
  step = rng.randrange(bounds[1] + 1, bounds[2])
  runner.run(workdir, f"--config.debug.kill_at_step={step}")
  faults += _edit_newest_meta(workdir)
  finish(workdir, f"kill@{step} + edited metadata")

  # 7. A fingerprinted field changed between a kill and the resume.
  workdir = wd("changed_config")
  runner.run(workdir, f"--config.debug.kill_at_step={bounds[1] + 2}")
  config_before = open(os.path.join(workdir, "config.json")).read()
  result = runner.run(workdir, "--config.loss.g_pos=2.0")
  faults += 1
  if (result.returncode != 2 or "loss.g_pos" not in result.stderr
      or open(os.path.join(workdir, "config.json")).read() != config_before):
    mixed_runs += 1
    print(f"  changed loss.g_pos on resume: exit {result.returncode} "
          f"{result.stderr.strip()[-160:]!r}")
  else:
    print("  changed loss.g_pos on resume: refused, config.json untouched")
  finish(workdir, "resumed with the original config")

  # 8. Bad input: one line, exit 2, no traceback.
  bad_ok = 0
  for extra in BAD_INPUTS:
    result = runner.run(wd("bad"), *extra)
    lines = result.stderr.strip().splitlines()
    good = (result.returncode == 2 and len(lines) == 1
            and lines[0].startswith("error:") and "Traceback" not in
            result.stderr)
    bad_ok += good
    if not good:
      print(f"  bad input {extra}: code {result.returncode}, "
            f"{result.stderr[-300:]!r}")

  print(f"faults injected: {faults}, runs resumed identically: "
        f"{identical}/{scenarios}, bad inputs tried: {len(BAD_INPUTS)} "
        f"({bad_ok} rejected with one line, exit 2), results lost: {lost}, "
        f"non-finite checkpoints: {non_finite_saved}, runs with duplicated "
        f"metric steps: {duplicated_steps}, mixed or unrefused runs: "
        f"{mixed_runs} [{time.time() - started:.0f} s]")
  if args.overhead:
    measure_overhead(args.workdir)
  sys.exit(1 if lost or mixed_runs or non_finite_saved or duplicated_steps
           or bad_ok != len(BAD_INPUTS) else 0)


# Mid-task saves while measuring the overhead: every SAMPLE_EVERY steps,
# and the time between two saves (the trainer syncs on the step before
# each save) gives the steady-state step. Windows and saves before
# SKIP_SAVES saves are left out: they hold the step's compilation, the
# first steps and the first save's one-time costs.
SAMPLE_EVERY = 5
SKIP_SAVES = 1
OVERHEAD_EPOCHS = 2


def _overhead_env(cache):
  """The default experiment's own device layout: no forced device count
  (the child splits the CPU by the config's ``cpu_devices``, as the CLI
  does)."""
  env = _env(cache)
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  if not env["XLA_FLAGS"]:
    del env["XLA_FLAGS"]
  return env


def overhead_figures(saves, total_steps, default_every,
                     skip_saves=SKIP_SAVES) -> dict:
  """Steady-state seconds per save and per train step from the mid-task
  saves ``[(task_step, start_s, end_s), ...]`` of one task.

  Step time: from the end of one save to the start of the next, over the
  steps between them (each save starts after the trainer waited for the
  step), so compiling, the first steps and the saves themselves are out.
  Medians: the machine may be shared."""
  import statistics  # pylint: disable=g-import-not-at-top
  mid = sorted(s for s in saves if 0 < s[0] < total_steps)
  kept = mid[skip_saves:]  # the first save's one-time costs left out
  first = mid[max(skip_saves - 1, 0):]  # windows start after a save
  windows = [(b[1] - a[2]) / (b[0] - a[0]) for a, b in zip(first, first[1:])]
  if not kept or not windows:
    raise ValueError(f"{len(mid)} mid-task saves: too few to leave out "
                     f"the first {skip_saves} and time a step")
  save_s = statistics.median(e - s for _, s, e in kept)
  step_s = statistics.median(windows)
  return {"save_s": save_s, "step_s": step_s,
          "step_s_mean": sum(windows) / len(windows),
          "saves": len(kept), "windows": len(windows),
          "steps_timed": first[-1][0] - first[0][0],
          "steps": total_steps, "default_every": default_every,
          "fraction": (save_s / (default_every * step_s)
                       if default_every else 0.0)}


_OVERHEAD_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from configs import synthetic
from rebll_jax import xla_cpu
c = synthetic.get_config()
xla_cpu.split_host_cpu(c.get("cpu_devices", 0))  # before JAX, as the CLI
import jax
from rebll_jax import train
saves = []
original = train.save
def timed(setup, ckpt, state, fingerprint):
  t = time.perf_counter()
  original(setup, ckpt, state, fingerprint)
  saves.append((state.task_step, t, time.perf_counter()))
train.save = timed  # what the trainer's save_fn calls
default_every = c.train.checkpoint_every
c.protocol.num_tasks = 1; c.train.epochs_first = {epochs}
c.train.progress = False; c.train.checkpoint_every = {every}
r = train.run(c, {workdir!r})
print(json.dumps(dict(default_every=default_every, saves=saves,
                      steps=r["tasks"][0]["train_steps"],
                      devices=jax.device_count(),
                      cpu_devices=c.get("cpu_devices", 0))))
"""


def measure_overhead(root):
  """Seconds per mid-task save vs per train step, default synthetic config
  (its device layout: ``cpu_devices``), task 1, steady state."""
  code = _OVERHEAD_CHILD.format(root=ROOT, epochs=OVERHEAD_EPOCHS,
                                every=SAMPLE_EVERY,
                                workdir=os.path.join(root, "overhead"))
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          env=_overhead_env(os.path.join(root, "jax_cache")),
                          capture_output=True, text=True, timeout=900)
  if result.returncode:
    sys.exit(result.stderr[-3000:])
  m = json.loads(result.stdout.strip().splitlines()[-1])
  f = overhead_figures([tuple(s) for s in m["saves"]], m["steps"],
                       m["default_every"])
  print(f"checkpoint overhead: {f['save_s'] * 1e3:.0f} ms per save, "
        f"{f['step_s'] * 1e3:.0f} ms per step (medians, steady state: "
        f"{f['saves']} saves, {f['windows']} windows of {SAMPLE_EVERY} "
        f"steps, {m['steps']} steps in all, {m['devices']} devices; mean "
        f"step {f['step_s_mean'] * 1e3:.0f} ms); at "
        f"train.checkpoint_every={f['default_every']}: "
        f"{100 * f['fraction']:.1f}% of training time")
  return {**f, "devices": m["devices"]}


if __name__ == "__main__":
  main()
