"""Checkpoint faults and non-finite losses, in process on 8 CPU devices.

One uninterrupted run of task 1 of configs/test.py (7 or 8 steps, a mid-task
save every 3) is the reference; the faults are made on copies of its workdir.
"""

import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest

from rebll_jax import checkpoint, train
from rebll_jax.errors import UserError
from tests.helpers import make_config


def _config(**overrides):
  return make_config(**{"protocol.num_tasks": 1,
                        "train.checkpoint_every": 3, **overrides})


def _metrics(results):
  out = json.loads(json.dumps(results))
  for key in ("compilations", "config", "versions"):
    out.pop(key)
  for task in out["tasks"]:
    task.pop("train_seconds")
  return out


def _assert_same(a, b):
  a, b = _metrics(a), _metrics(b)
  flat_a, flat_b = _flatten(a), _flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    if isinstance(flat_a[k], float):
      assert abs(flat_a[k] - flat_b[k]) <= 1e-6, k
    else:
      assert flat_a[k] == flat_b[k], k


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    return {k2: v for k, sub in tree.items()
            for k2, v in _flatten(sub, f"{prefix}{k}.").items()}
  if isinstance(tree, list):
    return {k2: v for i, sub in enumerate(tree)
            for k2, v in _flatten(sub, f"{prefix}{i}.").items()}
  return {prefix: tree}


def _metas(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    return {n: ckpt.read_meta(n) for n in ckpt.steps()}
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  return workdir, train.run(_config(), workdir)


def _copy(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "results.json"))
  return workdir


def test_reference_checkpoints(reference):
  metas = _metas(reference[0])
  # Mid-task saves after steps 3 and 6, then the end of task 1.
  assert [(m["task"], m["task_step"]) for m in metas.values()] == [
      (0, 3), (0, 6), (1, 0)]
  assert all("checksum" in m and "label_sums" in m for m in metas.values())


def test_damaged_newest_checkpoint_falls_back(reference, tmp_path, caplog):
  workdir = _copy(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  newest = str(max(int(n) for n in os.listdir(ckpt_dir)))
  # Truncate every array file of the newest checkpoint, and leave behind
  # what a crash during a save would: an uncommitted orbax temporary dir.
  for path in glob.glob(os.path.join(ckpt_dir, newest, "state", "**", "d",
                                     "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  tmp = os.path.join(ckpt_dir, "9.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(ckpt_dir, newest), tmp)
  with caplog.at_level(logging.WARNING):
    resumed = train.run(_config(), workdir)
  assert f"checkpoint {newest}" in caplog.text
  assert not os.path.exists(tmp)  # removed, never taken as complete
  # Steps 7-8 were trained again from the save after step 6: same results.
  _assert_same(resumed, reference[1])


def test_deleted_file_and_flipped_bytes_are_skipped(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  tree = {"w": np.arange(4096, dtype=np.float32)}
  for i in range(3):
    ckpt.save({"w": tree["w"] + i}, {"i": i})
  ckpt.close()
  os.remove(os.path.join(str(tmp_path), "2", "meta", "metadata"))
  data = glob.glob(os.path.join(str(tmp_path), "1", "state", "**", "d", "*"),
                   recursive=True)
  for path in data:
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    raw[-9] ^= 0xFF
    open(path, "wb").write(bytes(raw))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  with caplog.at_level(logging.WARNING):
    restored, meta = ckpt.restore_latest(tree)
  ckpt.close()
  assert meta["i"] == 0
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert "checkpoint 2" in caplog.text and "checkpoint 1" in caplog.text


def test_every_checkpoint_damaged_is_an_error(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "state",
                                     "_METADATA")):
    os.remove(path)
  with pytest.raises(UserError, match="no checkpoint .* can be restored"):
    train.run(_config(), workdir)


@pytest.mark.parametrize("override,key", [
    ({"method": "er"}, "method"),
    ({"protocol.base": 10, "protocol.increment": 5}, "protocol.base"),
    ({"seed": 3}, "seed"),
    ({"data.image_size": 24}, "data.image_size"),
    ({"model.width": 4}, "model.width"),
    ({"optim.name": "sgd"}, "optim.name"),
    ({"memory.per_class": 3}, "memory.per_class"),
    ({"data.synthetic.seed": 7}, "data.synthetic.seed"),
])
def test_checkpoint_of_another_config_is_refused(reference, tmp_path,
                                                 override, key):
  workdir = _copy(reference, tmp_path)
  with pytest.raises(UserError) as error:
    train.run(_config(**override), workdir)
  message = str(error.value)
  assert "\n" not in message and "another run" in message
  assert f"{key}: checkpoint" in message


def test_resume_false_never_touches_checkpoints(reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(UserError, match="resume=False .* new --workdir"):
    train.run(_config(resume=False), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_nan_between_log_steps_is_never_checkpointed(reference, tmp_path):
  workdir = str(tmp_path)
  # Log only at the last step; the loss of global step 4 (task step 5) is
  # NaN, so the save after step 6 must not happen.
  with pytest.raises(train.NonFiniteLossError,
                     match=r"task 1, step 5 of \d+ \(global step 4"):
    train.run(_config(**{"debug.nan_at_step": 4, "train.log_every": 100}),
              workdir)
  metas = _metas(workdir)
  assert [(m["task"], m["task_step"]) for m in metas.values()] == [(0, 3)]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  # The same command without the poison resumes from the good checkpoint.
  resumed = train.run(_config(**{"train.log_every": 100}), workdir)
  # (log_every changes which steps feed the label diagnostics: compare the
  # evaluation only.)
  for key in ("map_seen", "map_per_task", "f1"):
    got = _flatten(resumed["tasks"][0][key])
    want = _flatten(reference[1]["tasks"][0][key])
    assert got.keys() == want.keys()
    for k in got:
      assert abs(got[k] - want[k]) <= 1e-6, (key, k)
