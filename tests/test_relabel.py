"""Tests of rebll_jax.relabel: online fills, the buffer pass, diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import diagnostics, relabel

C = 5
H = 3


def _tiny_predict(trace_counter=None):
  """A jitted per-row 'model': probs from mean pixel values through a matrix."""
  w = np.linspace(-2.0, 2.0, 3 * C).reshape(3, C).astype(np.float32)

  @jax.jit
  def predict(images):
    if trace_counter is not None:
      trace_counter.append(images.shape)
    x = images.astype(jnp.float32).mean(axis=(1, 2)) / 255.0 * 4.0 - 2.0
    return jax.nn.sigmoid(x @ w + jnp.arange(C) * 0.1)

  return predict


def _buffer(seed, cap=23):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (cap, H, H, 3), dtype=np.uint8)
  labels = (rng.random((cap, C)) < 0.3).astype(np.float32)
  known = rng.random((cap, C)) < 0.5
  valid = rng.random(cap) < 0.8
  return images, labels, known, valid


def _loop_reference(predict, images, labels, known, valid, column_mask, tau,
                    tau_low=None):
  """The slow way: one row at a time."""
  tau_low = tau if tau_low is None else tau_low
  labels, known = labels.copy(), known.copy()
  cm = np.broadcast_to(column_mask, labels.shape)
  for i in range(len(images)):
    if not valid[i]:
      continue
    p = np.asarray(predict(images[i:i + 1]))[0]
    for c in range(C):
      if cm[i, c] and (p[c] > tau or p[c] <= tau_low):  # else: the band
        labels[i, c] = float(p[c] > tau)
        known[i, c] = True
  return labels, known


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 64])
def test_buffer_pass_equals_per_row_loop(chunk):
  images, labels, known, valid = _buffer(0)
  column_mask = np.array([False, True, True, False, True])
  predict = _tiny_predict()
  got = relabel.relabel_buffer(predict, images, labels, known, valid,
                               column_mask, 0.5, chunk)
  want = _loop_reference(predict, images, labels, known, valid, column_mask,
                         0.5)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert got[0].dtype == labels.dtype and got[1].dtype == bool
  # Entries outside the mask and invalid rows are untouched.
  outside = ~(column_mask[None] & valid[:, None])
  np.testing.assert_array_equal(got[0][outside], labels[outside])
  np.testing.assert_array_equal(got[1][outside], known[outside])


@pytest.mark.parametrize("tau_low", [0.1, 0.3, 0.5])
def test_two_threshold_buffer_pass_equals_per_row_loop(tau_low):
  images, labels, known, valid = _buffer(4, cap=40)
  column_mask = np.array([True, False, True, True, True])
  predict = _tiny_predict()
  got = relabel.relabel_buffer(predict, images, labels, known, valid,
                               column_mask, 0.5, 8, tau_low=tau_low)
  want = _loop_reference(predict, images, labels, known, valid, column_mask,
                         0.5, tau_low)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  # The band really left entries unknown (so the case is not vacuous), and
  # tau_low = tau is the single threshold.
  single = relabel.relabel_buffer(predict, images, labels, known, valid,
                                  column_mask, 0.5, 8)
  if tau_low < 0.5:
    assert single[1].sum() > got[1].sum()
  else:
    np.testing.assert_array_equal(got[1], single[1])


def test_decide_band():
  p = np.array([0.05, 0.1, 0.3, 0.5, 0.51, 0.9])
  positive, decided = relabel.decide(p, 0.5, 0.1)
  np.testing.assert_array_equal(positive, [0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(decided, [1, 1, 0, 0, 1, 1])
  _, decided = relabel.decide(p, 0.5)
  assert decided.all()


def test_buffer_pass_per_row_mask_keeps_ground_truth_and_compiles_once():
  images, labels, known, valid = _buffer(1, cap=30)
  ground_truth = known.copy()
  cm = np.array([True, True, False, False, False])[None] & ~ground_truth
  traces = []
  predict = _tiny_predict(traces)
  labels_copy = labels.copy()
  got = relabel.relabel_buffer(predict, images, labels, known, valid, cm, 0.3,
                               8)
  assert traces == [(8, H, H, 3)]  # padded last chunk: one shape, one trace
  np.testing.assert_array_equal(labels, labels_copy)  # inputs untouched
  np.testing.assert_array_equal(got[0][ground_truth], labels[ground_truth])
  want = _loop_reference(predict, images, labels, known, valid, cm, 0.3)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_padding_of_last_chunk_changes_nothing():
  images, labels, known, valid = _buffer(2, cap=20)
  valid[:] = True
  predict = _tiny_predict()
  cm = np.ones(C, bool)
  # 20 rows as 5 chunks of 4 (no padding) vs 3 of 8 (4 padding rows) and 1x32
  a = relabel.relabel_buffer(predict, images, labels, known, valid, cm, 0.5, 4)
  for chunk in (8, 32, 6):
    b = relabel.relabel_buffer(predict, images, labels, known, valid, cm, 0.5,
                               chunk)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_buffer_pass_with_nothing_to_write_does_not_call_model():
  images, labels, known, valid = _buffer(3)

  def boom(_):
    raise AssertionError("model called")

  got = relabel.relabel_buffer(boom, images, labels, known, valid,
                               np.zeros(C, bool), 0.5, 4)
  np.testing.assert_array_equal(got[0], labels)
  got = relabel.relabel_buffer(boom, images, labels, known,
                               np.zeros_like(valid), np.ones(C, bool), 0.5, 4)
  np.testing.assert_array_equal(got[1], known)


def _batch():
  labels = jnp.array([[1, 0, 0, 0, 0],   # new row, ground truth on 0..1
                      [0, 1, 0, 0, 0],   # new row
                      [0, 0, 1, 1, 0],   # memory row, ground truth on 2..3
                      [0, 0, 0, 0, 0]],  # padding row
                     jnp.float32)
  known = jnp.array([[1, 1, 0, 0, 0],
                     [1, 1, 0, 1, 0],  # class 3 already known: keep it
                     [0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0]], bool)
  probs = jnp.array([[.9, .1, .7, .2, .6],
                     [.2, .8, .4, .9, .95],
                     [.6, .3, .1, .9, .55],
                     [.9, .9, .9, .9, .9]], jnp.float32)
  # Task 2 is classes 0..1; old classes 2..4 (learned in earlier tasks).
  current = jnp.array([1, 1, 0, 0, 0], bool)
  old = jnp.array([0, 0, 1, 1, 1], jnp.float32)  # float masks work too
  row_is_new = jnp.array([1, 1, 0, 0], bool)
  row_is_memory = jnp.array([0, 0, 1, 0], bool)
  return labels, known, probs, current, old, row_is_new, row_is_memory


def test_relabel_new_rows_by_hand():
  labels, known, probs, _, old, row_is_new, _ = _batch()
  nl, nk = relabel.relabel_new_rows(labels=labels, known=known,
                                    old_probs=probs, old_class_mask=old,
                                    row_is_new=row_is_new, tau_old=0.5)
  np.testing.assert_array_equal(nl, [[1, 0, 1, 0, 1],
                                     [0, 1, 0, 0, 1],  # col 3 kept (known)
                                     [0, 0, 1, 1, 0],
                                     [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(nk, [[1, 1, 1, 1, 1],
                                     [1, 1, 1, 1, 1],
                                     [0, 0, 1, 1, 0],
                                     [0, 0, 0, 0, 0]])
  assert nl.dtype == labels.dtype and nk.dtype == known.dtype
  # A higher threshold flips the 0.6 and 0.7 entries to negatives.
  nl, _ = relabel.relabel_new_rows(labels=labels, known=known,
                                   old_probs=probs, old_class_mask=old,
                                   row_is_new=row_is_new, tau_old=0.8)
  np.testing.assert_array_equal(nl[0], [1, 0, 0, 0, 0])
  # Two thresholds: scores in (0.3, 0.5] stay unknown (0.4 of row 1, col 2).
  nl, nk = relabel.relabel_new_rows(labels=labels, known=known,
                                    old_probs=probs, old_class_mask=old,
                                    row_is_new=row_is_new, tau_old=0.5,
                                    tau_old_low=0.3)
  np.testing.assert_array_equal(nk[:2], [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
  np.testing.assert_array_equal(nl[0], [1, 0, 1, 0, 1])


def test_relabel_memory_rows_by_hand_and_warmup():
  labels, known, probs, current, _, _, row_is_memory = _batch()
  kw = dict(labels=labels, known=known, probs=probs,
            current_class_mask=current, row_is_memory=row_is_memory,
            tau_cur=0.5)
  nl, nk = relabel.relabel_memory_rows(active=False, **kw)
  np.testing.assert_array_equal(nl, labels)
  np.testing.assert_array_equal(nk, known)
  nl, nk = relabel.relabel_memory_rows(active=jnp.array(True), **kw)
  want_l, want_k = np.array(labels), np.array(known)
  want_l[2, :2], want_k[2, :2] = [1, 0], True
  np.testing.assert_array_equal(nl, want_l)
  np.testing.assert_array_equal(nk, want_k)
  # float known masks keep their dtype
  _, nkf = relabel.relabel_memory_rows(
      active=True, **{**kw, "known": known.astype(jnp.float32)})
  assert nkf.dtype == jnp.float32
  np.testing.assert_array_equal(nkf, want_k.astype(np.float32))

  # Two thresholds: 0.3 (row 2, class 1) is in (0.2, 0.5]: stays unknown.
  nl, nk = relabel.relabel_memory_rows(active=True, tau_cur_low=0.2, **kw)
  np.testing.assert_array_equal(nk[2], [1, 0, 1, 1, 0])
  np.testing.assert_array_equal(nl[2], [1, 0, 1, 1, 0])

  act = lambda s: bool(relabel.warmup_active(step=s, total_steps=10,
                                             warmup_frac=0.5))
  assert [act(s) for s in (0, 4, 5, 9)] == [False, False, True, True]


def test_numpy_inputs_run_in_numpy_with_the_same_result():
  """The between-task pass hands numpy: the same labels, computed in numpy
  (numpy out: no eager JAX op, so no compile per buffer shape)."""
  labels, known, probs, current, old, row_is_new, row_is_memory = _batch()
  host = [np.asarray(a) for a in (labels, known, probs, current, old,
                                  row_is_new, row_is_memory)]
  for tau_low in (None, 0.3):
    want = relabel.relabel_new_rows(
        labels=labels, known=known, old_probs=probs, old_class_mask=old,
        row_is_new=row_is_new, tau_old=0.5, tau_old_low=tau_low)
    got = relabel.relabel_new_rows(
        labels=host[0], known=host[1], old_probs=host[2],
        old_class_mask=host[4], row_is_new=host[5], tau_old=0.5,
        tau_old_low=tau_low)
    for g, w in zip(got, want):
      assert isinstance(g, np.ndarray) and g.dtype == w.dtype
      np.testing.assert_array_equal(g, w)
    want = relabel.relabel_memory_rows(
        labels=labels, known=known, probs=probs, current_class_mask=current,
        row_is_memory=row_is_memory, tau_cur=0.5, active=True,
        tau_cur_low=tau_low)
    got = relabel.relabel_memory_rows(
        labels=host[0], known=host[1], probs=host[2],
        current_class_mask=host[3], row_is_memory=host[6], tau_cur=0.5,
        active=True, tau_cur_low=tau_low)
    for g, w in zip(got, want):
      assert isinstance(g, np.ndarray) and g.dtype == w.dtype
      np.testing.assert_array_equal(g, w)


def test_online_jit_equals_no_jit_and_no_gradient_leak():
  labels, known, probs, current, old, row_is_new, row_is_memory = _batch()

  def both(probs, active, tau):
    l, k = relabel.relabel_new_rows(labels=labels, known=known,
                                    old_probs=probs, old_class_mask=old,
                                    row_is_new=row_is_new, tau_old=tau)
    return relabel.relabel_memory_rows(labels=l, known=k, probs=probs,
                                       current_class_mask=current,
                                       row_is_memory=row_is_memory,
                                       tau_cur=tau, active=active)

  traces = []

  def counted(*a):
    traces.append(1)
    return both(*a)

  jitted = jax.jit(counted)
  for active in (False, True):
    for tau in (0.5, 0.8):
      a, b = both(probs, active, tau), jitted(probs, active, tau)
      np.testing.assert_array_equal(a[0], b[0])
      np.testing.assert_array_equal(a[1], b[1])
  assert len(traces) == 1  # active and tau are traced, not static

  g = jax.grad(lambda p: jnp.sum(both(p, True, 0.5)[0] * p))(probs)
  # Only the explicit "* p" factor carries gradient: labels are constants.
  np.testing.assert_allclose(g, both(probs, True, 0.5)[0])


def test_confusion_counts_and_quality():
  pred = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
  true = np.array([[1, 1, 0, 0], [0, 1, 0, 1]])
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
  q = diagnostics.relabel_quality(pred, mask, true)
  # masked entries: tp (0,0),(1,1); fp (0,2),(1,0); tn (0,3),(1,2); fn (0,1)
  assert (q["tp"], q["fp"], q["tn"], q["fn"], q["count"]) == (2, 2, 2, 1, 7)
  assert q["fpr"] == 0.5 and q["fnr"] == pytest.approx(1 / 3)
  counts = jax.jit(lambda p, m, t: diagnostics.confusion_counts(
      pred_labels=p, mask=m, true_labels=t))(pred, mask, true)
  assert diagnostics.quality_from_counts(counts) == q
  # Never NaN: nothing relabeled, or no negatives / positives among them.
  empty = diagnostics.relabel_quality(pred, np.zeros_like(mask), true)
  assert empty["fpr"] == 0.0 and empty["fnr"] == 0.0 and empty["count"] == 0
  only_pos = diagnostics.relabel_quality(pred, true.astype(bool), true)
  assert only_pos["fpr"] == 0.0 and only_pos["fnr"] == 0.5


def test_tempered_scores_are_the_sigmoid_of_the_tempered_logits():
  z = np.array([-40.0, -3.0, -0.2, 0.0, 0.7, 2.5, 40.0])
  scores = (1 / (1 + np.exp(-z))).astype(np.float32)
  for t in (0.5, 2.0, 3.0):
    got = relabel.tempered(scores, t)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:-1], 1 / (1 + np.exp(-z[:-1] / t)),
                               rtol=1e-5)
    assert got[-1] == 1.0  # sigmoid(40) is 1 in float32, and stays 1
  assert relabel.tempered(scores, 1.0) is scores


def _one_rebll_step(temperature, tau_old):
  """One jitted rebll step of the tiny test model whose past model's
  old-class logits sit in (0, 3]: its metrics, and the positives L_cls
  should see with q = sigmoid(z'/T) (METHOD.md s.4-5) and with T = 1."""
  from rebll_jax import methods, models, optim, protocol, steps  # pylint: disable=g-import-not-at-top
  from rebll_jax.data import augment  # pylint: disable=g-import-not-at-top
  from tests.helpers import make_config  # pylint: disable=g-import-not-at-top
  cfg = make_config(**{"data.image_size": 16, "augment.policy": "field",
                       "loss.temperature": temperature,
                       "relabel.tau_old": tau_old})
  classes, batch_size = 8, 12
  model = models.build_model(cfg.model, classes)
  variables = jax.device_get(models.init_variables(
      model, jax.random.key(0), 16))
  old = jax.tree.map(np.asarray, variables)
  old["params"]["head"]["kernel"] = old["params"]["head"]["kernel"] * 0.01
  old["params"]["head"]["bias"] = np.linspace(0.2, 3.0, classes).astype(
      np.float32)
  tx = optim.make_transform(cfg.optim)
  state = steps.initial_train_state(tx, variables)
  task = protocol.make_tasks(classes, 0, 4)[1]  # old classes 0-3
  context = steps.task_context(task, task_start=0, total_steps=10,
                               lr_peak=1e-3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (batch_size, 16, 16, 3)).astype(np.uint8)
  labels = np.zeros((batch_size, classes), np.float32)
  known = np.zeros((batch_size, classes), bool)
  labels[:, 4:] = rng.random((batch_size, 4)) < 0.4
  known[:, 4:] = True  # new rows only: the old columns come from q
  batch = {"images": images, "labels": labels, "known": known,
           "is_memory": np.zeros(batch_size, bool)}
  step = jax.jit(steps.make_train_step(
      model=model, method=methods.get_method("rebll"), config=cfg, tx=tx,
      has_old=True))
  _, metrics = step(state, old, batch, context, jax.random.key(1), None)
  x = augment.eval_transform(jnp.asarray(images), False)
  z_old = np.asarray(model.apply(old, x, train=False)["logits"], np.float64)
  positives = lambda t: labels[:, 4:].sum() + (  # noqa: E731
      1 / (1 + np.exp(-z_old[:, :4] / t)) > tau_old).sum()
  return jax.device_get(metrics), positives(temperature), positives(1.0)


def test_the_online_relabel_thresholds_the_tempered_past_model():
  """q = sigmoid(z'/T) as the distillation reads it: the step thresholded
  sigmoid(z'), which differs when T != 1 and tau != 0.5 (exit 0, another
  L_cls)."""
  metrics, want, untempered = _one_rebll_step(2.0, 0.8)
  assert float(metrics["cls_positives"]) == want
  assert untempered != want  # the case matters here


def test_the_exemplars_old_labels_threshold_the_tempered_past_model(
    monkeypatch):
  """Between tasks, the new exemplars' old-class labels use the same q."""
  from rebll_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
  from rebll_jax import methods, replay, validate  # pylint: disable=g-import-not-at-top
  from rebll_jax import protocol as protocol_lib  # pylint: disable=g-import-not-at-top
  from tests.helpers import make_config  # pylint: disable=g-import-not-at-top
  config = make_config(**{"loss.temperature": 2.0, "relabel.tau_old": 0.8})
  source = validate.build_source(config.data)
  method = methods.get_method("rebll")
  tasks = method.tasks(source.num_classes, config.protocol)
  task = tasks[1]
  view = protocol_lib.train_view(source, task.classes, config.protocol)
  z_old = 1.5  # sigmoid 0.82 > 0.8; tempered sigmoid(0.75) = 0.68 < 0.8

  class Predictor:

    def predict_split(self, variables, split, indices):
      scores = np.full((len(indices), source.num_classes),
                       1 / (1 + np.exp(-z_old)), np.float32)
      features = np.random.default_rng(0).normal(
          size=(len(indices), 8)).astype(np.float32)
      return scores, features

    def predict(self, variables, images):
      return (np.zeros((len(images), source.num_classes), np.float32),
              None)

  mem = memory_lib.empty(
      capacity=memory_lib.capacity_for(
          num_classes=source.num_classes, per_class=config.memory.per_class,
          total=config.memory.total, num_images=len(source.train),
          dedup=config.memory.dedup),
      image_shape=source.train.read_images(np.arange(1)).shape[1:],
      num_classes=source.num_classes)
  mem, _ = replay.after_task(
      mem, config=config, method=method, source=source, view=view,
      task=task, tasks=tasks, predictor=Predictor(), variables={},
      old_variables={})
  rows = np.flatnonzero(mem.valid & (mem.task == task.index))
  old = np.asarray(task.old_mask, bool)
  assert rows.size
  assert mem.known[rows][:, old].all()
  assert not mem.labels[rows][:, old].any()  # q = 0.68 <= 0.8: negatives
