"""Tests of rebll_jax.memory (host-side replay buffer)."""

import numpy as np
import pytest

from rebll_jax import memory

C = 6
SHAPE = (4, 4, 3)


def _plain_herding(features, k):
  """Herding as CIL code usually writes it: delete picked rows each step."""
  x = features / np.linalg.norm(features, axis=1, keepdims=True)
  mu = x.mean(axis=0)
  remaining = list(range(len(x)))
  chosen = []
  for step in range(1, min(k, len(x)) + 1):
    s = sum((x[i] for i in chosen), np.zeros_like(mu))
    best, best_d = None, np.inf
    for i in remaining:
      d = np.sqrt(((mu - (x[i] + s) / step)**2).sum())
      if d < best_d:
        best, best_d = i, d
    chosen.append(best)
    remaining.remove(best)
  return np.array(chosen)


def _plain_icarl_herding(features, m):
  """The iCaRL code's herding as described: a running target, repeats."""
  n = len(features)
  cols = features.T / (np.sqrt((features.T ** 2).sum(axis=0)) + 1e-8)
  mu = cols.mean(axis=1)
  w = mu.copy()
  first_pick = {}  # row -> order of its first pick
  iterations = 0
  while len(first_pick) < min(m, n) and iterations < 1000:
    scores = [float(np.dot(w, cols[:, j])) for j in range(n)]
    best = max(range(n), key=lambda j: (scores[j], -j))  # ties: lowest j
    iterations += 1
    if best not in first_pick:
      first_pick[best] = len(first_pick)
    w = w + mu - cols[:, best]
  order = sorted(first_pick, key=first_pick.get)
  order += [j for j in range(n) if j not in first_pick]  # never picked
  return np.array(order[:min(m, n)], np.int64)


def _rows(ids, task, cls_ranks, gt_cols):
  """Incoming rows for ``add``: images encode the id, labels 1 on gt_cols."""
  n = len(ids)
  images = np.broadcast_to(np.asarray(ids, np.uint8)[:, None, None, None],
                           (n, *SHAPE)).copy()
  labels = np.zeros((n, C), np.float32)
  known = np.zeros((n, C), bool)
  known[:, gt_cols] = True
  labels[:, gt_cols] = 1.0
  ranks = np.full((n, C), -1, np.int32)
  for c, rk in cls_ranks.items():
    ranks[:, c] = rk
  return dict(images=images, labels=labels, known=known,
              ground_truth=known.copy(), task=task,
              image_id=np.asarray(ids, np.int64),
              source_index=np.asarray(ids, np.int64) + 100, ranks=ranks)


def test_capacity():
  assert memory.capacity_for(num_classes=80, per_class=20) == 1600
  assert memory.capacity_for(num_classes=20, per_class=2, total=1000) == 1000
  with pytest.raises(ValueError):
    memory.capacity_for(num_classes=20)
  # No buffer can hold more rows than the training images can fill.
  assert memory.capacity_for(num_classes=20, per_class=2,
                             num_images=240) == 40  # under the cap
  assert memory.capacity_for(num_classes=20, per_class=100000,
                             num_images=240) == 240
  assert memory.capacity_for(num_classes=20, total=10**9,
                             num_images=240) == 240
  assert memory.capacity_for(num_classes=20, per_class=100000,
                             num_images=240, dedup=False) == 240 * 20
  mem = memory.empty(12, SHAPE, C)
  assert mem.capacity == 12 and mem.size == 0 and mem.num_classes == C
  assert mem.images.dtype == np.uint8 and mem.images.shape == (12, *SHAPE)


def test_quotas_growing_and_fixed_total():
  q = memory.class_quotas([0, 1, 2], num_classes=C, per_class=20)
  np.testing.assert_array_equal(q, [20, 20, 20, 0, 0, 0])
  q = memory.class_quotas([0, 1, 2, 3], num_classes=C, per_class=20, total=10)
  np.testing.assert_array_equal(q, [3, 3, 2, 2, 0, 0])
  assert q.sum() == 10
  # Remainder goes to the earliest *learned* classes, not the lowest index.
  q = memory.class_quotas([5, 4, 0], num_classes=C, total=7)
  np.testing.assert_array_equal(q, [2, 0, 0, 0, 2, 3])
  np.testing.assert_array_equal(memory.class_quotas([], num_classes=C),
                                np.zeros(C))


