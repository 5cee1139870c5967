"""Checkpoint faults and non-finite losses, in process on 8 CPU devices.

One uninterrupted run of task 1 of configs/test.py (7 or 8 steps, a mid-task
save every 3) is the reference; the faults are made on copies of its workdir.
"""

import errno
import gc
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest

from rebll_jax import checkpoint, errors, preemption, train
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


# Orbax's other reads of the damaged checkpoint fail later in its threads
# ("Event loop is closed" through sys.unraisablehook): silenced, so an error.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
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
  gc.collect()  # asyncio reports an unawaited failed task when it is freed
  assert f"checkpoint {newest}" in caplog.text
  # One warning, not a traceback per array orbax was still reading.
  assert "never retrieved" not in caplog.text, caplog.text[:2000]
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


# --- a disk that fills up during a save -----------------------------------

# What tensorstore raises inside orbax's writer threads on a full disk
# (measured on a 2 MiB tmpfs).
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local '
    'file "/x/2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/": Failed '
    'writing: "/x/d/25c7": Failed to write 201216 bytes to file 14: No space '
    "left on device [os_error_code='28']")


def fill_disk(set_attribute=setattr):
  """Makes orbax's array writes fail with tensorstore's ENOSPC, on both of
  its paths: device arrays (several processes) and host arrays (one
  process: ``checkpoint._on_host``)."""
  from orbax.checkpoint._src.serialization import serialization, type_handlers  # pylint: disable=g-import-not-at-top,line-too-long

  def full(array):
    raise ValueError(TENSORSTORE_ENOSPC)

  async def full_write(self, value, tspec, ts_context):
    raise ValueError(TENSORSTORE_ENOSPC)
  set_attribute(serialization, "estimate_write_memory_footprint", full)
  set_attribute(type_handlers.NumpyHandler, "_open_and_write", full_write)


def _array_writer_fills_disk(monkeypatch):
  fill_disk(monkeypatch.setattr)


