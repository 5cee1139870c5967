"""Task blocks and partial-label views."""

import numpy as np
import pytest

from rebll_jax import protocol
from rebll_jax.errors import UserError


@pytest.mark.parametrize("num_classes,base,inc,sizes", [
    (20, 0, 4, [4] * 5),
    (20, 10, 2, [10] + [2] * 5),
    (20, 5, 3, [5] + [3] * 5),
    (80, 0, 10, [10] * 8),
    (80, 40, 10, [40] + [10] * 4),
])
def test_blocks(num_classes, base, inc, sizes):
  blocks = protocol.task_blocks(num_classes, base, inc)
  assert [len(b) for b in blocks] == sizes
  np.testing.assert_array_equal(np.concatenate(blocks), np.arange(num_classes))


@pytest.mark.parametrize("base,inc", [(10, 3), (0, 3), (25, 5), (0, 0)])
def test_split_that_does_not_fit(base, inc):
  with pytest.raises(UserError, match="does not fit|must be"):
    protocol.task_blocks(20, base, inc)


def test_num_tasks_truncates():
  assert len(protocol.task_blocks(20, 0, 4, num_tasks=2)) == 2


def test_tasks_masks():
  tasks = protocol.make_tasks(20, 10, 2)
  t = tasks[2]
  assert t.current_mask[12:14].tolist() == [1, 1]
  assert t.current_mask.sum() == 2
  assert t.old_mask.sum() == 12 and t.old_mask[:12].all()
  assert t.seen_mask.sum() == 14


def test_partial_view_hides_other_blocks():
  labels = np.array([[1, 0, 1, 0],   # classes 0, 2
                     [0, 1, 0, 0],   # class 1
                     [0, 0, 1, 1],   # classes 2, 3
                     [0, 0, 0, 0]], np.uint8)
  view = protocol.partial_view(labels, [0, 1])
  np.testing.assert_array_equal(view.indices, [0, 1])
  np.testing.assert_array_equal(view.labels, [[1, 0, 0, 0], [0, 1, 0, 0]])
  np.testing.assert_array_equal(view.known[0], [True, True, False, False])
  view = protocol.partial_view(labels, [2, 3])
  np.testing.assert_array_equal(view.indices, [0, 2])
  # Image 0 holds class 0 too, but its label is unknown in this task (0 in y,
  # False in known), not a negative.
  np.testing.assert_array_equal(view.labels, [[0, 0, 1, 0], [0, 0, 1, 1]])
  assert not view.known[:, :2].any()


def test_b40_c10_views_on_80_fake_classes():
  rng = np.random.default_rng(0)
  labels = (rng.random((500, 80)) < 0.03).astype(np.uint8)
  tasks = protocol.make_tasks(80, 40, 10)
  assert len(tasks) == 5
  for task in tasks:
    view = protocol.partial_view(labels, task.classes)
    expected = np.flatnonzero(labels[:, task.classes].any(1))
    np.testing.assert_array_equal(view.indices, expected)
    outside = np.setdiff1d(np.arange(80), task.classes)
    assert view.labels[:, outside].sum() == 0
    np.testing.assert_array_equal(view.labels[:, task.classes],
                                  labels[expected][:, task.classes])


def test_validation_split_is_carved_from_train():
  from configs import test as test_config
  from rebll_jax import data
  cfg = test_config.get_config().data
  full = data.build_source(cfg)
  cfg.val_fraction = 0.25
  carved = data.build_source(cfg)
  assert len(carved.train) + len(carved.test) == len(full.train)
  assert len(carved.test) == round(0.25 * len(full.train))
  ids = set(carved.train.image_ids) | set(carved.test.image_ids)
  assert ids == set(full.train.image_ids)
  assert not set(carved.test.image_ids) & set(full.test.image_ids)
  row = 3
  original = int(np.flatnonzero(full.train.image_ids ==
                                carved.test.image_ids[row])[0])
  np.testing.assert_array_equal(carved.test.read_images(np.array([row])),
                                full.train.read_images(np.array([original])))
  np.testing.assert_array_equal(carved.test.labels[row],
                                full.train.labels[original])