def test_herding_equals_plain_numpy_herding():
  rng = np.random.default_rng(0)
  for n, d, k in [(15, 4, 5), (30, 8, 30), (7, 3, 12), (40, 16, 10)]:
    f = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=(n, 1))
    got = memory.herding(f, k)
    np.testing.assert_array_equal(got, _plain_herding(f, k))
    assert len(set(got.tolist())) == len(got) == min(n, k)
  assert memory.herding(rng.normal(size=(5, 3)), 0).size == 0


def test_herding_icarl_equals_plain_loop():
  rng = np.random.default_rng(2)
  differs = 0
  for n, d, k in [(15, 4, 5), (30, 8, 30), (7, 3, 12), (40, 16, 10),
                  (25, 2, 20)]:
    f = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=(n, 1))
    got = memory.herding_icarl(f, k)
    np.testing.assert_array_equal(got, _plain_icarl_herding(f, k))
    assert len(set(got.tolist())) == len(got) == min(n, k)
    differs += not np.array_equal(got, memory.herding(f, k))
  assert differs  # not the no-repeat herding under another name
  assert memory.herding_icarl(rng.normal(size=(5, 3)), 0).size == 0


def test_herding_icarl_ties_and_rows_never_picked():
  # Rows 3..5 repeat rows 0..2: argmax always takes the lower index, so the
  # copies are never picked and fill the selection in index order.
  base = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  f = np.concatenate([base, base])
  got = memory.herding_icarl(f, 5)
  np.testing.assert_array_equal(got, _plain_icarl_herding(f, 5))
  np.testing.assert_array_equal(np.sort(got[:3]), [0, 1, 2])
  np.testing.assert_array_equal(got[3:], [3, 4])
  assert got[0] == 2  # closest to the mean direction


def test_selection_registry():
  assert set(memory.SELECTIONS) == {"herding", "herding_icarl", "random"}
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(30, 5))
  labels = (rng.random((30, C)) < 0.5).astype(np.uint8)
  sel = memory.select_exemplars(feats, labels, [0, 1], 4,
                                method="herding_icarl")
  for c in (0, 1):
    cand = np.flatnonzero(labels[:, c])
    np.testing.assert_array_equal(
        sel[c], cand[_plain_icarl_herding(feats[cand], 4)])
  # random: the same numbers as before the registry, rng.permutation(cand).
  got = memory.select_exemplars(None, labels, [0, 1, 2], 3, method="random",
                                rng=9)
  ref_rng = np.random.default_rng(9)
  for c in (0, 1, 2):
    cand = np.flatnonzero(labels[:, c])
    np.testing.assert_array_equal(got[c], ref_rng.permutation(cand)[:3])
  with pytest.raises(ValueError, match="needs features"):
    memory.select_exemplars(None, labels, [0], 2, method="herding_icarl")


def test_herding_first_pick_is_closest_to_mean():
  f = np.array([[1., 0.], [0., 1.], [1., 1.], [1., -0.2]])
  assert memory.herding(f, 1)[0] == 2


def test_select_exemplars_herding_and_random():
  rng = np.random.default_rng(1)
  n = 40
  feats = rng.normal(size=(n, 8))
  labels = (rng.random((n, C)) < 0.3).astype(np.uint8)
  quotas = np.array([3, 100, 2, 0, 0, 0])
  sel = memory.select_exemplars(feats, labels, [0, 1, 2], quotas,
                                method="herding")
  for c in (0, 1, 2):
    cand = np.flatnonzero(labels[:, c])
    assert len(sel[c]) == min(quotas[c], len(cand))
    np.testing.assert_array_equal(
        sel[c], cand[_plain_herding(feats[cand], quotas[c])])
  r1 = memory.select_exemplars(None, labels, [0, 1, 2], 4, method="random",
                               rng=5)
  r2 = memory.select_exemplars(None, labels, [0, 1, 2], 4, method="random",
                               rng=np.random.default_rng(5))
  r3 = memory.select_exemplars(None, labels, [0, 1, 2], 4, method="random",
                               rng=6)
  for c in (0, 1, 2):
    np.testing.assert_array_equal(r1[c], r2[c])
    assert np.all(labels[r1[c], c] == 1) and len(set(r1[c])) == 4
  assert any(not np.array_equal(r1[c], r3[c]) for c in (0, 1, 2))
  with pytest.raises(ValueError, match="herding"):
    memory.select_exemplars(feats, labels, [0], 2, method="kmeans")


