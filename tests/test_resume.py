"""Exact mid-task resume: SIGKILL in task 1, SIGTERM in task 2, same results.

Every run is a subprocess of the CLI on 8 virtual CPU devices. The process
is killed by ``--config.debug.kill_at_step`` (SIGKILL from inside, at a
step chosen at random per test session, between mid-task saves), restarted
with the same command, stopped in task 2 by ``--config.debug.term_at_step``
(SIGTERM: it saves at the next step), restarted again, and must end with the
results of an uninterrupted run to 1e-6. The runs share a persistent
compilation cache so that only the first one compiles.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY = 3  # mid-task checkpoint interval


def child_env(cache_dir=None):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def run_cli(workdir, *overrides, cache_dir=None, timeout=300):
  cmd = [sys.executable, "-m", "rebll_jax.main", "--config=configs/test.py",
         f"--workdir={workdir}", "--config.protocol.num_tasks=2",
         f"--config.train.checkpoint_every={EVERY}",
         # Head rows drawn at each task's start: a resume must not redraw.
         "--config.model.head_rows=fresh", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=child_env(cache_dir),
                        capture_output=True, text=True, timeout=timeout)


def metrics_of(results: dict) -> dict:
  """results.json without what may differ between processes: wall times,
  the compile counts of this process, the resolved config (debug hooks)."""
  out = json.loads(json.dumps(results))
  for key in ("compilations", "config", "versions"):
    out.pop(key, None)
  for task in out["tasks"]:
    task.pop("train_seconds")
  return out


def assert_close(a, b, path="results"):
  if isinstance(a, dict):
    assert set(a) == set(b), (path, set(a) ^ set(b))
    for k in a:
      assert_close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      assert_close(x, y, f"{path}[{i}]")
  elif isinstance(a, float) or isinstance(b, float):
    assert abs(a - b) <= 1e-6, (path, a, b)
  else:
    assert a == b, (path, a, b)


def kill_steps(rng: random.Random, steps):
  """A global step (0-based) in task 1 after its first save, one in task 2
  after its first step; ``steps``: the steps of task 1 and task 2."""
  return (rng.randrange(EVERY, steps[0]),
          rng.randrange(steps[0] + 1, steps[0] + steps[1]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """(compilation cache, results.json, workdir) of an uninterrupted run."""
  root = tmp_path_factory.mktemp("resume")
  cache = root / "jax_cache"
  base = run_cli(root / "uninterrupted", cache_dir=cache)
  assert base.returncode == 0, base.stderr[-2000:]
  expected = json.load(open(root / "uninterrupted" / "results.json"))
  return cache, expected, root / "uninterrupted"


def test_sigkill_in_task_1_and_sigterm_in_task_2_resume_exactly(
    tmp_path, uninterrupted):
  # SIGKILL at a random step of task 1 (resumed from the last mid-task
  # save), then a scheduler's SIGTERM at a random step of task 2 with the
  # mid-task saves off: the run saves after the step it is in and exits 143
  # with one line (it used to die at once, exit -15, and start task 2 over).
  cache, expected, base_dir = uninterrupted
  steps_1, steps_2 = (t["train_steps"] for t in expected["tasks"])
  workdir = tmp_path / "killed"
  seed = random.randrange(2**32)
  k1, k2 = kill_steps(random.Random(seed), [steps_1, steps_2])
  print(f"kill step {k1}, SIGTERM step {k2} (seed {seed})")
  first = run_cli(workdir, f"--config.debug.kill_at_step={k1}",
                  cache_dir=cache)
  assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
  assert not (workdir / "results.json").exists()
  second = run_cli(workdir, f"--config.debug.term_at_step={k2}",
                   "--config.train.checkpoint_every=0", cache_dir=cache)
  assert second.returncode == 143, second.stderr[-2000:]
  assert "resumed from checkpoint at task 1" in second.stderr
  stopped_at = k2 - steps_1 + 1
  assert second.stderr.strip().splitlines()[-1] == (
      f"stopped by SIGTERM at task 2, step {stopped_at} of {steps_2}; "
      f"checkpoint saved in {workdir}: the same command resumes")
  assert "Traceback" not in second.stderr
  third = run_cli(workdir, cache_dir=cache)
  assert third.returncode == 0, third.stderr[-2000:]
  assert f"resumed from checkpoint at task 2 step {stopped_at}" in third.stderr
  resumed = json.load(open(workdir / "results.json"))
  assert_close(metrics_of(resumed), metrics_of(expected),
               f"results (SIGKILL at {k1}, SIGTERM at {k2})")
  # The killed run's metrics.jsonl tail was dropped: no duplicated steps.
  steps = [json.loads(l)["step"]
           for l in open(workdir / "metrics.jsonl").read().splitlines()]
  assert steps == sorted(set(steps))
  assert steps == [json.loads(l)["step"] for l in open(
      base_dir / "metrics.jsonl").read().splitlines()]


def test_finished_run_refuses_fewer_tasks(tmp_path, uninterrupted):
  # Rerun with num_tasks=1, the 2-task run rewrote results.json with both
  # tasks' rows under a config naming one (exit 0).
  _, _, base_dir = uninterrupted
  workdir = tmp_path / "copy"
  shutil.copytree(base_dir, workdir)
  before = (workdir / "results.json").read_text()
  result = run_cli(workdir, "--config.protocol.num_tasks=1")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (
      f"error: the run in {workdir} has finished 2 tasks; "
      "protocol.num_tasks=1 asks for 1. Rerun it with protocol.num_tasks >= 2 "
      "(or -1) to write its results again, or use a new --workdir for a "
      "shorter run"), result.stderr[-2000:]
  assert (workdir / "results.json").read_text() == before
