"""Config fields a run never reads, given the rest of its config.

Some knobs matter only under another choice: the small ResNet's width under
``model.arch=small_resnet``, SGD's momentum under ``optim.name=sgd``. Set
under any other choice, such an override is a silent no-op, and a sweep over
it reports the same run several times under different names.
``unread_overrides`` names each such field whose value differs from the
config file's own (a file may set a knob for every choice; only a changed
value is an override), with the reason. ``validate.check_config`` refuses
them together with the knobs the method does not read
(``methods.Method.ignored_config``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class _Unread:
  """``fields`` go unread when ``applies(config)``; ``why(config)`` says so."""

  fields: tuple[str, ...]
  applies: Callable[..., bool]
  why: Callable[..., str]


def _synthetic_fields() -> tuple[str, ...]:
  from rebll_jax import config_base  # pylint: disable=g-import-not-at-top
  return tuple(f"data.synthetic.{k}"
               for k in config_base.base_config().data.synthetic)


RULES = (
    _Unread(("model.width", "model.stage_sizes", "model.stem_stride"),
            lambda c: c.model.arch != "small_resnet",
            lambda c: f"they shape small_resnet only; model.arch "
                      f"{c.model.arch!r} has a fixed shape"),
    _Unread(("optim.momentum",),
            lambda c: c.optim.name != "sgd",
            lambda c: f"it is SGD's; optim.name {c.optim.name!r} has none "
                      "(Adam's beta1 schedule: optim.cycle_beta1)"),
    _Unread(("optim.warmup_frac",),
            lambda c: c.optim.schedule == "constant",
            lambda c: "optim.schedule 'constant' has no warm-up"),
    _Unread(("augment.randaugment_ops", "augment.randaugment_magnitude"),
            lambda c: c.augment.policy == "field",
            lambda c: "augment.policy 'field' runs the baseline's own "
                      "RandAugment"),
    _Unread(("augment.randaugment_magnitude",),
            lambda c: c.augment.randaugment_ops == 0,
            lambda c: "augment.randaugment_ops=0 turns RandAugment off"),
    _Unread(("augment.cutout_fill",),
            lambda c: c.augment.cutout == 0,
            lambda c: "augment.cutout=0 turns cutout off"),
    _Unread(("memory.fraction",),
            lambda c: c.memory.mix != "fraction",
            lambda c: f"memory.mix {c.memory.mix!r} draws replay in "
                      "proportion to its size; memory.fraction needs "
                      "memory.mix=fraction"),
    _Unread(_synthetic_fields(),
            lambda c: c.data.source != "synthetic",
            lambda c: f"data.source is {c.data.source!r}"),
)


# What method=joint (one task over all classes) does not read: the protocol
# and what later tasks train with. Not refused, only warned of: a sweep over
# methods sets them once for every method, its joint upper bound included
# (as it sets memory sizes).
JOINT_IGNORES = ("protocol.base", "protocol.increment", "protocol.num_tasks",
                 "train.epochs_later", "optim.lr_later")


def joint_ignored_overrides(config, setting) -> list[str]:
  """The ``JOINT_IGNORES`` fields in which ``config`` differs from
  ``setting`` (the config file's own config)."""
  return [name for name in JOINT_IGNORES
          if field_value(config, name) != field_value(setting, name)]


def field_value(config, dotted: str):
  """``config``'s value at ``dotted`` ("a.b.c"), lists as tuples."""
  for part in dotted.split("."):
    config = config[part]
  return tuple(config) if isinstance(config, list) else config


def unread_overrides(config, setting) -> dict[str, str]:
  """{field: reason} for each field of ``config`` that differs from
  ``setting`` (the config file's own config) and that nothing reads under
  ``config``'s other choices. Each field is named once, with its first
  reason."""
  unread: dict[str, str] = {}
  for rule in RULES:
    if not rule.applies(config):
      continue
    for name in rule.fields:
      if name not in unread and (field_value(config, name)
                                 != field_value(setting, name)):
        unread[name] = rule.why(config)
  return unread
