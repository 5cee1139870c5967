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
