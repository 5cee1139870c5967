"""rebll_jax.models.norm: the fused BatchNorm is nn.BatchNorm (+ activation).

Values, running statistics and every gradient against flax's module on the
same parameters, with no activation, a ReLU and a leaky ReLU; eval mode; a
batch sharded over devices; every backbone family built with either
norm_impl (same parameter tree, same outputs and gradients to float32
rounding).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rebll_jax import config_base
from rebll_jax.models import build_model, init_variables
from rebll_jax.models import norm
from rebll_jax.models import resnet
from rebll_jax.models import small_resnet
from rebll_jax.models import tresnet


def _flax(slope, train):
  module = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5)
  activation = {None: lambda y: y, 0.0: nn.relu}.get(
      slope, lambda y: nn.leaky_relu(y, slope))
  def apply(variables, x):
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    return activation(y), updates
  return apply


def _fused(slope, train):
  module = norm.BatchNorm(use_running_average=not train, momentum=0.9,
                          epsilon=1e-5, slope=slope)
  def apply(variables, x):
    return module.apply(variables, x, mutable=["batch_stats"])
  return apply


def _inputs(shape=(8, 5, 5, 6)):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.5, 2.0, shape), jnp.float32)
  variables = {
      "params": {"scale": jnp.asarray(rng.normal(1, 0.5, shape[-1]),
                                      jnp.float32),
                 "bias": jnp.asarray(rng.normal(0, 0.5, shape[-1]),
                                     jnp.float32)},
      "batch_stats": {"mean": jnp.asarray(rng.normal(0, 1, shape[-1]),
                                          jnp.float32),
                      "var": jnp.asarray(rng.uniform(0.5, 2, shape[-1]),
                                         jnp.float32)}}
  weights = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)
  return variables, x, weights


def test_same_parameter_tree_as_flax():
  x = jnp.ones((2, 3, 3, 4))
  ours = norm.BatchNorm().init(jax.random.key(0), x)
  theirs = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  assert (jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs))


@pytest.mark.parametrize("slope", [None, 0.0, 0.1])
@pytest.mark.parametrize("train", [True, False])
def test_values_stats_and_gradients_equal_flax(slope, train):
  variables, x, weights = _inputs()
  results = []
  for make in (_flax, _fused):
    apply = make(slope, train)
    loss = lambda v, x: jnp.sum(apply(v, x)[0] * weights)  # noqa: E731
    y, updates = apply(variables, x)
    grads = jax.grad(loss, argnums=(0, 1))(variables, x)
    results.append((y, updates, grads))
  (y0, u0, g0), (y1, u1, g1) = results
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u0)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  if train:  # the gradient wrt x is not trivially zero or the identity
    assert float(jnp.abs(g1[1]).max()) > 1e-2


class _NormAct(nn.Module):
  impl: str
  dtype: object

  @nn.compact
  def __call__(self, x):
    return norm.norm_act(self.impl, True, self.dtype, "bn", slope=0.0)(x)


def test_bfloat16_activations_match_flax():
  # Mixed precision (model.dtype=bfloat16): both keep the statistics in
  # float32 and return bfloat16 maps.
  variables, x, weights = _inputs()
  variables = {k: {"bn": v} for k, v in variables.items()}
  x = x.astype(jnp.bfloat16)
  results = []
  for impl in ("flax", "fused"):
    module = _NormAct(impl, jnp.bfloat16)
    apply = lambda v, module=module: module.apply(  # noqa: E731
        v, x, mutable=["batch_stats"])
    y, updates = apply(variables)
    assert y.dtype == jnp.bfloat16
    grads = jax.grad(lambda v, apply=apply: jnp.sum(
        apply(v)[0].astype(jnp.float32) * weights))(variables)
    results.append((y, updates, grads["params"]))
  (y0, u0, g0), (y1, u1, g1) = results
  np.testing.assert_allclose(np.asarray(y1, np.float32),
                             np.asarray(y0, np.float32), rtol=2e-2, atol=2e-2)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-1)
  assert float(jnp.abs(g1["bn"]["scale"]).max()) > 1.0


def test_sharded_batch_gives_global_statistics():
  n = len(jax.devices())
  assert n >= 2, "the suite runs with several CPU devices (conftest)"
  variables, x, weights = _inputs((4 * n, 3, 3, 5))
  apply = _fused(0.0, True)
  loss = lambda v, x: jnp.sum(apply(v, x)[0] * weights)  # noqa: E731
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  (l1, (gv1, gx1)), (l0, (gv0, gx0)) = step(variables, x_sharded), step(
      variables, x)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gv1), jax.tree.leaves(gv0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# Small members of each family; build_model's wiring is checked below.
FAMILIES = {
    "small_resnet": lambda impl: small_resnet.SmallResNet(
        7, width=8, stage_sizes=(1, 1), norm_impl=impl),
    "resnet_bottleneck": lambda impl: resnet.ResNet(
        7, stage_sizes=(1, 1, 1, 1), norm_impl=impl),
    "tresnet": lambda impl: tresnet.TResNet(
        7, stage_sizes=(1, 1, 1, 1), width=16, norm_impl=impl),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backbones_either_norm_impl(family):
  images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (4, 32, 32, 3)),
                       jnp.float32)
  models = {impl: FAMILIES[family](impl) for impl in ("flax", "fused")}
  # init_variables: the same values, compiled cheaply (xla_cpu.init_options).
  variables = init_variables(models["flax"], jax.random.key(0), 32)
  assert jax.tree.structure(variables) == jax.tree.structure(jax.eval_shape(
      lambda: models["fused"].init(jax.random.key(0), images, train=False)))
  # Non-trivial scales so that the zero-initialised last norms matter.
  variables = jax.tree.map(lambda a: a + 0.3, variables)

  def loss(model, v):
    out, updates = model.apply(v, images, train=True,
                               mutable=["batch_stats"])
    return jnp.sum(out["logits"] ** 2), updates

  # Jitted: op-by-op dispatch of a whole backbone's gradient is minutes.
  (l0, u0), g0 = jax.jit(jax.value_and_grad(
      lambda v: loss(models["flax"], v), has_aux=True))(variables)
  (l1, u1), g1 = jax.jit(jax.value_and_grad(
      lambda v: loss(models["fused"], v), has_aux=True))(variables)
  np.testing.assert_allclose(l1, l0, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    # Rounding grows with depth; judged against each array's own scale.
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1))
  evaluate = lambda m: jax.jit(  # noqa: E731
      lambda v: m.apply(v, images, train=False)["logits"])(variables)
  eval0, eval1 = evaluate(models["flax"]), evaluate(models["fused"])
  np.testing.assert_allclose(eval1, eval0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["small_resnet", "resnet50", "tresnet_m"])
def test_build_model_passes_norm_impl(arch):
  c = config_base.base_config()
  c.model.arch = arch
  images = jnp.zeros((2, 32, 32, 3))
  traced = {}
  for impl in norm.IMPLS:
    c.model.norm_impl = impl
    model = build_model(c.model, 3)
    variables = jax.eval_shape(
        lambda m=model: m.init(jax.random.key(0), images))
    traced[impl] = str(jax.make_jaxpr(
        lambda v, m=model: m.apply(v, images, train=True,
                                   mutable=["batch_stats"]))(variables))
  # The closed-form gradient is a custom_vjp named after its function.
  assert "name=_fused_batch_norm" in traced["fused"]
  assert "name=_fused_batch_norm" not in traced["flax"]
  assert "name=_fused_batch_norm" in traced["auto"]  # on a CPU backend


def test_auto_resolves_by_backend(monkeypatch):
  assert norm.resolve_impl("auto") == "fused"  # the suite runs on CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert norm.resolve_impl("auto") == "flax"
  assert norm.resolve_impl("fused") == "fused"


def test_config_saved_before_the_field_builds_flax_norms():
  c = config_base.base_config()
  del c.model["norm_impl"]
  model = build_model(c.model, 3)
  assert model.norm_impl == "flax"


def test_unknown_norm_impl_is_an_error():
  c = config_base.base_config()
  c.model.norm_impl = "fast"
  with pytest.raises(ValueError, match="unknown model.norm_impl 'fast'"):
    build_model(c.model, 3)
