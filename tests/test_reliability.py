"""Runs that must not end with exit 0 and a wrong or mixed result.

Non-finite parameters (not only losses), run identity over every config
field, metadata under the checksum, one run per workdir, nothing of the
owning run touched by a refused run, no duplicated metrics lines.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rebll_jax import checkpoint, config_base, run_identity, train
from rebll_jax import workdir_lock
from rebll_jax.errors import UserError
from tests.helpers import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  return make_config(**{"protocol.num_tasks": 1,
                        "train.checkpoint_every": 3, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished"))
  return workdir, train.run(_config(), workdir)


def _metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


# --- run identity -------------------------------------------------------


def _mutated(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value + 0.5
  if isinstance(value, str):
    return value + "x"
  if isinstance(value, (tuple, list)):
    return tuple(value) + (1,)
  raise TypeError(type(value))


def test_every_config_field_is_fingerprinted_or_allowed_to_change(
    monkeypatch):
  class Source:  # the config part of the fingerprint needs no data
    name, class_names = "s", ("a",)
  base = config_base.base_config()
  fields = run_identity.flatten(base)
  assert len(fields) > 60
  for pattern in run_identity.MAY_CHANGE_ON_RESUME:  # no stale names
    assert any(f == pattern or f.startswith(pattern) for f in fields), pattern
  for digest in ("data_digest", "crowd_digest"):
    monkeypatch.setattr(run_identity, digest, lambda source: "d")
  reference = run_identity.fingerprint(base, Source, 0)
  for field, value in fields.items():
    config = config_base.base_config()
    *path, last = field.split(".")
    node = config
    for part in path:
      node = node[part]
    node[last] = _mutated(value)
    changed = run_identity.fingerprint(config, Source, 0) != reference
    assert changed != run_identity.may_change(field), field


@pytest.mark.parametrize("override,field", [
    ({"loss.g_pos": 2.0}, "loss.g_pos"),
    ({"relabel.tau_cur": 0.6}, "relabel.tau_cur"),
    ({"memory.selection": "random"}, "memory.selection"),
    ({"memory.mix": "fraction"}, "memory.mix"),
    ({"augment.cutout": 0.5}, "augment.cutout"),
])
def test_changing_a_fingerprinted_field_before_resume_is_refused(
    finished, tmp_path, override, field):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  config_before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(UserError, match=f"another run .*{field}: checkpoint"):
    train.run(_config(**override), workdir)
  # A refused run changes nothing of the owning run.
  assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_resume_false_does_not_overwrite_config_json(finished, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(UserError, match="resume=False"):
    train.run(_config(resume=False, method="er"), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before


# --- what results.json says the run trained with -----------------------


def test_a_rerun_of_a_finished_run_keeps_the_values_it_trained_with(
    finished, tmp_path, caplog):
  """A rerun trains nothing: results.json and config.json used to take its
  epochs_later / lr_later as if the tasks had trained with them."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  config_before = json.load(open(os.path.join(workdir, "config.json")))
  before = finished[1]
  again = train.run(_config(**{"train.epochs_later": 7,
                               "optim.lr_later": 0.5, "num_devices": 1}),
                    workdir)
  assert again["map_matrix"] == before["map_matrix"]
  # The record of the process that trained, not of this one.
  for key in ("devices", "versions", "compilations"):
    assert again[key] == before[key], key
  assert again["config"] == before["config"]
  assert again["config"]["train"]["epochs_later"] != 7
  assert json.load(open(os.path.join(workdir, "config.json"))) == (
      config_before)
  assert "train.epochs_later=7 is not applied" in caplog.text
  assert "optim.lr_later=0.5 is not applied" in caplog.text
  config = _config()
  assert [(t["epochs"], t["lr_peak"]) for t in again["tasks"]] == [
      (config.train.epochs_first, config.optim.lr_first)]