def _json_writer_fills_disk(monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as h  # pylint: disable=g-import-not-at-top

  async def full(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(h.JsonCheckpointHandler, "_save_fn", full)


@pytest.mark.parametrize("inject", [_array_writer_fills_disk,
                                    _json_writer_fills_disk],
                         ids=["arrays", "metadata"])
def test_disk_full_mid_save_is_one_error_previous_intact(
    tmp_path, monkeypatch, caplog, capfd, inject):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  trees = [{"a": jnp.arange(64.0) + i, "b": jnp.ones((3, 5)) * i}
           for i in range(3)]
  for i in range(2):
    assert ckpt.save(trees[i], {"i": i}) == i
  capfd.readouterr()
  with monkeypatch.context() as patch:
    inject(patch)
    with caplog.at_level(logging.DEBUG), pytest.raises(
        errors.NoSpaceError) as error:
      ckpt.save(trees[2], {"i": 2})
  assert str(error.value) == ("no space left on device while saving "
                              "checkpoint 2; free space and rerun to resume")
  # Nothing logged or printed by orbax's threads; no half-written folder;
  # the previous checkpoint is the newest and restores exactly.
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert capfd.readouterr().err == ""
  assert ckpt.steps() == [0, 1]
  assert sorted(os.listdir(str(tmp_path))) == ["0", "1"]
  restored, meta = ckpt.restore_latest(trees[0])
  assert meta["i"] == 1
  np.testing.assert_array_equal(restored["a"], trees[1]["a"])
  # Space freed: the same save goes through.
  assert ckpt.save(trees[2], {"i": 2}) == 2
  ckpt.close()


def test_save_that_cannot_fit_stops_before_writing(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda path: usage._replace(free=4096))
  with pytest.raises(errors.NoSpaceError, match="saving checkpoint 0;"):
    ckpt.save({"w": np.zeros(1 << 16, np.float32)}, {})
  assert os.listdir(str(tmp_path)) == []
  ckpt.close()


def test_is_no_space_looks_through_wrappers():
  assert checkpoint.is_no_space(ValueError(TENSORSTORE_ENOSPC))
  assert checkpoint.is_no_space(OSError(errno.EDQUOT, "quota"))
  try:
    try:
      raise OSError(errno.ENOSPC, "full")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert checkpoint.is_no_space(outer)
  assert checkpoint.is_no_space(ExceptionGroup(
      "writes", [ValueError("x"), OSError(errno.ENOSPC, "full")]))
  assert not checkpoint.is_no_space(OSError(errno.EACCES, "denied"))
  assert not checkpoint.is_no_space(ValueError("RESOURCE_EXHAUSTED: memory"))


_FULL_DISK_RUN = """
import sys
import types
import jax.numpy as jnp
from rebll_jax import checkpoint, main, train
from tests.test_faults import fill_disk

def run(config, workdir, setting=None):  # third save meets a full disk
  ckpt = checkpoint.Checkpointer(workdir + "/checkpoints")
  for i in range(3):
    if i == 2:
      fill_disk()
    ckpt.save({"w": jnp.arange(256.0) + i}, {"i": i})

train.run = run
sys.argv = ["main", "--config=configs/test.py", "--workdir=" + sys.argv[1]]
main.run()
"""


def test_cli_disk_full_is_one_line_exit_1(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_FULL_DISK_RUN)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, str(script), str(tmp_path / "w")], cwd=root,
      env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr == ("error: no space left on device while saving "
                           "checkpoint 2; free space and rerun to resume\n")
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["0", "1"]


def test_save_hands_orbax_host_arrays_restore_puts_them_back(tmp_path,
                                                             monkeypatch):
  """Single process: one batched copy to numpy before orbax (no per-array
  replica slicing); the restore puts each array back on the target's
  devices, bit for bit."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rebll_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(2)
  tree = parallel.replicate(mesh, {
      "w": jnp.arange(12., dtype=jnp.float32).reshape(3, 4) / 7,
      "step": jnp.asarray(7, jnp.int32), "mask": jnp.array([True, False])})
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  handed = []
  save = ckpt.manager.save
  monkeypatch.setattr(ckpt.manager, "save", lambda number, args: (
      handed.append(args["state"].item), save(number, args=args))[1])
  ckpt.save(tree, {"i": 1})
  assert handed and all(isinstance(leaf, np.ndarray)
                        for leaf in jax.tree.leaves(handed[0]))
  restored, meta = ckpt.restore_latest(tree)
  ckpt.close()
  assert meta["i"] == 1 and meta["checksum"] == checkpoint.checksum(tree)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert isinstance(got, jax.Array) and got.sharding == want.sharding
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def _unraisable(error):
  return types.SimpleNamespace(exc_type=type(error), exc_value=error,
                               exc_traceback=None, err_msg=None, object=None)


def test_held_logs_silence_only_the_aftermath_and_keep_the_hook_chain(
    monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  with checkpoint._HeldLogs() as held:  # pylint: disable=protected-access
    sys.unraisablehook(_unraisable(ValueError("while held")))
  assert sys.unraisablehook == seen.append and not seen  # restored as it was
  held.replay()
  assert [str(u.exc_value) for u in seen] == ["while held"]

  with checkpoint._HeldLogs() as held:  # pylint: disable=protected-access
    held.silence_aftermath = True
  assert sys.unraisablehook != seen.append
  sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
  sys.unraisablehook(_unraisable(ValueError(TENSORSTORE_ENOSPC)))
  sys.unraisablehook(_unraisable(KeyError("anything else")))
  # The aftermath is dropped; anything else still reaches the old hook.
  assert [str(u.exc_value) for u in seen] == ["while held",
                                              "'anything else'"]
  for name in ("asyncio", "absl"):
    filters = logging.getLogger(name).filters
    assert any(isinstance(f, checkpoint._DropAbandonedIoNoise)  # pylint: disable=protected-access
               for f in filters)
    assert not any(isinstance(f, checkpoint._HeldLogs) for f in filters)  # pylint: disable=protected-access


def test_mid_task_resume_refuses_another_schedule_for_that_task(tmp_path):
  # epochs_later / lr_later may change on resume, but not halfway through
  # the task they shape: fewer epochs once stopped the task at once and
  # reported steps it never trained (exit 0).
  workdir = str(tmp_path)
  start = {"protocol.num_tasks": 2, "train.epochs_later": 3,
           "train.checkpoint_every": 2}
  with pytest.raises(train.NonFiniteLossError, match="task 2"):
    train.run(_config(**start, **{"debug.nan_at_step": 11}), workdir)
  metas = _metas(workdir)
  task, task_step = max((m["task"], m["task_step"]) for m in metas.values())
  assert task == 1 and task_step > 0  # a checkpoint inside task 2
  for change, old in (({"train.epochs_later": 1}, "train.epochs_later=3"),
                      ({"optim.lr_later": 0.1}, "optim.lr_later=0.001")):
    with pytest.raises(UserError) as error:
      train.run(_config(**{**start, **change}), workdir)
    message = str(error.value)
    assert f"middle of task 2 (step {task_step})" in message, message
    assert old in message and "--config.protocol.num_tasks=2" in message
  # Fewer tasks than the one in progress (the original command after an
  # interrupted extension): it said "complete" and recorded the stopped
  # process's values (num_tasks, epochs_later, debug faults) as the run's.
  with pytest.raises(UserError, match=f"stopped in the middle of task 2 "
                     rf"\(step {task_step}\); protocol.num_tasks=1"):
    train.run(_config(**{**start, "protocol.num_tasks": 1}), workdir)
  assert _metas(workdir) == metas  # refused before anything changed


def test_sigterm_at_a_tasks_last_step_saves_and_resumes(tmp_path, reference):
  # The stop lands on the task's last step: the save holds the whole task
  # trained but not yet evaluated; the resume evaluates it and ends with the
  # uninterrupted run's results. (Random mid-task steps, through the CLI:
  # tests/test_resume.py.)
  steps = reference[1]["tasks"][0]["train_steps"]
  workdir = str(tmp_path)
  previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
  try:
    with pytest.raises(preemption.Preempted,
                       match=f"at task 1, step {steps} of {steps};"):
      train.run(_config(**{"debug.term_at_step": steps - 1,
                           "train.checkpoint_every": 0}), workdir)
  finally:
    signal.signal(signal.SIGTERM, previous)
  (meta,) = _metas(workdir).values()
  assert (meta["task"], meta["task_step"]) == (0, steps)
  _assert_same(train.run(_config(), workdir), reference[1])