# ---------------------------------------------------- crowd-only images --
# Four classes, two blocks {0, 1} and {2, 3}. crowd[i, c] = class c is on
# image i only as crowd boxes (never where labels[i, c] is set).
CROWD_LABELS = np.array([[1, 0, 0, 0],   # 0: class 0
                         [0, 0, 0, 0],   # 1: nothing
                         [0, 0, 1, 0],   # 2: class 2
                         [0, 0, 0, 0],   # 3: nothing (crowd 1 only)
                         [0, 0, 0, 0],   # 4: nothing (crowd 3 only)
                         [0, 1, 0, 0]],  # 5: class 1 (and crowd 2)
                        np.uint8)
CROWD = np.array([[0, 0, 0, 0],
                  [0, 0, 0, 0],
                  [0, 0, 0, 0],
                  [0, 1, 0, 0],
                  [0, 0, 0, 1],
                  [0, 0, 1, 0]], np.uint8)


def test_crowd_only_images_join_the_view_with_no_positive():
  plain = protocol.partial_view(CROWD_LABELS, [0, 1])
  np.testing.assert_array_equal(plain.indices, [0, 5])
  kept = protocol.partial_view(CROWD_LABELS, [0, 1], crowd_labels=CROWD)
  np.testing.assert_array_equal(kept.indices, [0, 3, 5])
  # Image 3 trains with known 0s on the block (the baseline's target there).
  np.testing.assert_array_equal(kept.labels[1], [0, 0, 0, 0])
  np.testing.assert_array_equal(kept.known[1], [True, True, False, False])
  np.testing.assert_array_equal(kept.labels[[0, 2]], plain.labels)
  # Block {2, 3}: image 4 (crowd 3 only) joins; image 5 holds class 2 only
  # as crowd too, so it joins this block's view with 0 on class 2.
  kept = protocol.partial_view(CROWD_LABELS, [2, 3], crowd_labels=CROWD)
  np.testing.assert_array_equal(kept.indices, [2, 4, 5])
  np.testing.assert_array_equal(kept.labels[:, 2:], [[1, 0], [0, 0], [0, 0]])
  # All-zero crowd labels change nothing.
  zeros = protocol.partial_view(CROWD_LABELS, [2, 3],
                                crowd_labels=np.zeros_like(CROWD))
  np.testing.assert_array_equal(
      zeros.indices, protocol.partial_view(CROWD_LABELS, [2, 3]).indices)


def test_scored_rows_after_each_task():
  np.testing.assert_array_equal(protocol.scored_rows(CROWD_LABELS, [0, 1]),
                                [0, 5])
  np.testing.assert_array_equal(
      protocol.scored_rows(CROWD_LABELS, [0, 1], CROWD), [0, 3, 5])
  np.testing.assert_array_equal(
      protocol.scored_rows(CROWD_LABELS, [0, 1, 2, 3], CROWD), [0, 2, 3, 4, 5])
  with pytest.raises(ValueError, match="crowd_labels has shape"):
    protocol.scored_rows(CROWD_LABELS, [0], CROWD[:3])


class _Split:
  """A split as the protocol reads it, with crowd labels (a Split after the
  crowd-label change, without depending on it)."""

  def __init__(self, labels, crowd=None):
    self.labels = labels
    if crowd is not None:
      self.crowd_labels = crowd

  def __len__(self):
    return len(self.labels)


def _source(name="synthetic", info=None, crowd=CROWD):
  split = _Split(CROWD_LABELS, crowd)
  return type("Source", (), {"name": name, "info": info or {},
                             "train": split, "test": split})()


def test_crowd_labels_are_read_only_when_the_protocol_keeps_them():
  keep = {"keep_crowd_only_images": True}
  source = _source()
  assert protocol.crowd_labels_of(source, "train", {}) is None
  assert protocol.crowd_labels_of(
      source, "train", {"keep_crowd_only_images": False}) is None
  np.testing.assert_array_equal(
      protocol.crowd_labels_of(source, "test", keep), CROWD)
  assert protocol.crowd_labels_of(_source(crowd=None), "train", keep) is None
  np.testing.assert_array_equal(
      protocol.train_view(source, [0, 1], keep).indices, [0, 3, 5])
  np.testing.assert_array_equal(
      protocol.train_view(source, [0, 1], {}).indices, [0, 5])
  np.testing.assert_array_equal(protocol.eval_rows(source, [2, 3], keep),
                                [2, 4, 5])


