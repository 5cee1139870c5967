"""End-to-end runs of configs/test.py: devices, resume, outputs, compiles."""

import json
import os
import shutil

import numpy as np
import pytest

from rebll_jax import train
from tests.helpers import make_config


def _config(**overrides):
  return make_config(**overrides)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eight"))
  return workdir, train.run(_config(), workdir)


def _maps(results):
  return np.array([t["map_seen"] for t in results["tasks"]] +
                  [x for t in results["tasks"] for x in t["map_per_task"]])


def test_outputs(eight_devices):
  workdir, results = eight_devices
  for name in ("results.json", "metrics.jsonl", "config.json",
               "seen_map.png", "map_matrix.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  for key in ("method", "dataset", "setting", "class_order", "tasks",
              "avg_map", "last_map", "cf1", "cf1_cp_cr", "of1", "forgetting",
              "map_matrix", "versions", "devices"):
    assert key in on_disk, key
  assert on_disk["setting"] == "B0-C4" and on_disk["method"] == "rebll"
  assert len(on_disk["tasks"]) == 3
  for t in on_disk["tasks"]:
    for key in ("task", "classes", "map_seen", "map_per_task", "train_steps",
                "train_seconds"):
      assert key in t
  assert on_disk["devices"]["count"] == 8
  assert on_disk["avg_map"] == pytest.approx(
      np.mean([t["map_seen"] for t in on_disk["tasks"]]))
  assert [len(r) for r in on_disk["map_matrix"]] == [1, 2, 3]
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  assert lines and all(np.isfinite(json.loads(l)["loss"]) for l in lines)
  # The run writes the protocol it followed, as a dry run describes it.
  from rebll_jax import dry_run  # pylint: disable=g-import-not-at-top
  protocol = json.load(open(os.path.join(workdir, "protocol.json")))
  assert protocol == dry_run.run(_config(dry_run=True),
                                 str(os.path.join(workdir, "dry")))
  assert [t["classes"] for t in protocol["tasks"]] == [
      t["classes"] for t in on_disk["tasks"]]


def test_no_recompile_across_tasks(eight_devices):
  # One trace for the first task (no past model), one shared by tasks 2-3.
  assert eight_devices[1]["compilations"] == {"first": 1, "later": 1}


def test_one_device_matches_eight(eight_devices, tmp_path):
  one = train.run(_config(num_devices=1), str(tmp_path))
  assert one["devices"]["count"] == 1
  np.testing.assert_allclose(_maps(one), _maps(eight_devices[1]), atol=1e-2)


def test_resume_after_task_equals_uninterrupted(eight_devices, tmp_path):
  workdir = str(tmp_path)
  first = train.run(_config(**{"protocol.num_tasks": 1}), workdir)
  assert len(first["tasks"]) == 1
  protocol_path = os.path.join(workdir, "protocol.json")
  assert len(json.load(open(protocol_path))["tasks"]) == 1
  resumed = train.run(_config(), workdir)
  # The extension's protocol.json names its new tasks (it went stale).
  assert len(json.load(open(protocol_path))["tasks"]) == 3
  # Task 1 came from the checkpoint, not from training it again.
  assert resumed["tasks"][0]["train_seconds"] == first["tasks"][0][
      "train_seconds"]
  np.testing.assert_allclose(_maps(resumed), _maps(eight_devices[1]),
                             atol=1e-6)


def test_rerun_of_a_finished_run_keeps_its_compilations(eight_devices,
                                                        tmp_path):
  # The rerun trains nothing; results.json, rewritten, said 0 and 0 (the
  # rerun's own counts) instead of the counts of the process that trained.
  workdir = str(tmp_path / "run")
  shutil.copytree(eight_devices[0], workdir)
  again = train.run(_config(), workdir)
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert again["compilations"] == on_disk["compilations"] == {
      "first": 1, "later": 1}
  assert again["tasks"] == eight_devices[1]["tasks"]  # nothing retrained
  # Without results.json, on one device: the checkpoint has the record of
  # the process that trained (the rerun wrote its own 0 and 0, 1 device).
  os.remove(os.path.join(workdir, "results.json"))
  alone = train.run(_config(num_devices=1), workdir)
  assert alone["compilations"] == {"first": 1, "later": 1}
  assert alone["devices"] == eight_devices[1]["devices"]
  assert alone["devices"]["count"] == 8


def test_state_helpers_equal_the_eager_construction():
  """steps.initial_train_state / fresh_opt_state / copy_tree: one program
  each, the same arrays as optax's eager init and jnp.copy."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rebll_jax import optim, steps  # pylint: disable=g-import-not-at-top
  c = make_config()
  for name in ("adam", "sgd"):
    c.optim.name = name
    tx = optim.make_transform(c.optim)
    variables = {"params": {"conv": {"kernel": jnp.arange(24.).reshape(
        2, 3, 4)}, "head": {"bias": jnp.ones(5)}},
                 "batch_stats": {"bn": {"mean": jnp.full(3, 0.5)}}}
    state = steps.initial_train_state(tx, variables)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    want = tx.init(variables["params"])
    for got in (state.opt_state, steps.fresh_opt_state(tx,
                                                        variables["params"])):
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
    old = steps.copy_tree(steps.variables_of(state))
    for g, w in zip(jax.tree.leaves(old), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(g, w)
      # Own buffers: the train step donates the state's.
      assert g.unsafe_buffer_pointer() != w.unsafe_buffer_pointer()
