"""rebll_jax.models.pool: the slices max pool equals flax's, values and
gradients (ties and padding included), and the backbones route to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebll_jax import config_base
from rebll_jax.models import pool
from tests import helpers

CASES = [  # (shape, window, strides, padding)
    ((2, 12, 12, 16), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem
    ((1, 9, 7, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),  # odd sizes
    ((2, 8, 8, 4), (2, 2), (2, 2), ((0, 0), (0, 0))),  # no overlap
    ((1, 7, 8, 3), (3, 2), (1, 2), ((0, 1), (1, 0))),  # asymmetric
]


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_slices_equals_xla(shape, window, strides, padding, ties):
  rng = np.random.default_rng(len(shape) + shape[1])
  x = rng.standard_normal(shape).astype(np.float32)
  if ties:  # post-ReLU maps: many equal maxima (zeros, rounded values)
    x = np.round(np.maximum(x, 0))
  results = {}
  for impl in pool.IMPLS:
    f = lambda x, impl=impl: pool.max_pool(x, window, strides, padding, impl)
    y, vjp = jax.vjp(jax.jit(f), x)
    g = rng.standard_normal(y.shape).astype(np.float32) if not results else (
        results["xla"][2])
    results[impl] = (y, vjp(g)[0], g)
  (y0, dx0, _), (y1, dx1, _) = results["xla"], results["slices"]
  np.testing.assert_array_equal(y1, y0)
  np.testing.assert_allclose(dx1, dx0, rtol=0, atol=1e-6)
  # Every cotangent went to exactly one input.
  np.testing.assert_allclose(dx1.sum(), results["xla"][2].sum(), rtol=1e-5)


def test_unknown_impl_rejected():
  with pytest.raises(ValueError, match="max-pool impl"):
    pool.max_pool(jnp.zeros((1, 4, 4, 1)), (2, 2), (2, 2), ((0, 0), (0, 0)),
                  "fast")


def test_resnet_routes_the_pool_by_conv_impl():
  cfg = config_base.base_config().model
  cfg.arch = "resnet18"
  x = jnp.zeros((1, 32, 32, 3))
  texts = {}
  for impl, (model, variables) in helpers.models_per_conv_impl(
      cfg, ("xla", "gemm"), 3, x).items():
    grad = jax.grad(lambda v, m=model: jnp.sum(m.apply(v, x)["logits"]))
    texts[impl] = jax.jit(grad).lower(variables).as_text()
  assert "select_and_scatter" in texts["xla"]
  assert "select_and_scatter" not in texts["gemm"]
