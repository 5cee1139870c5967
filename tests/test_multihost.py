"""Multi-host: two processes on CPU over localhost equal one process.

The installed JAX runs cross-process collectives on CPU (gloo), so a real
2-process ``jax.distributed`` run is tested here: ``rebll_jax.main`` with
``--config.distributed=True`` in two processes with 2 CPU devices each (the
coordinator, process count and id from the environment variables), sharing
one workdir. A SIGTERM to one process in task 1 stops both at one step
(JAX's preemption sync point, a collective save, exit 143); a second launch
resumes from the orbax checkpoint they wrote together and trains both
tasks to the end. The result must equal a single-process run on 4 devices:
parameters within 1e-5, the same mAPs; only process 0 wrote metrics,
results and plots.

Unit tests cover what the launch relies on: the config/environment
precedence of ``parallel.distributed_kwargs``, each process loading only
its slice of every global batch, and the writers staying silent on
processes other than 0.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rebll_jax import config_base, parallel, protocol, reporting
from rebll_jax import train
from tests.helpers import make_config, max_abs_diff, params_after_task
from rebll_jax.data import loader
from rebll_jax.data.base import Split
from rebll_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"data.image_size": 16, "data.synthetic.render_size": 16,
             "data.synthetic.num_train": 160, "data.synthetic.num_test": 64,
             "augment.randaugment_ops": 0,
             # Task 1 long enough (16 steps) for a SIGTERM's notice to reach
             # both processes before it ends (it took ~7 steps here).
             "train.epochs_first": 4}


def _config(**overrides):
  return make_config(**{**OVERRIDES, **overrides})




# ------------------------------------------------------------------ units ---

def test_distributed_kwargs_config_then_environment_then_auto():
  dist = config_base.base_config().dist
  assert parallel.distributed_kwargs(dist, environ={}) == {}  # auto-detect
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "0"}
  assert parallel.distributed_kwargs(dist, environ=env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4,
      "process_id": 0}
  dist.coordinator_address, dist.num_processes, dist.process_id = (
      "host0:99", 2, 1)
  assert parallel.distributed_kwargs(dist, environ=env) == {
      "coordinator_address": "host0:99", "num_processes": 2, "process_id": 1}
  dist.process_id = 2
  with pytest.raises(UserError, match="process_id"):
    parallel.distributed_kwargs(dist, environ={})


def test_each_process_loads_only_its_slice():
  from tests.test_loader import _memory, _split  # pylint: disable=g-import-not-at-top
  base = _split()
  read = []

  def read_images(idx):
    read.append(len(idx))
    return base.read_images(idx)

  split = Split(labels=base.labels, image_ids=base.image_ids,
                read_images=read_images)
  view = protocol.partial_view(split.labels, [0, 1, 2])
  kw = dict(split=split, view=view, memory=_memory(), global_batch=8,
            seed=0, task=1)
  assert [parallel.local_batch_slice(8, p, 2) for p in (0, 1)] == [
      slice(0, 4), slice(4, 8)]
  whole = loader.TaskBatches(local_rows=slice(0, 8), **kw)
  parts = [loader.TaskBatches(
      local_rows=parallel.local_batch_slice(8, p, 2), **kw) for p in (0, 1)]
  for step in range(3):
    full = whole.batch(step)
    read.clear()
    pieces = [p.batch(step) for p in parts]
    # Each process decoded at most its own 4 rows, never the whole batch.
    assert read and all(n <= 4 for n in read)
    for key in full:
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in pieces]), full[key])
  with pytest.raises(UserError, match="divisible"):
    parallel.local_batch_slice(9, 0, 2)


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = reporting.Writer(str(tmp_path))
  writer.write(1, {"loss": 1.0}, task=1)
  writer.close()
  reporting.save_plots(str(tmp_path), {"tasks": []})
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------- two processes ---

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, num_tasks, term_at_step=(-1, -1), code=0):
  """Runs rebll_jax.main in 2 processes x 2 CPU devices; returns outputs.
  ``term_at_step``: each process's debug.term_at_step (a SIGTERM to itself
  there); ``code``: the exit code both must end with."""
  port = _free_port()
  args = [sys.executable, "-m", "rebll_jax.main",
          "--config=configs/test.py", f"--workdir={workdir}",
          "--config.distributed=True",
          f"--config.protocol.num_tasks={num_tasks}"]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs = []
  for pid in range(2):
    env = {**os.environ, "XLA_FLAGS":
           "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
           # Later launches reuse the first one's executables.
           "JAX_COMPILATION_CACHE_DIR": os.path.join(
               os.path.dirname(str(workdir)), "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    procs.append(subprocess.Popen(
        args + [f"--config.debug.term_at_step={term_at_step[pid]}"],
        cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
    assert p.returncode == code, out[-3000:]
  return outputs






def test_two_processes_equal_one_and_resume_across_processes(tmp_path):
  # A SIGTERM to process 1 alone at the first step stops both at the step
  # JAX's preemption sync point names, after a collective save (exit 143
  # each); the second launch resumes from that shared checkpoint.
  multi = str(tmp_path / "multi")
  stopped = _launch(multi, num_tasks=2, term_at_step=(-1, 0), code=143)
  for out in stopped:
    assert "stopped by SIGTERM at task 1, step " in out, out[-3000:]
  resumed = _launch(multi, num_tasks=2)
  assert "resumed from checkpoint at task 1 step " in resumed[0]
  with open(os.path.join(multi, "results.json")) as f:
    results = json.load(f)
  assert results["devices"] == {**results["devices"], "count": 4,
                                "processes": 2}
  assert len(results["tasks"]) == 2

  single = str(tmp_path / "single")
  reference = train.run(_config(num_devices=4, **{"protocol.num_tasks": 2}),
                        single)
  np.testing.assert_allclose(
      [t["map_seen"] for t in results["tasks"]],
      [t["map_seen"] for t in reference["tasks"]], atol=1e-3)
  params_m, stats_m = params_after_task(multi, 2)
  params_s, stats_s = params_after_task(single, 2)
  assert max_abs_diff(params_m, params_s) < 1e-5
  assert max_abs_diff(stats_m, stats_s) < 1e-5

  # One writer: every logged step appears once, one TensorBoard file per
  # launch, the plots exist.
  with open(os.path.join(multi, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert len(steps) == len(set(steps)) > 0
  assert len(os.listdir(os.path.join(multi, "tensorboard"))) == 2
  for name in ("seen_map.png", "map_matrix.png", "config.json"):
    assert os.path.exists(os.path.join(multi, name))


def test_wait_for_coordinator_answers_or_is_one_user_error():
  with socket.socket() as listening:
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    parallel.wait_for_coordinator(f"127.0.0.1:{port}", 1)
    parallel.wait_for_coordinator(f"[127.0.0.1]:{port}", 1)
  with pytest.raises(UserError, match="is not host:port"):
    parallel.wait_for_coordinator("localhost", 1)


def test_unreachable_coordinator_is_one_line_not_an_abort(tmp_path):
  # Process 1 with nothing at the coordinator's port: JAX aborted after its
  # timeout (SIGABRT, a C++ stack dump); now one line, exit 2.
  port = _free_port()
  result = subprocess.run(
      [sys.executable, "-m", "rebll_jax.main", "--config=configs/test.py",
       f"--workdir={tmp_path}", "--config.distributed=True",
       f"--config.dist.coordinator_address=127.0.0.1:{port}",
       "--config.dist.num_processes=2", "--config.dist.process_id=1",
       "--config.dist.init_timeout_s=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: nothing answers at the coordinator address 127.0.0.1:{port} "
      "after 2 s"), result.stderr[-2000:]