def test_results_name_the_backbone_the_run_was_initialised_with(
    finished, tmp_path, caplog):
  """model.init_from is not read on resume: results.json used to name the
  resuming process's weights, not the ones the run loaded."""
  from rebll_jax import models  # pylint: disable=g-import-not-at-top
  from rebll_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  config = _config()
  model = models.build_model(config.model, 20)
  folders = []
  for seed in (1, 2):
    variables = jax.device_get(models.init_variables(
        model, jax.random.key(seed), config.data.image_size))
    variables = dict(variables, params={
        k: v for k, v in variables["params"].items() if k != "head"})
    folder = str(tmp_path / f"weights{seed}")
    pretrained.save_converted(folder, variables, {"arch": "small_resnet"})
    folders.append(folder)
  workdir = str(tmp_path / "run")
  first = train.run(_config(**{"model.init_from": folders[0]}), workdir)
  assert first["initialised_from"]["ckpt_dir"] == folders[0]
  again = train.run(_config(**{"model.init_from": folders[1]}), workdir)
  assert again["initialised_from"] == first["initialised_from"]
  assert again["config"]["model"]["init_from"] == folders[0]
  # A resume that trains more tasks keeps the init_from it was started
  # with in its config too (the field is not read on resume).
  more = train.run(_config(**{"model.init_from": folders[1],
                              "protocol.num_tasks": 2}), workdir)
  assert len(more["tasks"]) == 2
  assert more["initialised_from"] == first["initialised_from"]
  assert more["config"]["model"]["init_from"] == folders[0]
  assert json.load(open(os.path.join(workdir, "config.json")))[
      "model"]["init_from"] == folders[0]
  assert "is not read on resume" in caplog.text and folders[0] in caplog.text
  assert finished[1]["initialised_from"] is None  # random init


# --- checkpoint metadata --------------------------------------------------


def test_peek_fingerprint_reads_the_newest_checkpoint_as_orbax_wrote_it(
    finished):
  """The dry run's read-only look at a run's fingerprint (no manager: it
  would clean up a live run's temporary folders) sees what a resume
  checks."""
  directory = os.path.join(finished[0], "checkpoints")
  ckpt = checkpoint.Checkpointer(directory)
  try:
    newest = ckpt.read_meta(ckpt.steps()[-1])["fingerprint"]
  finally:
    ckpt.close()
  assert checkpoint.peek_fingerprint(directory) == newest
  assert newest["data_digest"] and newest["class_order"]


def test_edited_metadata_is_damage_not_a_result(finished, tmp_path, caplog):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  shutil.copytree(finished[0], workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  newest = ckpt.steps()[-1]
  ckpt.close()
  path = os.path.join(workdir, "checkpoints", str(newest), "meta", "metadata")
  meta = json.load(open(path))
  meta["results"][0]["map_seen"] = 99.9  # valid JSON, believable number
  json.dump(meta, open(path, "w"))
  results = train.run(_config(), workdir)
  assert "metadata fails the checksum" in caplog.text
  # The edit did not leak into the results: the previous checkpoint (mid-task)
  # was resumed and the task re-finished to the same number.
  assert results["avg_map"] == pytest.approx(finished[1]["avg_map"], abs=1e-6)
  assert results["avg_map"] != 99.9


# --- non-finite state -----------------------------------------------------


def test_huge_learning_rate_never_checkpoints_nan_parameters(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteLossError, match="non-finite"):
    train.run(_config(**{"optim.lr_first": 1e30, "train.log_every": 2,
                         "train.checkpoint_every": 2}), workdir)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ckpt.steps()
  ckpt.close()
  # The finite check itself: every checkpoint's parameters are finite.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  for number in steps:
    state_dir = os.path.join(workdir, "checkpoints", str(number), "state")
    tree = ocp.StandardCheckpointer().restore(state_dir)
    for leaf in jax.tree.leaves(tree["train"]["params"]):
      assert np.all(np.isfinite(np.asarray(leaf)))


# --- one run per workdir, metrics lines -----------------------------------


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  try:
    with pytest.raises(UserError, match=r"in use by another run \(pid "):
      train.run(_config(), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))
  finally:
    lock.release()
  # A lock whose process is gone (here: released) blocks nothing.
  workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()


