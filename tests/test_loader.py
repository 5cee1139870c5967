"""Deterministic batch assembly: new rows mixed with replay rows."""

import numpy as np

from rebll_jax import protocol
from rebll_jax.data import field_augment
from rebll_jax.data.base import Split
from rebll_jax.data.loader import MemoryRows, TaskBatches, eval_batches


def _split(n=40, c=6):
  rng = np.random.default_rng(0)
  labels = (rng.random((n, c)) < 0.4).astype(np.uint8)
  labels[np.arange(n), rng.integers(0, c, n)] = 1
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 2, 2, 3), np.uint8)  # pixel value = row index
  return Split(labels=labels, image_ids=np.arange(n) + 100,
               read_images=lambda idx: images[np.asarray(idx)])


def _memory(m=6, c=6, size=2):
  images = (200 + np.arange(m, dtype=np.uint8))[:, None, None, None] * \
      np.ones((1, size, size, 3), np.uint8)
  return MemoryRows(images=images, labels=np.ones((m, c), np.float32),
                    known=np.ones((m, c), bool),
                    true_labels=np.ones((m, c), np.uint8))


def _batches(mix="uniform", memory=None, batch=8, local=slice(0, 8)):
  split = _split()
  view = protocol.partial_view(split.labels, [0, 1, 2])
  return split, view, TaskBatches(
      split=split, view=view, memory=memory or _memory(), global_batch=batch,
      local_rows=local, seed=3, task=1, mix=mix, fraction=0.25)


def test_batches_are_a_function_of_step():
  _, _, a = _batches()
  _, _, b = _batches()
  for step in (0, 3, 11):
    for key, value in a.batch(step).items():
      np.testing.assert_array_equal(value, b.batch(step)[key])
  assert not np.array_equal(a.batch(0)["images"], a.batch(1)["images"])


def test_rows_carry_their_labels_and_view():
  split, view, batches = _batches()
  batch = batches.batch(2)
  for i in range(8):
    pixel = int(batch["images"][i, 0, 0, 0])
    if batch["is_memory"][i]:
      assert pixel >= 200 and batch["known"][i].all()
    else:
      row = int(np.flatnonzero(view.indices == pixel)[0])
      np.testing.assert_array_equal(batch["labels"][i], view.labels[row])
      np.testing.assert_array_equal(batch["known"][i], view.known[row])
      np.testing.assert_array_equal(batch["true_labels"][i],
                                    split.labels[pixel])


def test_uniform_epoch_visits_each_row_once():
  _, view, batches = _batches()
  seen = []
  for step in range(batches.steps_per_epoch):
    seen += batches.batch(step)["images"][:, 0, 0, 0].tolist()
  total = len(view) + 6
  assert batches.steps_per_epoch == total // 8
  assert len(set(seen)) == len(seen)  # no repeats within an epoch


def test_fraction_mix_takes_a_fixed_share_from_memory():
  _, _, batches = _batches(mix="fraction")
  for step in range(5):
    assert batches.batch(step)["is_memory"].sum() == 2  # round(0.25 * 8)


def test_local_rows_partition_the_global_batch():
  _, _, full = _batches()
  halves = [_batches(local=slice(0, 4))[2], _batches(local=slice(4, 8))[2]]
  joined = np.concatenate([h.batch(5)["images"] for h in halves])
  np.testing.assert_array_equal(joined, full.batch(5)["images"])


def test_prefetching_iterator_matches_direct_batches():
  _, _, batches = _batches()
  got = list(batches.iterate(2, 6, prefetch=2))
  assert [s for s, _ in got] == [2, 3, 4, 5]
  for step, batch in got:
    np.testing.assert_array_equal(batch["images"],
                                  batches.batch(step)["images"])


def test_eval_batches_pad_the_last_chunk():
  split = _split()
  chunks = list(eval_batches(split, np.arange(10), 4))
  assert [valid for _, valid in chunks] == [4, 4, 2]
  assert all(images.shape[0] == 4 for images, _ in chunks)


def _image_split(n=40, c=6, size=12):
  rng = np.random.default_rng(1)
  labels = (rng.random((n, c)) < 0.4).astype(np.uint8)
  labels[np.arange(n), rng.integers(0, c, n)] = 1
  images = rng.integers(0, 256, (n, size, size, 3), np.uint8)
  return Split(labels=labels, image_ids=np.arange(n) + 100,
               read_images=lambda idx: images[np.asarray(idx)])


def test_host_augment_in_the_loader_is_deterministic_and_slice_consistent():
  split = _image_split()
  view = protocol.partial_view(split.labels, [0, 1, 2])
  aug = field_augment.HostAugment()

  def batches(local, host_augment=aug):
    return TaskBatches(split=split, view=view, memory=_memory(size=12),
                       global_batch=8, local_rows=local, seed=3, task=1,
                       host_augment=host_augment)

  full, raw = batches(slice(0, 8)), batches(slice(0, 8), None)
  a = full.batch(5)
  np.testing.assert_array_equal(a["images"], batches(slice(0, 8)).batch(5)[
      "images"])  # a function of the step: resume rebuilds it
  plain = raw.batch(5)
  for key in ("labels", "known", "is_memory", "true_labels"):
    np.testing.assert_array_equal(a[key], plain[key])
  # Each row is its raw image through the transform keyed by its global row.
  for row in range(8):
    np.testing.assert_array_equal(
        a["images"][row],
        aug.one(plain["images"][row], seed=3, task=1, step=5, row=row))
  changed = [not np.array_equal(x, y)
             for x, y in zip(a["images"], plain["images"])]
  assert sum(changed) >= 6  # cutout alone changes nearly every image
  # Two hosts' slices are the one-host batch, cut.
  halves = [batches(slice(0, 4)).batch(5)["images"],
            batches(slice(4, 8)).batch(5)["images"]]
  np.testing.assert_array_equal(np.concatenate(halves), a["images"])
  # The prefetching producer yields the same batches.
  for step, batch in full.iterate(4, 7, prefetch=2):
    np.testing.assert_array_equal(batch["images"],
                                  full.batch(step)["images"])
  assert not np.array_equal(full.batch(6)["images"], a["images"])


def test_a_task_shorter_than_a_batch_says_it_repeats_rows():
  # A task smaller than one batch wraps its permutation: rows repeat inside
  # a batch, which the PyTorch baseline (one short batch) never does. The
  # run logs this note; it was silent.
  _, view, batches = _batches(batch=8)
  assert batches.wrap_note() is None
  _, view, short = _batches(batch=64, local=slice(0, 64))
  total = len(view) + 6
  assert total < 64
  assert short.wrap_note() == (
      f"task 2 has {total} rows for a batch of 64: each batch repeats some "
      "rows (a smaller train.global_batch avoids it)")
  rows = short.batch(0)["images"][:, 0, 0, 0]
  assert len(set(rows.tolist())) == total < len(rows)  # all, with repeats
  _, _, few_memory = _batches(mix="fraction", memory=_memory(m=1), batch=16,
                              local=slice(0, 16))
  assert few_memory.wrap_note() == (
      "task 2 has 1 memory rows for 4 per batch: each batch repeats some "
      "rows (a smaller train.global_batch avoids it)")