def test_exemplar_rows_dedups_images_picked_for_several_classes():
  rows, ranks = memory.exemplar_rows({0: np.array([7, 3]), 2: np.array([3, 9])},
                                     num_classes=C)
  np.testing.assert_array_equal(rows, [3, 7, 9])
  np.testing.assert_array_equal(ranks[:, 0], [1, 0, -1])
  np.testing.assert_array_equal(ranks[:, 2], [0, -1, 1])
  assert np.all(ranks[:, [1, 3, 4, 5]] == -1)


def test_add_dedups_by_image_id():
  mem = memory.empty(8, SHAPE, C)
  # Task 0: images 10, 11, 12 (11 listed twice: picked for two classes).
  inc = _rows([10, 11, 12, 11], 0, {0: [0, 1, -1, -1], 1: [-1, -1, 0, 1]},
              [0, 1])
  mem = memory.add(mem, **inc)
  assert mem.size == 3
  np.testing.assert_array_equal(np.sort(mem.image_id[mem.valid]), [10, 11, 12])
  row11 = np.flatnonzero(mem.image_id == 11)[0]
  np.testing.assert_array_equal(mem.rank[row11, :2], [1, 1])
  assert mem.images[row11, 0, 0, 0] == 11 and mem.source_index[row11] == 111
  np.testing.assert_array_equal(memory.class_counts(mem), [2, 2, 0, 0, 0, 0])

  # Task 1: image 12 again (ground truth on classes 2, 3) plus a new one.
  # Stored as a relabel on class 0 (known, not gt) must not hide task-1 gt.
  row12 = np.flatnonzero(mem.image_id == 12)[0]
  inc = _rows([12, 20], 1, {2: [0, 1]}, [2, 3])
  inc["labels"][0, 0], inc["known"][0, 0] = 0.0, True  # past-model label
  mem2 = memory.add(mem, **inc)
  assert mem.size == 3  # the input is untouched
  assert mem2.size == 4
  assert mem2.task[row12] == 0  # keeps the block it was first stored in
  np.testing.assert_array_equal(mem2.known[row12, :4], [True, True, True, True])
  np.testing.assert_array_equal(mem2.ground_truth[row12, :4],
                                [True, True, True, True])
  # class 0 was ground truth (1) and the incoming relabel (0) did not win
  np.testing.assert_array_equal(mem2.labels[row12, :4], [1, 1, 1, 1])
  np.testing.assert_array_equal(mem2.rank[row12, :3], [-1, 0, 0])
  row20 = np.flatnonzero(mem2.image_id == 20)[0]
  assert mem2.task[row20] == 1 and mem2.rank[row20, 2] == 1
  np.testing.assert_array_equal(memory.valid_rows(mem2),
                                np.flatnonzero(mem2.valid))


def test_without_dedup_an_image_is_stored_per_class_and_per_task():
  # Candidate 3 picked for classes 0 and 2: two rows, one rank each.
  rows, ranks = memory.exemplar_rows(
      {0: np.array([7, 3]), 2: np.array([3, 9])}, num_classes=C, dedup=False)
  np.testing.assert_array_equal(rows, [7, 3, 3, 9])
  np.testing.assert_array_equal(ranks[:, 0], [0, 1, -1, -1])
  np.testing.assert_array_equal(ranks[:, 2], [-1, -1, 0, 1])
  assert np.all((ranks >= 0).sum(axis=1) == 1)
  mem = memory.empty(8, SHAPE, C)
  inc = _rows([17, 13, 13, 19], 0, {}, [0, 2])
  inc["ranks"] = ranks
  mem = memory.add(mem, **inc, dedup=False)
  assert mem.size == 4
  np.testing.assert_array_equal(mem.image_id[mem.valid], [17, 13, 13, 19])
  np.testing.assert_array_equal(memory.class_counts(mem), [2, 0, 2, 0, 0, 0])
  # Next task: image 13 again is a third row; nothing is merged.
  mem2 = memory.add(mem, **_rows([13], 1, {1: [0]}, [1]), dedup=False)
  assert mem2.size == 5 and (mem2.image_id == 13).sum() == 3
  np.testing.assert_array_equal(mem2.rank[mem.valid], mem.rank[mem.valid])
  np.testing.assert_array_equal(mem2.known[mem.valid], mem.known[mem.valid])
  assert mem2.task[4] == 1 and mem2.rank[4, 1] == 0
  # Quotas shrink the copies like any rows: class 0 keeps its rank-0 row.
  mem3 = memory.shrink(mem2, np.array([1, 1, 0, 0, 0, 0]))
  np.testing.assert_array_equal(mem3.image_id[mem3.valid], [17, 13])
  # With dedup (the default) the same input merges into one row per image.
  merged = memory.add(memory.empty(8, SHAPE, C), **inc)
  assert merged.size == 3
  with pytest.raises(ValueError, match="memory full"):
    memory.add(memory.empty(3, SHAPE, C), **inc, dedup=False)


