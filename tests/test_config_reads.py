"""Overrides that another choice of the config leaves unread are refused.

Before, ``--config.model.width=32`` under ``model.arch=resnet50`` or
``--config.optim.momentum=0.5`` under Adam trained the same model as without
the override and exited 0: a sweep over such a knob reported one run several
times. The config file's own values are never refused (a file may set a knob
for every choice); only an override that differs from the file is.
"""

import pytest

from rebll_jax import config_reads, validate
from rebll_jax.errors import UserError
from tests.helpers import make_config
from configs import test as test_config

UNREAD = [
    # (the override, the choices that leave it unread)
    ({"model.width": 32}, {"model.arch": "resnet18"}),
    ({"model.stage_sizes": (2, 2)}, {"model.arch": "resnet50"}),
    ({"model.stem_stride": 1}, {"model.arch": "tresnet_m"}),
    ({"optim.momentum": 0.5}, {"optim.name": "adam"}),
    ({"optim.momentum": 0.5}, {"optim.name": "adamw"}),
    ({"optim.warmup_frac": 0.3}, {"optim.schedule": "constant"}),
    ({"augment.randaugment_ops": 2}, {"augment.policy": "field"}),
    ({"augment.randaugment_magnitude": 0.5}, {"augment.policy": "field"}),
    ({"augment.randaugment_magnitude": 0.5}, {"augment.randaugment_ops": 0}),
    ({"augment.cutout_fill": "random"}, {"augment.cutout": 0.0}),
    ({"memory.fraction": 0.5}, {"memory.mix": "uniform"}),
    ({"data.synthetic.num_train": 500}, {"data.source": "voc2007"}),
]

# The same overrides where the choice reads them.
READ = [
    ({"model.width": 32}, {"model.arch": "small_resnet"}),
    ({"optim.momentum": 0.5}, {"optim.name": "sgd"}),
    ({"optim.warmup_frac": 0.3}, {"optim.schedule": "cosine"}),
    ({"augment.randaugment_magnitude": 0.5}, {"augment.randaugment_ops": 2}),
    ({"augment.cutout_fill": "random"}, {"augment.cutout": 0.5}),
    ({"memory.fraction": 0.5}, {"memory.mix": "fraction"}),
]


def _setting(**choices):
  """A config file's own config: configs/test.py with ``choices``."""
  return make_config(**choices)


@pytest.mark.parametrize("override,choices", UNREAD,
                         ids=[next(iter(o)) for o, _ in UNREAD])
def test_an_unread_override_is_named_with_its_reason(override, choices):
  setting = _setting(**choices)
  config = make_config(**choices, **override)
  (field,) = override
  unread = config_reads.unread_overrides(config, setting)
  assert list(unread) == [field]
  with pytest.raises(UserError) as error:
    validate.check_config(config, setting)
  message = str(error.value)
  assert f"nothing reads {field} " in message
  assert unread[field] in message and "\n" not in message


@pytest.mark.parametrize("override,choices", READ,
                         ids=[next(iter(o)) for o, _ in READ])
def test_the_same_override_where_it_is_read_passes(override, choices):
  config = make_config(**choices, **override)
  assert config_reads.unread_overrides(config, _setting(**choices)) == {}


def test_the_files_own_values_and_a_changed_choice_are_not_overrides():
  # configs/test.py sets model.width=8: switching the arch from the command
  # line leaves that value as the file has it, not an override.
  setting = test_config.get_config()
  assert setting.model.width != 16
  config = make_config(**{"model.arch": "resnet18"})
  assert config_reads.unread_overrides(config, setting) == {}
  # An override equal to the file's value is no override either.
  config = make_config(**{"model.arch": "resnet18", "model.width": 8})
  assert config_reads.unread_overrides(config, setting) == {}


def test_without_a_setting_nothing_is_judged():
  # train.run called from code: no file to tell an override from a choice.
  config = make_config(**{"model.arch": "resnet18", "model.width": 32})
  validate.check_config(config)


def test_every_rule_names_fields_of_the_base_config():
  config = make_config()
  for rule in config_reads.RULES:
    for name in rule.fields:
      config_reads.field_value(config, name)


def test_several_reasons_are_one_line():
  setting = _setting(**{"model.arch": "resnet18"})
  config = make_config(**{"model.arch": "resnet18", "model.width": 32,
                          "optim.momentum": 0.5})
  with pytest.raises(UserError) as error:
    validate.check_config(config, setting)
  message = str(error.value)
  assert "model.width, optim.momentum" in message
  assert "small_resnet only" in message and "SGD's" in message


def test_joint_warns_of_the_protocol_it_does_not_read(caplog):
  # One task over all classes whatever the protocol: a sweep over methods
  # sets it for every method, so the joint row runs, with a warning.
  setting = _setting(method="joint")
  config = make_config(**{"method": "joint", "protocol.num_tasks": 2,
                          "protocol.increment": 5, "optim.lr_later": 0.5})
  validate.check_config(config, setting)
  assert ("method 'joint' trains one task over all classes: "
          "protocol.increment=5, protocol.num_tasks=2, optim.lr_later=0.5 "
          "not read") in caplog.text
  caplog.clear()
  validate.check_config(make_config(method="joint"), setting)
  validate.check_config(make_config(**{"protocol.num_tasks": 2}), _setting())
  assert "not read" not in caplog.text
