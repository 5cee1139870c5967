"""train.last_batch=keep: the PyTorch baseline's DataLoader(drop_last=False).

An epoch is ceil(rows / B) batches; the short last one is padded to B with
rows of weight 0. Checked here: the rows each emulated DDP process gets,
batch by batch, are torch's DistributedSampler + DataLoader's on the same
permutation; a weighted BatchNorm is the plain one on the counted rows; the
train step on a padded batch is the step on its counted rows alone (loss,
parameters, statistics); and the wiring from the config.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import methods, optim, protocol, run_identity, steps, train
from rebll_jax import validate
from rebll_jax import config_base
from rebll_jax.data import loader
from rebll_jax.errors import UserError
from rebll_jax.models import build_model, init_variables, norm
from tests.helpers import make_config, norm_variables
from tests.test_loader import _memory, _split


def _keep(batch, processes, memory_rows=6):
  split = _split()  # 40 rows; the view's classes 0..2
  view = protocol.partial_view(split.labels, [0, 1, 2])
  return view, loader.TaskBatches(
      split=split, view=view, memory=_memory(memory_rows), global_batch=batch,
      local_rows=slice(0, batch), seed=3, task=1, last_batch="keep",
      processes=processes)


def _row_ids(batches, step):
  """Global row ids (>= 0 new, < 0 memory) and weights of batch ``step``."""
  return batches._rows(step), batches._row_weight(step)  # pylint: disable=protected-access


@pytest.mark.parametrize("batch,processes", [(8, 1), (8, 2), (6, 3), (64, 2)])
def test_each_process_gets_torchs_batches(batch, processes):
  view, batches = _keep(batch, processes)
  rows = len(view) + 6
  per_process = -(-rows // processes)
  steps_per_epoch = -(-per_process // (batch // processes))
  assert batches.steps_per_epoch == steps_per_epoch
  for epoch in range(2):
    # torch: DistributedSampler pads the shuffled order to a multiple of the
    # processes with its own first rows, deals it out in turn (rank r takes
    # positions r, r + P, ...), and each rank's DataLoader cuts its share
    # into batches of B / P, the last one shorter.
    order = loader._epoch_order(3, 1, epoch, rows)  # pylint: disable=protected-access
    order = np.resize(order, per_process * processes)
    ours = [_row_ids(batches, epoch * steps_per_epoch + s)
            for s in range(steps_per_epoch)]
    for rank in range(processes):
      share = order[rank::processes]
      b = batch // processes
      for s, (ids, weight) in enumerate(ours):
        want = share[s * b:(s + 1) * b]
        got = ids[rank::processes][weight[rank::processes] > 0]
        got = np.where(got >= 0, got, len(view) - 1 - got)  # memory -> order ids
        np.testing.assert_array_equal(got, want)
    last_ids, last_weight = ours[-1]
    assert 0 < last_weight.sum() <= batch and last_weight.sum() % processes == 0
    assert np.all(last_weight[:int(last_weight.sum())] == 1)
    # Every row of the epoch is trained (drop would have left some out).
    counted = np.concatenate([i[w > 0] for i, w in ours])
    assert len(set(counted.tolist())) == rows


def test_the_batch_carries_the_weights_and_drop_does_not():
  _, batches = _keep(8, 2, memory_rows=3)  # 36 rows: 4 + 4 + 4 + 4 + 2 x 2
  last = batches.steps_per_epoch - 1
  assert batches.batch(last)["row_weight"].sum() < 8
  assert batches.batch(0)["row_weight"].sum() == 8
  assert batches.wrap_note() is None
  split = _split()
  dropping = loader.TaskBatches(
      split=split, view=protocol.partial_view(split.labels, [0, 1, 2]),
      memory=_memory(), global_batch=8, local_rows=slice(0, 8), seed=3,
      task=1)
  assert "row_weight" not in dropping.batch(0)
  assert dropping.steps_per_epoch < batches.steps_per_epoch


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("slope", [None, 0.0])
def test_weighted_norm_is_the_norm_of_the_counted_rows(groups, slope):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1, 2, (8, 3, 3, 4)), jnp.float32)
  weight = jnp.asarray([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
  targets = jnp.asarray(rng.normal(0, 1, x.shape), jnp.float32)
  variables = norm_variables(rng, 4)

  def run(module, x, t):
    def loss(v, x):
      y, upd = module.apply(v, x, mutable=["batch_stats"])
      return jnp.sum(y * t), (y, upd)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables, x)

  (l1, (y1, u1)), (gv1, gx1) = run(
      norm.BatchNorm(slope=slope, groups=groups, row_weight=weight), x,
      targets * weight[:, None, None, None])
  (l0, (y0, u0)), (gv0, gx0) = run(
      norm.BatchNorm(slope=slope, groups=groups), x[:6], targets[:6])
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y1[:6], y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx1[:6], gx0, rtol=1e-5, atol=1e-5)
  assert not np.any(gx1[6:])  # the padding gets no gradient
  for a, b in zip(jax.tree.leaves((u1, gv1)), jax.tree.leaves((u0, gv0))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_padded_objective_is_the_objective_of_its_counted_rows():
  """krt_baseline's summed ASL and POD-flat mean (the rebll step below
  covers the mean, AKD and the model): padding rows change nothing, and
  their gradient is 0."""
  rng = np.random.default_rng(2)
  method = methods.get_method("krt_baseline")
  config = make_config(method="krt_baseline", **{"protocol.increment": 2,
                                                 "train.ddp_processes": 2})
  columns = np.arange(6)
  context = {"seen_mask": (columns < 4) * 1.0,
             "current_mask": (columns // 2 == 1) * 1.0,
             "old_mask": (columns < 2) * 1.0}
  labels = (rng.random((8, 6)) < 0.4).astype(np.float32)
  y, mask = method.loss_targets(labels, np.ones((8, 6), bool),
                                method.loss_columns(context))
  old = {"logits": rng.normal(size=(8, 6)).astype(np.float32),
         "features": np.abs(rng.normal(size=(8, 5))).astype(np.float32)}
  weight = np.array([1] * 6 + [0] * 2, np.float32)

  def loss(logits, features, row_weight, n):
    rows = slice(0, n)
    out = {"logits": logits[rows], "features": features[rows]}
    return steps.objective(
        method=method, config=config, out=out,
        old_out={k: v[rows] for k, v in old.items()}, labels=y[rows],
        mask=mask[rows], context=context, row_weight=row_weight)[0]

  logits = rng.normal(size=(8, 6)).astype(np.float32) * 3
  features = np.abs(rng.normal(size=(8, 5))).astype(np.float32)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
  padded, (gz, gf) = grad(logits, features, weight, 8)
  alone, (gz6, gf6) = grad(logits, features, None, 6)
  np.testing.assert_allclose(padded, alone, rtol=1e-6)
  np.testing.assert_allclose(gz[:6], gz6[:6], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(gf[:6], gf6[:6], rtol=1e-6, atol=1e-7)
  assert not np.any(gz[6:]) and not np.any(gf[6:])


def test_a_padded_step_is_the_step_of_its_counted_rows():
  """Loss, new parameters and running statistics of one rebll train step
  (with a past model: distillation, relabeling) on 6 rows padded to 8 = the
  step on the 6 rows alone."""
  method = "rebll"
  config = make_config(method=method, **{"train.global_batch": 8,
                                         "protocol.increment": 2})
  model = build_model(config.model, 6)
  variables = init_variables(model, jax.random.key(0), 16)
  tx = optim.make_transform(config.optim)
  step = jax.jit(steps.make_train_step(
      model=model, method=methods.get_method(method), config=config, tx=tx,
      has_old=True))
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  images[6:] = images[:2]  # the loader pads with copies of counted rows
  labels = (rng.random((8, 6)) < 0.4).astype(np.float32)
  known = np.zeros((8, 6), bool)
  known[:, 2:4] = True
  is_memory = np.array([0, 0, 0, 1, 0, 1, 0, 0], bool)
  columns = np.arange(6)
  task = types.SimpleNamespace(current_mask=(columns // 2 == 1) * 1.0,
                               old_mask=(columns < 2) * 1.0,
                               seen_mask=(columns < 4) * 1.0)
  context = steps.task_context(task, task_start=0, total_steps=10,
                               lr_peak=1e-3)
  old = jax.tree.map(lambda a: a * 0.9, variables)
  state = steps.initial_train_state(tx, variables)
  # No augmentation randomness: the key only feeds the augmentation.
  padded = {"images": images, "labels": labels, "known": known,
            "is_memory": is_memory,
            "row_weight": np.array([1] * 6 + [0] * 2, np.float32)}
  alone = {k: v[:6] for k, v in padded.items() if k != "row_weight"}
  key = jax.random.key(5)
  new_p, out_p = step(state, old, padded, context, key)
  new_a, out_a = step(steps.initial_train_state(tx, variables), old, alone,
                      context, key)
  np.testing.assert_allclose(out_p["loss"], out_a["loss"], rtol=1e-5)
  np.testing.assert_allclose(out_p["cls_positives"], out_a["cls_positives"])
  for a, b in zip(jax.tree.leaves((new_p.params, new_p.batch_stats)),
                  jax.tree.leaves((new_a.params, new_a.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_keep_needs_one_shuffled_order():
  c = config_base.base_config()
  c.train.last_batch, c.memory.mix = "keep", "fraction"
  with pytest.raises(UserError, match="train.last_batch=keep needs "
                     "memory.mix=uniform"):
    validate.check_last_batch(c)
  c.memory.mix = "uniform"
  validate.check_last_batch(c)


def test_the_field_switch_keeps_it_and_old_checkpoints_dropped_it():
  c = config_base.base_config()
  assert c.train.last_batch == "drop"
  assert config_base.apply_field_recipe(
      config_base.base_config(), "synthetic").train.last_batch == "keep"
  saved = {"config": run_identity.flatten(c)}
  del saved["config"]["train.last_batch"]
  assert not run_identity.differences(saved,
                                      {"config": run_identity.flatten(c)})
  c.train.last_batch = "keep"
  assert run_identity.differences(saved, {"config": run_identity.flatten(c)})


def test_a_run_hands_the_choice_to_its_batches(tmp_path, monkeypatch):
  setup = train.set_up(make_config(**{"train.last_batch": "keep",
                                      "train.ddp_processes": 2}),
                       str(tmp_path))
  setup.lock.release()
  seen = {}
  monkeypatch.setattr(train.replay, "visible_rows", lambda *a: _memory(0))
  monkeypatch.setattr(train.loader, "TaskBatches",
                      lambda **kw: seen.update(kw) or types.SimpleNamespace(
                          wrap_note=lambda: None))
  train._task_batches(setup, types.SimpleNamespace(memory=None),  # pylint: disable=protected-access
                      setup.tasks[0], None)
  assert seen["last_batch"] == "keep" and seen["processes"] == 2
