"""Cross-field checks of ``validate`` that used to pass and fail later.

A memory.fraction whose rounding leaves a batch no new row (a division by
zero in the loader after task 1) or no memory row (nothing replayed); a
replay method without memory (a traceback in memory.py); distributed=True
with nothing JAX can start from (a traceback in jax.distributed); a
protocol.num_tasks beyond the split (fewer tasks, silently). Each is one
``UserError`` before anything is compiled. Checks are called in process;
one CLI run proves the traceback became one line.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from rebll_jax import methods, protocol, validate
from rebll_jax.data.base import Split
from rebll_jax.data.loader import MemoryRows, TaskBatches
from rebll_jax.errors import UserError
from tests.helpers import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REPLAY_METHODS = sorted(m for m, method in methods.METHODS.items()
                        if method.replay)


# --- memory.fraction (memory.mix=fraction) ---------------------------------


def _fraction(value, **overrides):
  return make_config(**{"memory.mix": "fraction", "memory.fraction": value,
                        **overrides})


def test_fraction_that_leaves_no_new_rows_is_refused():
  # round(0.97 * 16) = 16: the loader divided by 0 new rows after task 1.
  with pytest.raises(UserError, match=(
      r"^memory\.fraction=0\.97 gives round\(0\.97 \* 16\) = 16 of the 16 "
      r"rows of each batch \(train\.global_batch=16\) to memory and 0 to new "
      r"data; .*memory\.fraction in \(0\.03125, 0\.96875\) \(1 to 15 memory "
      r"rows\)")):
    validate.check_config(_fraction(0.97))


def test_fraction_that_replays_nothing_is_refused():
  for value in (0.01, 0.0):  # round(0.16) = 0 memory rows
    with pytest.raises(UserError, match=(
        rf"^memory\.fraction={value} gives round\({value} \* 16\) = 0 of the "
        r"16 rows .*replay nothing.*\(0\.03125, 0\.96875\)")):
      validate.check_config(_fraction(value))


def test_fraction_range_follows_the_batch():
  validate.check_config(_fraction(0.97, **{"train.global_batch": 64}))
  with pytest.raises(UserError, match=r"in \(0\.0078125, 0\.992188\)"):
    validate.check_config(_fraction(0.995, **{"train.global_batch": 64}))
  with pytest.raises(UserError, match=r"needs train\.global_batch >= 2"):
    validate.check_memory_fraction(0.5, 1)


def test_fraction_is_not_checked_without_fraction_mix_or_replay():
  validate.check_config(make_config(**{"memory.fraction": 0.97}))  # uniform
  for method in ("ft", "lwf", "joint"):  # no memory to mix
    validate.check_config(_fraction(0.97, method=method))


def _loader(fraction, batch):
  n, c = 40, 4
  labels = np.ones((n, c), np.uint8)
  split = Split(labels=labels, image_ids=np.arange(n),
                read_images=lambda i: np.zeros((len(i), 2, 2, 3), np.uint8))
  memory = MemoryRows(images=np.zeros((6, 2, 2, 3), np.uint8),
                      labels=np.ones((6, c), np.float32),
                      known=np.ones((6, c), bool),
                      true_labels=np.ones((6, c), np.uint8))
  return TaskBatches(split=split, view=protocol.partial_view(labels, [0, 1]),
                     memory=memory, global_batch=batch,
                     local_rows=slice(0, batch), seed=0, task=1,
                     mix="fraction", fraction=fraction)


@pytest.mark.parametrize("batch", [2, 3, 5, 8, 16])
def test_fraction_check_agrees_with_the_loader(batch):
  low, high = 0.5 / batch, (batch - 0.5) / batch  # the rounding's edges
  fractions = {0.0, 0.01, 0.25, 0.5, 0.97, 0.999, low, high, low + 1e-9,
               high - 1e-9, 1 / batch, (batch - 1) / batch}
  for fraction in sorted(f for f in fractions if 0 <= f < 1):
    try:
      validate.check_memory_fraction(fraction, batch)
      accepted = True
    except UserError:
      accepted = False
    try:
      is_memory = _loader(fraction, batch).batch(0)["is_memory"]
      works = 0 < is_memory.sum() < batch
    except ZeroDivisionError:
      works = False
    assert accepted == works, (fraction, batch)


# --- a replay method needs memory ------------------------------------------


@pytest.mark.parametrize("method", REPLAY_METHODS)
def test_replay_without_memory_is_refused(method):
  config = make_config(method=method, **{"memory.per_class": 0,
                                         "memory.total": 0})
  with pytest.raises(UserError, match=(
      rf"^method '{method}' replays exemplars but memory\.per_class=0 and "
      r"memory\.total=0 leave it no memory; set memory\.per_class > 0")):
    validate.check_config(config)


def test_no_memory_is_fine_without_replay_or_with_a_total():
  validate.check_config(make_config(method="lwf", **{"memory.per_class": 0}))
  validate.check_config(make_config(method="rebll", **{
      "memory.per_class": 0, "memory.total": 10}))


# --- distributed=True ------------------------------------------------------

# What parallel.distributed_kwargs and JAX's cluster detection read.
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def no_cluster(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)


def _dist(**fields):
  return make_config(distributed=True,
                     **{f"dist.{k}": v for k, v in fields.items()})


def test_distributed_with_nothing_to_start_from_is_refused(no_cluster):
  with pytest.raises(UserError, match=(
      r"^distributed=True but dist\.coordinator_address "
      r"\(\$JAX_COORDINATOR_ADDRESS\), dist\.num_processes "
      r"\(\$JAX_NUM_PROCESSES\), dist\.process_id \(\$JAX_PROCESS_ID\) are "
      r"not set, and JAX detects no cluster")):
    validate.check_config(_dist())


def test_distributed_names_the_one_missing_field(no_cluster):
  with pytest.raises(UserError, match=r"but dist\.process_id "
                     r"\(\$JAX_PROCESS_ID\) is not set"):
    validate.check_config(_dist(coordinator_address="10.0.0.1:1234",
                                num_processes=2))


def test_distributed_from_config_or_environment_is_accepted(
    no_cluster, monkeypatch):
  validate.check_config(_dist(coordinator_address="10.0.0.1:1234",
                              num_processes=2, process_id=1))
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  validate.check_config(_dist())


def test_distributed_left_to_a_detected_cluster(no_cluster, monkeypatch):
  # JAX's own detection supplies the rest on SLURM (read from its env).
  for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "n1"),
                      ("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0"),
                      ("SLURM_LOCALID", "0")):
    monkeypatch.setenv(name, value)
  validate.check_config(_dist())


def test_distributed_bad_address_or_environment_is_refused(
    no_cluster, monkeypatch):
  with pytest.raises(UserError, match=r"coordinator address '10\.0\.0\.1' "
                     r".* must be HOST:PORT"):
    validate.check_config(_dist(coordinator_address="10.0.0.1",
                                num_processes=2, process_id=0))
  with pytest.raises(UserError, match=r"process_id=2 is not in "
                     r"\[0, num_processes=2\)"):
    validate.check_config(_dist(coordinator_address="h:1", num_processes=2,
                                process_id=2))
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(UserError, match=r"must be integers"):
    validate.check_config(_dist(coordinator_address="h:1", process_id=0))


def test_distributed_dry_run_is_not_checked(no_cluster):
  validate.check_config(make_config(distributed=True, dry_run=True))


def test_cli_distributed_without_coordinator_is_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "-m", "rebll_jax.main", "--config=configs/test.py",
       f"--workdir={tmp_path / 'w'}", "--config.distributed=True"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(
      "error: distributed=True but dist.coordinator_address"), lines


# --- protocol.num_tasks ----------------------------------------------------


def test_num_tasks_beyond_the_split_is_refused():
  # configs/test.py: B0-C4 on 20 classes = 5 tasks.
  for n in (6, 10):
    with pytest.raises(UserError, match=(
        rf"^protocol\.num_tasks={n} but setting B0-C4 on 20 classes has 5 "
        r"task\(s\); use protocol\.num_tasks <= 5, or -1 for every task")):
      validate.check_protocol(make_config(**{"protocol.num_tasks": n}), 20)


@pytest.mark.parametrize("n,count", [(-1, 5), (1, 1), (3, 3), (5, 5)])
def test_num_tasks_up_to_the_split_is_accepted(n, count):
  # Raising it up to the split's tasks is how a run is extended on resume.
  config = make_config(**{"protocol.num_tasks": n})
  validate.check_all(config, num_classes=20, num_devices=1)
  assert len(methods.get_method(config.method).tasks(
      20, config.protocol)) == count


def test_num_tasks_maximum_follows_base_and_increment():
  config = make_config(**{"protocol.base": 8, "protocol.num_tasks": 4})
  validate.check_protocol(config, 20)  # B8-C4: 8, then 3 x 4
  config = make_config(**{"protocol.base": 8, "protocol.num_tasks": 5})
  with pytest.raises(UserError, match=r"B8-C4 on 20 classes has 4 task"):
    validate.check_protocol(config, 20)


def test_joint_ignores_num_tasks():
  validate.check_protocol(make_config(method="joint",
                                      **{"protocol.num_tasks": 10}), 20)
