"""Shared test helpers."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from rebll_jax import checkpoint


def usage_error_line(main, argv, capsys) -> str:
  """The last stderr line of ``main(argv)``, which must be a usage error
  (SystemExit 2) without a traceback."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2, argv
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return err.strip().splitlines()[-1]


def make_config(**overrides):
  """configs/test.py with dotted-key overrides: make_config(**{"a.b": 1})."""
  config = test_config.get_config()
  config.unlock()
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  config.lock()
  return config


def models_per_conv_impl(model_config, conv_impls, num_classes, x):
  """{impl: (model, variables)}: the model of ``model_config`` built under
  each ``model.conv_impl`` (sets the field), its variables abstract
  (``jax.eval_shape``: shapes only, nothing initialised)."""
  from rebll_jax.models import build_model  # pylint: disable=g-import-not-at-top
  models = {}
  for impl in conv_impls:
    model_config.conv_impl = impl
    model = build_model(model_config, num_classes)
    models[impl] = (model,
                    jax.eval_shape(model.init, jax.random.key(0), x))
  return models


def max_abs_diff(a, b) -> float:
  """Largest |a - b| over the leaves of two pytrees of arrays."""
  return max(float(np.max(np.abs(np.asarray(x, np.float64) -
                                 np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def params_after_task(workdir, task):
  """(params, batch_stats) of the checkpoint taken at the end of ``task``."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    number = next(n for n in ckpt.steps()
                  if ckpt.read_meta(n)["task"] == task
                  and ckpt.read_meta(n)["task_step"] == 0)
    # Restored onto this process's first device whatever topology wrote it
    # (another process count or mesh size).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    metadata = ocp.StandardCheckpointer().metadata(
        os.path.join(ckpt.directory, str(number), "state")).item_metadata
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata)
    tree = ckpt.manager.restore(number, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  finally:
    ckpt.close()
  return tree["train"]["params"], tree["train"]["batch_stats"]


def norm_variables(rng, channels: int) -> dict:
  """A BatchNorm's variables: random scale and bias, fresh statistics."""
  normal = lambda mean: np.asarray(  # noqa: E731
      rng.normal(mean, .3, channels), np.float32)
  return {"params": {"scale": normal(1.0), "bias": normal(0.0)},
          "batch_stats": {"mean": np.zeros(channels, np.float32),
                          "var": np.ones(channels, np.float32)}}
