"""protocol.memory_future_labels: replay labels widened with ground truth.

A hand-made buffer against an entry-by-entry loop written from the rule
(issue 11): before task t, every stored row's entries on the blocks of tasks
s..t (s = the task that stored it) become ground truth; then one end-to-end
run, whose widened entries must equal the hidden ground truth, stay marked
ground truth, and survive both relabel passes.
"""

import numpy as np
import pytest

from rebll_jax import memory, protocol, relabel, replay
from tests.helpers import make_config

C = 6  # three blocks of two classes
TASKS = protocol.make_tasks(C, 0, 2)


def _truth(n=8, seed=0):
  return (np.random.default_rng(seed).random((n, C)) < 0.5).astype(np.uint8)


def _buffer(truth):
  """Rows stored in tasks 0, 0, 1, 2 (slots 0, 1, 3, 4; 2 and 5 empty),
  each with ground truth on its own block and a relabeled (not ground
  truth) guess on older blocks, as rebll stores them."""
  mem = memory.empty(6, (2, 2, 3), C)
  stored = [(0, 5, 0), (1, 2, 0), (3, 7, 1), (4, 1, 2)]  # slot, row, task
  for slot, row, task in stored:
    own = TASKS[task].current_mask.astype(bool)
    older = TASKS[task].old_mask.astype(bool)
    mem.labels[slot] = np.where(own, truth[row], 0)
    mem.labels[slot, older] = 1 - truth[row, older]  # wrong on purpose
    mem.known[slot] = own | older
    mem.ground_truth[slot] = own
    mem.valid[slot] = True
    mem.task[slot] = task
    mem.source_index[slot] = row
    mem.image_id[slot] = 100 + row
  return mem


def _expected(mem, truth, t):
  """The rule, entry by entry."""
  labels, known, gt = (mem.labels.copy(), mem.known.copy(),
                       mem.ground_truth.copy())
  block = {int(c): task.index for task in TASKS for c in task.classes}
  for i in range(mem.capacity):
    if not mem.valid[i]:
      continue
    for c in range(C):
      if mem.task[i] <= block[c] <= t:
        labels[i, c] = truth[mem.source_index[i], c]
        known[i, c] = gt[i, c] = True
  return labels, known, gt


@pytest.mark.parametrize("t", [0, 1, 2])
def test_widen_labels_equals_the_rule(t):
  truth = _truth()
  mem = _buffer(truth)
  before = memory.to_state(mem)
  out = replay.widen_labels(mem, truth, task=TASKS[t], tasks=TASKS)
  labels, known, gt = _expected(mem, truth, t)
  np.testing.assert_array_equal(out.labels, labels)
  np.testing.assert_array_equal(out.known, known)
  np.testing.assert_array_equal(out.ground_truth, gt)
  # Pure (the input is untouched), idempotent, nothing else changes.
  for name, value in memory.to_state(mem).items():
    np.testing.assert_array_equal(value, before[name])
  again = replay.widen_labels(out, truth, task=TASKS[t], tasks=TASKS)
  for name, value in memory.to_state(again).items():
    np.testing.assert_array_equal(value, memory.to_state(out)[name])
  for name in ("images", "valid", "task", "image_id", "source_index", "rank"):
    np.testing.assert_array_equal(getattr(out, name), getattr(mem, name))


def test_widen_before_task_3_by_hand():
  truth = np.zeros((8, C), np.uint8)
  truth[5] = [1, 0, 1, 1, 0, 1]
  mem = _buffer(truth)
  out = replay.widen_labels(mem, truth, task=TASKS[2], tasks=TASKS)
  # Slot 0 (row 5, task 0): every block is its own or later -> all truth.
  np.testing.assert_array_equal(out.labels[0], [1, 0, 1, 1, 0, 1])
  assert out.ground_truth[0].all()
  # Slot 4 (task 2): older blocks keep their relabeled guesses.
  np.testing.assert_array_equal(out.labels[4, :4], 1 - truth[1, :4])
  assert not out.ground_truth[4, :4].any()
  # Empty slots stay empty.
  assert not out.known[[2, 5]].any() and not out.labels[[2, 5]].any()
  # Before task 2 (index 1) nothing of block 3 is visible yet.
  mid = replay.widen_labels(mem, truth, task=TASKS[1], tasks=TASKS)
  assert not mid.known[0, 4:].any()


def test_classes_outside_the_run_are_never_widened():
  truth = _truth()
  mem = _buffer(truth)
  tasks = protocol.make_tasks(C, 0, 2, num_tasks=2)  # block 3 never trains
  out = replay.widen_labels(mem, truth, task=tasks[1], tasks=tasks)
  np.testing.assert_array_equal(out.known[:, 4:], mem.known[:, 4:])


def test_widened_entries_survive_both_relabel_passes():
  truth = _truth()
  t = TASKS[2]
  mem = replay.widen_labels(_buffer(truth), truth, task=t, tasks=TASKS)
  rows = np.flatnonzero(mem.valid)
  current = t.current_mask
  # Online: memory rows' current block, a model that says the opposite.
  probs = 1.0 - mem.labels[rows]
  labels, known = relabel.relabel_memory_rows(
      labels=mem.labels[rows], known=mem.known[rows], probs=probs,
      current_class_mask=current, row_is_memory=np.ones(rows.size, bool),
      tau_cur=0.5, active=True)
  np.testing.assert_array_equal(np.asarray(labels), mem.labels[rows])
  np.testing.assert_array_equal(np.asarray(known), mem.known[rows])
  # Between tasks: the write mask replay.after_task builds.
  write = (current.astype(bool)[None, :] & (mem.task < t.index)[:, None]
           & ~mem.ground_truth)
  assert not (write & mem.valid[:, None]).any()


