"""train.ddp_processes: a PyTorch DDP run of N processes without SyncBatchNorm.

Each emulated process normalises its own rows (rows g, g + N, ... of a
batch, as torch's DistributedSampler deals them) with its own statistics,
the running averages follow process 0's, and a summed L_cls is divided by N
(the loss side is checked against the baseline's trainer in
test_methods.py). Here: one norm against flax's BatchNorm applied to each
group alone; every backbone family's train-mode forward and gradient
against the same model run on each group separately; the config checks,
the field settings and resuming a checkpoint written before the field.
"""

import importlib
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import config_base, run_identity, validate
from rebll_jax.errors import UserError
from rebll_jax.models import build_model, init_variables, norm
from rebll_jax.models import small_resnet
from tests.helpers import make_config, norm_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def _rows(tree, group, groups):
  return jax.tree.map(lambda a: a[group::groups], tree)


@pytest.mark.parametrize("slope", [None, 0.0, 0.1])
def test_grouped_norm_is_flax_batchnorm_per_group(slope):
  groups = 3
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 2.0, (12, 4, 4, 5)), jnp.float32)
  # Groups with different statistics, so that a global norm would differ.
  x = x * jnp.asarray([1.0, 3.0, 0.5] * 4)[:, None, None, None]
  weights = jnp.asarray(rng.normal(0, 1, x.shape), jnp.float32)
  variables = norm_variables(rng, 5)
  ours = norm.BatchNorm(momentum=0.9, epsilon=1e-5, slope=slope,
                        groups=groups)
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9,
                        epsilon=1e-5)
  act = {None: lambda y: y, 0.0: nn.relu}.get(
      slope, lambda y: nn.leaky_relu(y, slope))

  def loss_ours(v, x):
    y, upd = ours.apply(v, x, mutable=["batch_stats"])
    return jnp.sum(y * weights), (y, upd)

  def loss_groups(v, x):  # each group through flax alone, summed
    total, ys, upds = 0.0, [], []
    for g in range(groups):
      y, upd = theirs.apply(v, x[g::groups], mutable=["batch_stats"])
      y = act(y)
      total += jnp.sum(y * weights[g::groups])
      ys.append(y)
      upds.append(upd)
    return total, (ys, upds)

  grad = lambda f: jax.jit(jax.value_and_grad(  # noqa: E731
      f, argnums=(0, 1), has_aux=True))
  (l1, (y1, u1)), g1 = grad(loss_ours)(variables, x)
  (l0, (y0, u0)), g0 = grad(loss_groups)(variables, x)
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-4)
  for g in range(groups):
    np.testing.assert_allclose(y1[g::groups], y0[g], rtol=1e-5, atol=1e-5)
  # Running averages: group 0's statistics (process 0's).
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u0[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(u1["batch_stats"]["var"], u0[1]["batch_stats"]["var"])
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_one_group_is_the_ungrouped_norm():
  """groups=1 keeps nn.BatchNorm for the flax impl and computes the same
  function with the fused one (the default path is untouched)."""
  assert isinstance(norm.norm_act("flax", True, jnp.float32, "bn"),
                    nn.BatchNorm)
  grouped = norm.norm_act("flax", True, jnp.float32, "bn", groups=2)
  assert isinstance(grouped, norm.BatchNorm) and grouped.groups == 2


def test_every_norm_of_a_backbone_is_per_process():
  """The small ResNet with 2 groups = the plain model run on each process's
  rows alone: outputs, the gradient (summed over processes, as DDP's summed
  all-reduce of per-process gradients) and process 0's statistics. (Every
  arch's wiring: the next test.)"""
  images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (8, 32, 32, 3)),
                       jnp.float32)
  images = images * jnp.asarray([1.0, 0.4] * 4)[:, None, None, None]
  grouped, plain = (small_resnet.SmallResNet(7, width=8, stage_sizes=(1, 1),
                                             norm_groups=g) for g in (2, 1))
  variables = init_variables(plain, jax.random.key(0), 32)
  variables = jax.tree.map(lambda a: a + 0.3, variables)

  def loss(model, v, x):
    out, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out["logits"] ** 2), (out["logits"], upd)

  step = lambda m: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda v, x: loss(m, v, x), has_aux=True))
  (l2, (z2, u2)), g2 = step(grouped)(variables, images)
  per_process = [step(plain)(variables, images[p::2]) for p in range(2)]
  np.testing.assert_allclose(
      l2, sum(float(r[0][0]) for r in per_process), rtol=1e-4)
  for p, ((_, (z, _)), _) in enumerate(per_process):
    np.testing.assert_allclose(z2[p::2], z, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(per_process[0][0][1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  summed = jax.tree.map(lambda a, b: a + b, per_process[0][1],
                        per_process[1][1])
  # Rounding grows with depth (a norm over few values amplifies it, leaf by
  # leaf as much as reordering the rows does): judged over the whole
  # gradient, where reordering moves ~5e-6 and a norm over the wrong rows
  # moves it by percents.
  flat = lambda tree: np.concatenate(  # noqa: E731
      [np.ravel(a) for a in jax.tree.leaves(tree)])
  err = np.linalg.norm(flat(g2) - flat(summed)) / np.linalg.norm(flat(summed))
  assert err < 1e-4, err
  # And it is not the whole-batch norm.
  (l1, _), _ = step(plain)(variables, images)
  assert abs(float(l1) - float(l2)) > 1e-3 * abs(float(l1))


@pytest.mark.parametrize("arch", ["small_resnet", "resnet50", "tresnet_m"])
def test_every_batchnorm_of_every_arch_gets_the_groups(arch):
  """Traced only (no compile): each train-mode norm of the model built with
  norm_groups=2 (and given row weights, train.last_batch=keep) is our
  grouped, weighted BatchNorm, and there is one per norm of the parameter
  tree."""
  c = config_base.base_config()
  c.model.arch = arch
  c.model.norm_impl = "flax"  # groups must override it
  model = build_model(c.model, 3, norm_groups=2)
  images = jnp.zeros((4, 32, 32, 3))
  weighted = model.clone(norm_row_weight=jnp.asarray([1., 1., 1., 0.]))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  seen = []

  def record(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and
        isinstance(context.module, (norm.BatchNorm, nn.BatchNorm))):
      seen.append((getattr(context.module, "groups", 1),
                   getattr(context.module, "row_weight", None) is not None))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: weighted.apply(v, images, train=True,
                                            mutable=["batch_stats"]),
                   variables)
  norms = len(jax.tree.leaves(variables["batch_stats"])) // 2
  assert norms > 0 and seen == [(2, True)] * norms


@pytest.mark.parametrize("processes,batch,ok", [
    (1, 1, True), (2, 4, True), (4, 8, True), (2, 3, False), (4, 4, False),
    (2, 2, False)])
def test_processes_must_split_the_batch(processes, batch, ok):
  c = config_base.base_config()
  c.train.ddp_processes, c.train.global_batch = processes, batch
  if ok:
    validate.check_ddp_processes(c.train)
  else:
    with pytest.raises(UserError, match="train.ddp_processes"):
      validate.check_ddp_processes(c.train)


def test_the_field_settings_emulate_the_shipped_two_process_scripts():
  for name, setting in (("coco", "b0c10_field"), ("voc", "b0c4_field")):
    config = importlib.import_module(f"configs.{name}").get_config(setting)
    assert config.train.ddp_processes == 2
    assert config.train.global_batch == 128  # 2 x 64, as the scripts
  for name, setting in (("coco", "b0c10"), ("synthetic", "b0c4_field")):
    config = importlib.import_module(f"configs.{name}").get_config(setting)
    assert config.train.ddp_processes == 1


def test_a_checkpoint_from_before_the_field_resumes_only_with_one():
  config = config_base.base_config()
  saved = {"config": run_identity.flatten(config)}
  del saved["config"]["train.ddp_processes"]
  current = lambda: {"config": run_identity.flatten(config)}  # noqa: E731
  assert not run_identity.differences(saved, current())
  config.train.ddp_processes = 2
  assert any("train.ddp_processes" in d
             for d in run_identity.differences(saved, current()))


def test_a_run_builds_its_model_with_the_processes(tmp_path):
  from rebll_jax import train  # pylint: disable=g-import-not-at-top
  setup = train.set_up(make_config(**{"train.ddp_processes": 2}),
                       str(tmp_path))
  setup.lock.release()
  assert setup.model.norm_groups == 2
