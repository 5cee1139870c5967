"""Every shipped setting of every config file passes the run's own checks.

A setting no test ran end to end once failed for every user (the
``pretrained_*`` settings carried a block the config check did not know):
here each one is loaded and put through ``config_checks.check_values`` and
``validate.check_all``, with its own method and with every method, in well
under a second each (no data, no model).
"""

import importlib
import os
import sys

import pytest

from rebll_jax import config_checks, methods, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


def _settings():
  """(module name, setting argument, class count of its dataset)."""
  out = [("test", None, 20), ("coco_format", "b0c10", 80),
         ("coco_format", "b40c10_field", 80)]
  for name, num_classes in (("synthetic", 20), ("voc", 20), ("coco", 80)):
    module = importlib.import_module(f"configs.{name}")
    for setting in module.SETTINGS:
      out.append((name, setting, num_classes))
      if not setting.endswith("joint"):
        out.append((name, f"{setting}_field", num_classes))
  return out


SETTINGS = _settings()


@pytest.mark.parametrize("module,setting,num_classes", SETTINGS,
                         ids=[f"{m}:{s}" for m, s, _ in SETTINGS])
def test_setting_passes_the_run_checks(module, setting, num_classes):
  get_config = importlib.import_module(f"configs.{module}").get_config
  config = get_config(setting)
  config_checks.check_values(config)
  validate.check_all(config, num_classes=num_classes, num_devices=1,
                     setting=get_config(setting))
  if config.method == "joint":
    return
  for method in methods.METHODS:  # a sweep over --config.method=M
    if method == "joint":
      continue
    config = get_config(setting)
    config.method = method
    validate.check_all(config, num_classes=num_classes, num_devices=1,
                       setting=get_config(setting))


def test_a_setting_knob_is_not_an_override_but_an_override_still_is():
  from configs import synthetic
  from rebll_jax.errors import UserError
  setting = synthetic.get_config("pretrained_b0c4")
  assert setting.loss.decay_on == "score"  # read by rebll, not by lwf
  config = synthetic.get_config("pretrained_b0c4")
  config.method = "lwf"
  validate.check_config(config, setting)  # the setting chose it: fine
  with pytest.raises(UserError, match="does not read loss.decay_on"):
    validate.check_config(config)  # against the base config: an override
  config.loss.beta = 0.5  # --config.loss.beta=0.5 with lwf
  with pytest.raises(UserError, match="does not read loss.beta"):
    validate.check_config(config, setting)


def test_every_setting_is_covered():
  assert ("synthetic", "pretrained_b10c2", 20) in SETTINGS
  assert ("coco", "b40c10_field", 80) in SETTINGS
  assert len(SETTINGS) >= 20


def test_the_test_config_refuses_a_setting_it_would_ignore():
  # configs/test.py:b10c2 used to run B0-C4 without a word.
  from configs import test as test_config
  with pytest.raises(ValueError, match="has no settings"):
    test_config.get_config("b10c2")
  assert test_config.get_config(None).protocol.increment == 4
  assert test_config.get_config("").protocol.increment == 4