def test_before_task_default_is_a_no_op_and_unknown_values_fail():
  truth = _truth()
  mem = _buffer(truth)
  source = type("S", (), {"train": type("T", (), {"labels": truth})()})()
  config = make_config()
  assert replay.before_task(mem, config=config, source=source, task=TASKS[2],
                            tasks=TASKS) is mem
  widened = replay.before_task(
      mem, config=make_config(**{"protocol.memory_future_labels":
                                 "ground_truth"}),
      source=source, task=TASKS[2], tasks=TASKS)
  np.testing.assert_array_equal(widened.labels, _expected(mem, truth, 2)[0])
  with pytest.raises(ValueError, match="memory_future_labels"):
    replay.before_task(mem, config=make_config(
        **{"protocol.memory_future_labels": "truth"}), source=source,
                       task=TASKS[2], tasks=TASKS)


def test_config_check_names_the_valid_values():
  from rebll_jax import validate
  from rebll_jax.errors import UserError
  with pytest.raises(UserError, match="protocol.memory_future_labels"):
    validate.check_config(make_config(
        **{"protocol.memory_future_labels": "future"}))


# ------------------------------------------------------------ end to end --

def crowd_source(config, seed=3, rate=0.06):
  """The synthetic source of ``config`` with made-up crowd-only labels:
  each (image, class) without a label is crowd-only with prob ``rate``."""
  import dataclasses
  from rebll_jax import data

  @dataclasses.dataclass(frozen=True)
  class CrowdSplit:  # a Split with crowd labels, whichever Split is merged
    labels: np.ndarray
    image_ids: np.ndarray
    read_images: object
    crowd_labels: np.ndarray

    def __len__(self):
      return int(self.labels.shape[0])

  source = data.build_source(config.data)
  rng = np.random.default_rng(seed)
  splits = {}
  for name in ("train", "test"):
    split = getattr(source, name)
    crowd = ((rng.random(split.labels.shape) < rate)
             & (split.labels == 0)).astype(np.uint8)
    splits[name] = CrowdSplit(split.labels, split.image_ids,
                              split.read_images, crowd)
  return dataclasses.replace(source, **splits)


def test_run_widens_replay_labels_and_keeps_crowd_only_images(
    tmp_path, monkeypatch):
  from rebll_jax import train, validate
  config = make_config(**{"protocol.memory_future_labels": "ground_truth",
                          "protocol.keep_crowd_only_images": True,
                          "train.checkpoint_every": 0, "num_devices": 1,
                          "train.label_diagnostics": False})
  source = crowd_source(config)
  monkeypatch.setattr(validate, "build_source", lambda cfg: source)
  widened, replayed, after = {}, {}, {}
  real_widen, real_rows, real_after = (replay.widen_labels,
                                       replay.visible_rows, replay.after_task)

  def spy_widen(mem, train_labels, *, task, tasks):
    out = real_widen(mem, train_labels, task=task, tasks=tasks)
    widened[task.index] = out
    return out

  def spy_rows(mem, src):
    replayed[len(replayed)] = mem
    return real_rows(mem, src)

  def spy_after(mem, **kwargs):
    out = real_after(mem, **kwargs)
    after[kwargs["task"].index] = out[0]
    return out

  monkeypatch.setattr(replay, "widen_labels", spy_widen)
  monkeypatch.setattr(replay, "visible_rows", spy_rows)
  monkeypatch.setattr(replay, "after_task", spy_after)
  results = train.run(config, str(tmp_path))

  truth = source.train.labels
  tasks = protocol.make_tasks(source.num_classes, 0, 4, num_tasks=3)
  block = np.full(source.num_classes, 99)
  for task in tasks:
    block[task.classes] = task.index
  for t in (1, 2):
    mem = widened[t]
    assert replayed[t] is mem  # the loader replays the widened buffer
    rows = np.flatnonzero(mem.valid)
    assert rows.size
    visible = ((block[None, :] >= mem.task[rows, None])
               & (block[None, :] <= t))
    assert visible[:, tasks[t].classes].all()
    hidden = truth[mem.source_index[rows]]
    np.testing.assert_array_equal(mem.labels[rows][visible], hidden[visible])
    assert mem.known[rows][visible].all()
    assert mem.ground_truth[rows][visible].all()
    # Older blocks keep what the past model said (not ground truth).
    assert not mem.ground_truth[rows][block[None, :] < mem.task[rows, None]
                                      ].any()
  # After the last task the between-task pass left the widened block alone.
  final = after[2]
  old = np.flatnonzero(final.valid & (final.task < 2))
  assert old.size
  cols = tasks[2].classes
  np.testing.assert_array_equal(final.labels[np.ix_(old, cols)],
                                truth[final.source_index[old]][:, cols])
  assert final.ground_truth[np.ix_(old, cols)].all()
  # Crowd-only images train in their tasks.
  for task, row in zip(tasks, results["tasks"]):
    held = (truth | source.train.crowd_labels)[:, task.classes].any(axis=1)
    assert row["num_train_images"] == int(held.sum())
    assert row["num_train_images"] > int(
        truth[:, task.classes].any(axis=1).sum())
