"""Shared test helpers."""

from configs import test as test_config


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
