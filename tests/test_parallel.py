"""Data parallelism on 8 virtual CPU devices equals one device.

- One ``rebll`` train step (past model, memory rows in the batch, online
  relabeling, AKD, Adam): parameters, batch statistics and metrics of the
  8-device mesh equal the 1-device ones within 1e-5 (float32).
- BatchNorm statistics are over the global batch: with every device's rows
  shifted differently, the running variance is the global batch variance,
  not the mean of per-device variances.
- A whole 2-task run (train.run, rebll) ends with the same parameters on
  8 devices as on 1 (read back from the run's last checkpoint), and a third
  task compiles nothing new: the train step, the padded eval batches and the
  between-task passes reuse the executables of task 2.
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import methods, models, optim, parallel, steps
from rebll_jax import train
from tests.helpers import make_config, max_abs_diff, params_after_task

TOL = 1e-5


def _config(**overrides):
  # RandAugment's 14 ops dominate compile time and are not what is tested
  # here (flip and cutout keep per-example randomness in the step).
  return make_config(**{"augment.randaugment_ops": 0, **overrides})


def _step_inputs(config, num_classes=12, batch=16):
  rng = np.random.default_rng(0)
  size = config.data.image_size
  old = np.arange(num_classes) < 8
  cur = ~old
  is_memory = np.arange(batch) % 4 == 0  # memory rows on every device
  known = np.where(is_memory[:, None], old[None], cur[None])
  labels = (rng.random((batch, num_classes)) < 0.3).astype(np.float32)
  host = {"images": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
          "labels": labels * known, "known": known, "is_memory": is_memory}
  truth = labels.astype(np.uint8)
  context = {"current_mask": cur, "old_mask": old, "seen_mask": old | cur,
             "task_start": np.int32(0), "total_steps": np.int32(6),
             "lr_peak": np.float32(1e-2)}
  return host, truth, context


def _init(model, size):
  # The "rbg" PRNG compiles in a fraction of threefry's time on CPU.
  return jax.device_get(jax.jit(model.init, static_argnames="train")(
      jax.random.key(0, impl="rbg"), jnp.zeros((1, size, size, 3)),
      train=False))


def _run_step(config, host, truth, context, num_devices, variables):
  model = models.build_model(config.model, 12)
  tx = optim.make_transform(config.optim)
  # A past model that differs from the current one (distillation matters).
  old = jax.tree.map(lambda x: x * 0.9 + 0.01, variables)
  state = steps.TrainState(step=jnp.asarray(3, jnp.int32),  # past warm-up
                           params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))
  mesh = parallel.make_mesh(num_devices)
  rep = parallel.replicated(mesh)
  fn = steps.make_train_step(model=model, method=methods.get_method("rebll"),
                             config=config, tx=tx, has_old=True)
  jitted = jax.jit(fn, donate_argnums=0, out_shardings=(rep, rep))
  state = jax.device_put(state, rep)
  batch = parallel.to_global(mesh, host)
  assert len(batch["images"].sharding.device_set) == num_devices
  new_state, metrics = jitted(state, jax.device_put(old, rep), batch,
                              jax.device_put(context, rep), jax.random.key(1),
                              None if truth is None
                              else parallel.to_global(mesh, truth))
  return jax.device_get((new_state, metrics))


def test_one_rebll_step_eight_devices_equals_one():
  config = _config(**{"data.image_size": 16})
  host, truth, context = _step_inputs(config)
  variables = _init(models.build_model(config.model, 12), 16)
  one = _run_step(config, host, truth, context, 1, variables)
  eight = _run_step(config, host, truth, context, 8, variables)
  state1, metrics1 = one
  state8, metrics8 = eight
  assert max_abs_diff(state8.params, state1.params) < TOL
  assert max_abs_diff(state8.batch_stats, state1.batch_stats) < TOL
  assert max_abs_diff(state8.opt_state, state1.opt_state) < TOL
  for key in ("loss", "loss_cls", "loss_kd", "grad_norm"):
    assert abs(float(metrics8[key]) - float(metrics1[key])) < TOL * max(
        1.0, abs(float(metrics1[key]))), key
  # Both relabeling branches ran and agree exactly (thresholds of equal
  # numbers): the counts are integers.
  for group in ("new", "memory"):
    for k, v in metrics1["labels"][group].items():
      assert float(metrics8["labels"][group][k]) == float(v), (group, k)
  assert sum(float(v) for v in metrics1["labels"]["new"].values()) > 0
  assert max_abs_diff(state1.params, variables["params"]) > 1e-4  # it moved
  # Without label diagnostics the truth never enters the step: same update,
  # no counts.
  blind_state, blind_metrics = _run_step(config, host, None, context, 1,
                                         variables)
  assert max_abs_diff(blind_state.params, state1.params) == 0
  assert blind_metrics["labels"] == {}


def test_batchnorm_statistics_are_global():
  mesh = parallel.make_mesh(8)
  rng = np.random.default_rng(0)
  # Each device's two rows are shifted by a different offset: per-device
  # variances are small, the global one is large.
  x = (rng.standard_normal((16, 3)) * 0.1 +
       np.repeat(np.arange(8.0), 2)[:, None]).astype(np.float32)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = bn.init(jax.random.key(0), x[:2])

  @jax.jit
  def update(variables, x):
    y, new = bn.apply(variables, x, mutable=["batch_stats"])
    return y, new["batch_stats"]

  xs = parallel.to_global(mesh, x)
  assert len(xs.sharding.device_set) == 8
  y, stats = jax.device_get(update(variables, xs))
  np.testing.assert_allclose(stats["mean"], 0.1 * x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var(0), rtol=1e-5)
  per_device_var = x.reshape(8, 2, 3).var(1).mean(0)
  assert np.all(0.9 + 0.1 * per_device_var < stats["var"] - 0.1)
  np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5),
                             rtol=1e-4, atol=1e-4)


class _CompileCounter:
  """Compiles, snapshotted at each 'task N: mAP' log line.

  A program found in the persistent compilation cache (the test session
  shares one, see conftest.py) is counted too: it was compiled all the same.
  """

  COMPILED = "/jax/core/compile/backend_compile_duration"
  CACHE_HIT = "/jax/compilation_cache/cache_hits"

  def __init__(self):
    self.count, self.at_task_end = 0, []

  def on_event(self, event, duration, **kwargs):
    del duration, kwargs
    if event == self.COMPILED:
      self.count += 1

  def on_plain_event(self, event, **kwargs):
    del kwargs
    if event == self.CACHE_HIT:
      self.count += 1

  def handler(self):
    counter = self

    class Handler(logging.Handler):
      def emit(self, record):
        if record.getMessage().startswith("task "):
          counter.at_task_end.append(counter.count)

    return Handler()



@pytest.fixture(scope="module")
def two_task_runs(tmp_path_factory):
  config = dict(**{"data.image_size": 16,
                   "data.synthetic.render_size": 16,
                   "data.synthetic.num_train": 160,
                   "data.synthetic.num_test": 64})
  runs = {}
  # 8 devices run one task more: task 3 must compile nothing new.
  for devices, num_tasks in ((1, 2), (8, 3)):
    workdir = str(tmp_path_factory.mktemp(f"devices{devices}"))
    counter = _CompileCounter()
    handler = counter.handler()
    train.log.addHandler(handler)
    old_level = train.log.level
    train.log.setLevel(logging.INFO)
    jax.monitoring.register_event_duration_secs_listener(counter.on_event)
    jax.monitoring.register_event_listener(counter.on_plain_event)
    try:
      results = train.run(_config(num_devices=devices, **{
          "protocol.num_tasks": num_tasks}, **config), workdir)
    finally:
      jax.monitoring.unregister_event_duration_listener(counter.on_event)
      jax.monitoring.unregister_event_listener(counter.on_plain_event)
      train.log.removeHandler(handler)
      train.log.setLevel(old_level)
    runs[devices] = (workdir, results, counter)
  return runs


def test_two_task_run_eight_devices_equals_one(two_task_runs):
  params1, stats1 = params_after_task(two_task_runs[1][0], 2)
  params8, stats8 = params_after_task(two_task_runs[8][0], 2)
  assert two_task_runs[8][1]["devices"]["count"] == 8
  assert jax.tree.structure(params1) == jax.tree.structure(params8)
  assert max_abs_diff(params8, params1) < TOL
  assert max_abs_diff(stats8, stats1) < TOL
  maps1 = [t["map_seen"] for t in two_task_runs[1][1]["tasks"]]
  maps8 = [t["map_seen"] for t in two_task_runs[8][1]["tasks"][:2]]
  np.testing.assert_allclose(maps8, maps1, atol=1e-3)


def test_later_tasks_compile_nothing(two_task_runs):
  """Task 3 reuses every executable of task 2: the train step (fixed batch
  shape, the last partial batch dropped), evaluation (the last batch padded
  to eval_batch), replay selection and the relabel pass."""
  _, results, counter = two_task_runs[8]
  assert len(counter.at_task_end) == 3, counter.at_task_end
  assert counter.at_task_end[0] > 0  # the counter sees compiles at all
  assert counter.at_task_end[2] - counter.at_task_end[1] == 0
  assert results["compilations"] == {"first": 1, "later": 1}


def test_more_devices_than_visible_is_one_line():
  from rebll_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  visible = len(jax.devices())
  with pytest.raises(UserError) as error:
    parallel.make_mesh(visible + 1)
  assert str(error.value) == (f"num_devices={visible + 1} but only {visible} "
                              "devices are visible")
