"""rebll_jax.models.conv: the matmul_grad and gemm impls equal XLA's.

Values and gradients (input and filter) of ``conv2d`` under jit, for the
kernel / stride / padding combinations the backbones use (1x1 and 1x1
stride 2 take the GEMM filter gradient; 3x3, 3x3 stride 2 and the 7x7
stride-2 stem are routed to XLA's; 3x3 convs with a 1- or 2-row output
map run as tap GEMMs), at even and odd sizes; for ``gemm`` also 1x1 convs
as dots, RGB (cin <= 4) convs as one im2col GEMM, the input gradient of
strided convs by phases (stride 2 and 3) and the filter gradient behind the
fusion barrier; plus a whole model: one jitted gradient of a small ResNet,
each impl vs ``xla``, and identical parameter trees (names, shapes, values)
to nn.Conv.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import config_base
from rebll_jax.models import build_model, conv, cpu_kernels, small_resnet

CASES = [  # (kernel, stride, pad, cin, cout, size)
    (1, 1, 0, 8, 16, 9),
    (1, 2, 0, 8, 16, 9),
    (3, 1, 1, 6, 8, 8),
    (3, 2, 1, 6, 8, 9),
    (7, 2, 3, 3, 8, 15),
    (3, 1, 1, 4, 4, 1),  # a 1x1 map: tap GEMMs
    (3, 1, 1, 8, 8, 2),  # a 2x(3) map: tap GEMMs
    (3, 2, 1, 8, 8, 4),  # 4 -> 2 at stride 2: tap GEMMs
    (3, 2, 1, 3, 8, 10),  # RGB stem: im2col under gemm
    (3, 3, 1, 6, 5, 11),  # stride 3: s*s input-gradient phases
    (2, 2, 0, 6, 5, 8),  # even kernel, no padding: phases of unequal taps
]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.mark.parametrize("impl", ["matmul_grad", "gemm"])
@pytest.mark.parametrize("k,s,p,cin,cout,size", CASES)
def test_values_and_grads_equal_xla(k, s, p, cin, cout, size, impl):
  rng = np.random.default_rng(k * 10 + s)  # numpy: no RNG compiles
  x = rng.standard_normal((2, size, size + 1, cin), np.float32)
  w = rng.standard_normal((k, k, cin, cout), np.float32)

  out = (size - 1) // s + 1 if k == 1 else (size + 2 * p - k) // s + 1
  out_w = (size + 1 - 1) // s + 1 if k == 1 else (size + 1 + 2 * p - k) // s + 1
  g = rng.standard_normal((2, out, out_w, cout), np.float32)

  def run(impl):
    f = lambda x, w: conv.conv2d(x, w, strides=(s, s), padding=((p, p),) * 2,
                                 impl=impl)

    @jax.jit
    def value_and_grads(x, w):  # one compile per impl
      y, vjp = jax.vjp(f, x, w)
      return y, vjp(g)

    return value_and_grads(x, w)

  y0, (dx0, dw0) = run("xla")
  y1, (dx1, dw1) = run(impl)
  assert y1.shape == y0.shape and dw1.shape == w.shape
  assert _rel(y1, y0) < 1e-6
  assert _rel(dx1, dx0) < 1e-5
  assert _rel(dw1, dw0) < 1e-5


def test_bfloat16_grad_dtype_and_close():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.bfloat16)
  grads = {}
  for impl in ("xla", "matmul_grad", "gemm"):
    f = lambda x, w: jnp.sum(conv.conv2d(x, w, strides=(2, 2),
                                         padding=((1, 1),) * 2,
                                         impl=impl).astype(jnp.float32) ** 2)
    grads[impl] = jax.jit(jax.grad(f, (0, 1)))(x, w)
  for impl in ("matmul_grad", "gemm"):
    for got, ref in zip(grads[impl], grads["xla"]):
      assert got.dtype == jnp.bfloat16
      assert _rel(got, ref) < 2e-2


def test_auto_resolves_per_backend_and_rejects_unknown():
  expected = "xla"
  if jax.default_backend() == "cpu":  # our kernels where they build
    expected = "kernel" if cpu_kernels.available() else "gemm"
  assert conv.resolve_impl("auto") == expected
  assert conv.resolve_impl("xla") == "xla"
  with pytest.raises(ValueError, match="valid"):
    conv.resolve_impl("fast")


def test_params_identical_to_flax_conv():
  x = jnp.ones((1, 5, 5, 3))
  ours = conv.Conv(4, (3, 3), 2, padding=((1, 1), (1, 1)))
  ref = nn.Conv(4, (3, 3), 2, padding=((1, 1), (1, 1)))
  key = jax.random.key(3)
  p_ours, p_ref = ours.init(key, x), ref.init(key, x)
  assert jax.tree.structure(p_ours) == jax.tree.structure(p_ref)
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(p_ours, x), ref.apply(p_ref, x),
                             rtol=1e-6, atol=1e-6)


def test_model_gradient_equal_and_config_switch():
  cfg = config_base.base_config().model
  cfg.width, cfg.stage_sizes = 4, (1, 1)
  models = {}
  for impl in ("xla", "matmul_grad", "gemm"):
    cfg.conv_impl = impl
    models[impl] = build_model(cfg, 5)
    assert models[impl].conv_impl == impl
  assert isinstance(models["xla"], small_resnet.SmallResNet)
  x = np.random.default_rng(0).uniform(size=(4, 12, 12, 3)).astype(
      np.float32)
  variables = jax.jit(models["xla"].init)(jax.random.key(1), x)
  grads = {}
  for impl, model in models.items():
    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out["logits"] ** 2) + jnp.sum(out["features"])
    grads[impl] = jax.jit(jax.grad(loss))(variables["params"])
  for impl in ("matmul_grad", "gemm"):
    for a, b in zip(jax.tree.leaves(grads[impl]),
                    jax.tree.leaves(grads["xla"])):
      assert _rel(a, b) < 1e-4


def test_fusion_barrier_is_the_identity_and_differentiable():
  x = jnp.arange(6.0).reshape(2, 3)
  tree = {"a": x, "b": -x}
  out = jax.jit(conv._fusion_barrier)(tree, jnp.float32(jnp.nan))  # NaN token
  np.testing.assert_array_equal(out["a"], x)
  np.testing.assert_array_equal(out["b"], -x)