def test_cli_refuses_a_workdir_held_by_another_process(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from rebll_jax import workdir_lock; "
       f"workdir_lock.WorkdirLock({str(tmp_path)!r}).acquire(); "
       "print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, cwd=ROOT, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    out = subprocess.run(
        [sys.executable, "-m", "rebll_jax.main", "--config=configs/test.py",
         f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
        timeout=120)
    assert out.returncode == 2
    assert f"pid {holder.pid}" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
  finally:
    holder.kill()
    holder.wait()


def test_no_duplicated_metric_steps_after_a_kill_before_any_checkpoint(
    tmp_path):
  workdir = str(tmp_path)
  kill = subprocess.run(
      [sys.executable, "-m", "rebll_jax.main", "--config=configs/test.py",
       f"--workdir={workdir}", "--config.protocol.num_tasks=1",
       "--config.train.log_every=1", "--config.train.checkpoint_every=0",
       "--config.debug.kill_at_step=3"], capture_output=True, text=True,
      cwd=ROOT, timeout=300)
  assert kill.returncode == -9
  assert _metric_steps(workdir)  # the killed run logged some steps
  train.run(_config(**{"train.log_every": 1, "train.checkpoint_every": 0}),
            workdir)
  steps = _metric_steps(workdir)
  assert steps == sorted(set(steps))


def test_a_checkpoint_from_before_a_field_matches_only_its_old_behaviour():
  # model.head_rows did not exist before 2026-12-07: such a checkpoint ran
  # "kept" rows, so it resumes under "kept" and is refused under "fresh".
  saved = {"config": {"seed": 0}}
  for value, same in (("kept", True), ("fresh", False)):
    current = {"config": {"seed": 0, "model.head_rows": value}}
    assert (run_identity.differences(saved, current) == []) == same
  assert run_identity.differences(saved, {"config": {"seed": 0}}) == []
  for field in run_identity.VALUE_BEFORE_THE_FIELD:
    assert field in run_identity.flatten(config_base.base_config())


def test_crowd_boxes_are_part_of_the_run_identity():
  """A dataset prepared again with other crowd annotations changes what
  keep_crowd_only_images trains on: a resume used to accept it."""
  from rebll_jax import data  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = _config()
  source = data.build_source(config.data)
  crowd = np.zeros_like(source.train.crowd_labels)
  crowd[0, 1] = 1
  other = dataclasses.replace(
      source, train=dataclasses.replace(source.train, crowd_labels=crowd))
  saved = run_identity.fingerprint(config, source, 8)
  now = run_identity.fingerprint(config, other, 8)
  assert saved["data_digest"] == now["data_digest"]
  assert run_identity.differences(saved, now) == [
      f"crowd_digest: checkpoint {saved['crowd_digest']!r} vs config "
      f"{now['crowd_digest']!r}"]
  # A checkpoint from before the entry cannot say: not compared.
  del saved["crowd_digest"]
  assert run_identity.differences(saved, now) == []


def test_a_method_redefined_since_the_checkpoint_is_refused():
  """``ft`` became METHOD.md's fine-tuning on 2026-12-08: an ``ft``
  checkpoint that does not record its definition ran the old one and must
  not resume as the new one (another loss, exit 0)."""
  from rebll_jax import data  # pylint: disable=g-import-not-at-top
  config = _config(method="ft")
  source = data.build_source(config.data)
  now = run_identity.fingerprint(config, source, 8)
  saved = {k: v for k, v in now.items() if k != "method_definition"}
  (diff,) = run_identity.differences(saved, now)
  assert diff.startswith("method_definition: on 2026-12-08 `ft` became") and (
      "`ft_masked`" in diff)
  # Other methods' definitions did not change: old checkpoints resume.
  rebll = run_identity.fingerprint(_config(), source, 8)
  assert run_identity.differences(
      {k: v for k, v in rebll.items() if k != "method_definition"},
      rebll) == []
  # A recorded definition that differs from the code's is refused too.
  changed = {**now, "method_definition": {
      **now["method_definition"], "unknown_labels": "masked"}}
  assert run_identity.differences(changed, now)[0].startswith(
      "method_definition: checkpoint {")
