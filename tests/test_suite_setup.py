"""The test session's own setup (conftest.py) does what it says."""

import os

import jax
import jax.numpy as jnp
import numpy as np


def test_eight_virtual_devices():
  assert jax.device_count() == 8


def test_compiled_programs_land_in_the_session_cache():
  folder = os.environ["JAX_COMPILATION_CACHE_DIR"]
  assert jax.config.jax_compilation_cache_dir == folder
  before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
  # A constant drawn here makes the program new to the cache.
  salt = float(np.random.default_rng().integers(1, 2**30))
  out = jax.jit(lambda x: jnp.cos(x) * salt)(jnp.ones(3))
  np.testing.assert_allclose(out, np.cos(1.0) * salt, rtol=1e-6)
  added = set(os.listdir(folder)) - before
  assert any(name.endswith("-cache") for name in added), added