def test_add_raises_when_full():
  mem = memory.empty(2, SHAPE, C)
  with pytest.raises(ValueError, match="memory full"):
    memory.add(mem, **_rows([1, 2, 3], 0, {0: [0, 1, 2]}, [0]))


def test_fixed_total_shrinks_old_quotas_keeping_best_ranked():
  total = 6
  mem = memory.empty(memory.capacity_for(num_classes=C, total=total), SHAPE, C)
  q = memory.class_quotas([0, 1], num_classes=C, total=total)  # 3, 3
  mem = memory.add(mem, **_rows([1, 2, 3], 0, {0: [0, 1, 2]}, [0, 1]))
  mem = memory.add(mem, **_rows([4, 5, 6], 0, {1: [0, 1, 2]}, [0, 1]))
  assert mem.size == 6 and np.all(memory.class_counts(mem)[:2] == q[:2])
  # Task 1 brings classes 2 and 3: quotas become 2, 2, 1, 1 (sum 6).
  q = memory.class_quotas([0, 1, 2, 3], num_classes=C, total=total)
  np.testing.assert_array_equal(q[:4], [2, 2, 1, 1])
  mem = memory.shrink(mem, q)
  np.testing.assert_array_equal(np.sort(mem.image_id[mem.valid]), [1, 2, 4, 5])
  freed = ~mem.valid
  assert np.all(mem.image_id[freed] == -1) and np.all(mem.images[freed] == 0)
  assert not mem.known[freed].any() and np.all(mem.rank[freed] == -1)
  mem = memory.add(mem, **_rows([7, 8], 1, {2: [0, -1], 3: [-1, 0]}, [2, 3]))
  assert mem.size == total
  np.testing.assert_array_equal(memory.class_counts(mem)[:4], [2, 2, 1, 1])


def test_shrink_keeps_row_still_needed_by_another_class():
  mem = memory.empty(4, SHAPE, C)
  # image 1 is rank 2 for class 0 but rank 0 for class 1
  mem = memory.add(mem, **_rows([1, 2, 3], 0, {0: [2, 0, 1], 1: [0, -1, -1]},
                                [0, 1]))
  mem = memory.shrink(mem, np.array([2, 1, 0, 0, 0, 0]))
  assert mem.size == 3
  row1 = np.flatnonzero(mem.image_id == 1)[0]
  np.testing.assert_array_equal(mem.rank[row1, :2], [-1, 0])
  mem = memory.shrink(mem, np.array([1, 0, 0, 0, 0, 0]))
  np.testing.assert_array_equal(mem.image_id[mem.valid], [2])


def test_state_round_trip():
  mem = memory.empty(5, SHAPE, C)
  mem = memory.add(mem, **_rows([3, 4], 2, {1: [0, 1]}, [1]))
  state = memory.to_state(mem)
  assert all(isinstance(v, np.ndarray) for v in state.values())
  # e.g. what a checkpointer hands back: lists / other dtypes
  back = memory.from_state({k: v.tolist() for k, v in state.items()})
  for k, v in memory.to_state(back).items():
    assert v.dtype == state[k].dtype and v.shape == state[k].shape, k
    np.testing.assert_array_equal(v, state[k])