def test_keeping_crowd_only_images_of_coco_prepared_without_them_fails():
  keep = {"keep_crowd_only_images": True}
  old = _source("coco2014", {"path": "/data/rebll_coco2014/1.0.0"},
                crowd=np.zeros_like(CROWD))
  with pytest.raises(UserError, match="records no crowd boxes.*--overwrite"):
    protocol.train_view(old, [0, 1], keep)
  assert protocol.crowd_labels_of(old, "train", {}) is None  # default: fine
  recorded = _source("coco_format", {protocol.CROWD_RECORDED: {"train": 2}})
  np.testing.assert_array_equal(
      protocol.train_view(recorded, [0, 1], keep).indices, [0, 3, 5])


def test_evaluate_scores_the_crowd_only_test_images_when_kept():
  from rebll_jax import evaluation

  class Recorder:  # a Predictor that records the rows it is asked for
    rows = None

    def predict_split(self, variables, split, indices):
      Recorder.rows = np.asarray(indices)
      scores = np.linspace(0.1, 0.9, len(indices) * 4).reshape(-1, 4)
      return scores, None

  source = _source()
  tasks = protocol.make_tasks(4, 0, 2)
  for protocol_cfg, rows in ((None, [0, 5]),
                             ({"keep_crowd_only_images": False}, [0, 5]),
                             ({"keep_crowd_only_images": True}, [0, 3, 5])):
    out = evaluation.evaluate(Recorder(), None, source, tasks[0], tasks, 0.8,
                              protocol_cfg=protocol_cfg)
    np.testing.assert_array_equal(Recorder.rows, rows)
    assert np.isfinite(out["map_seen"])


# ------------------------------------------------------- the one switch --
# Issue 11's table, the baseline's value of every row (synthetic and COCO
# dedup by image id; VOC does not).
FIELD_ROWS = {
    "protocol.memory_future_labels": "ground_truth",
    "protocol.keep_crowd_only_images": True,
    "augment.policy": "field", "augment.flip": False, "augment.cutout": 0.5,
    "augment.cutout_fill": "random", "optim.name": "adam",
    "optim.schedule": "one_cycle", "optim.warmup_frac": 0.2,
    "optim.weight_decay": 1e-4, "optim.cycle_beta1": True,
    "memory.selection": "herding_icarl", "eval.threshold": 0.8,
    "data.normalize": False, "model.head_rows": "fresh",
    "train.last_batch": "keep", "optim.loss_scale": "torch_fp16",
}


def _flat(config, prefix=""):
  out = {}
  for key in config.keys():
    value = config[key]
    if hasattr(value, "keys"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.mark.parametrize("module,setting,dedup", [
    ("coco", "b0c10", True), ("coco", "b40c10", True), ("voc", "b0c4", False),
    ("voc", "b10c2", False), ("coco_format", "b0c10", True),
    ("synthetic", "b0c4", True), ("synthetic", "b10c2", True)])
def test_field_settings_set_every_row_and_only_those(module, setting, dedup):
  import importlib
  configs = importlib.import_module(f"configs.{module}")
  ours, field = (_flat(configs.get_config(setting)),
                 _flat(configs.get_config(setting + "_field")))
  expected = dict(FIELD_ROWS, **{
      "memory.dedup": dedup,
      # The shipped COCO / VOC scripts run 2 processes of 64 rows.
      "train.ddp_processes": 1 if module == "synthetic" else 2})
  for key, value in expected.items():
    assert field[key] == value, key
  changed = {k for k in ours if ours[k] != field[k]}
  assert changed <= set(expected), changed - set(expected)
  # Our defaults: today's protocol (METHOD.md's) and our augmentation.
  assert ours["protocol.memory_future_labels"] == "unknown"
  assert ours["protocol.keep_crowd_only_images"] is False
  assert ours["augment.policy"] == "ours" and ours["memory.dedup"] is True


def test_field_setting_names():
  from configs import synthetic
  from rebll_jax import config_base
  assert config_base.field_setting(None, "b0c4") == ("b0c4", False)
  assert config_base.field_setting("b10c2_field", "b0c4") == ("b10c2", True)
  with pytest.raises(ValueError, match="b0c4_field"):
    synthetic.get_config("joint_field")
  with pytest.raises(ValueError, match="dataset must be one of"):
    config_base.apply_field_recipe(config_base.base_config(), "imagenet")
