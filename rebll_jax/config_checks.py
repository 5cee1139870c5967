"""Every numeric config field in range, from one table (before any compile).

``RULES`` maps each int and float field of ``config_base.base_config()`` to
its rule: the type, the closed or open range, and the sentinels a field takes
outside it (``-1`` = "off" or "all"). ``tests/test_cli.py`` walks every field
of the base config and fails when one has no rule, so a new knob cannot skip
its check. Cross-field conditions (a low threshold below its high one, a batch
the devices can share, a class split that fits) stay in ``validate``.

``check_values`` also refuses a config that lacks a field of the base config
or has one the base config does not (a config file that was not started
from ``base_config()``, or a typo that would otherwise be silently ignored).
"""

from __future__ import annotations

import dataclasses
import math

from rebll_jax.errors import UserError

# jax.random.key keeps only the low 32 bits of a seed (64-bit mode is off):
# seed 2**32 would silently repeat seed 0, and past 2**63 it overflows.
SEED_MAX = 2**32 - 1
# Steps, batch sizes and counters meet int32 on the device.
INT_MAX = 2**31 - 1

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class Rule:
  """A numeric field's type and allowed values."""

  kind: type  # int or float (an int is accepted for a float field)
  low: float = -_INF
  high: float = _INF
  low_open: bool = False
  high_open: bool = False
  sentinels: tuple = ()  # allowed outside [low, high]
  negative_sentinel: bool = False  # any value < 0 allowed ("same as ...")
  choices: tuple = ()  # when set, the only allowed values
  why: str = ""  # said after the range in the message

  def holds(self, value) -> bool:
    if self.choices:
      return value in self.choices
    if value in self.sentinels or (self.negative_sentinel and value < 0):
      return True
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return above and below

  def describe(self) -> str:
    noun = "an integer" if self.kind is int else "a finite number"
    if self.choices:
      return f"one of {list(self.choices)}"
    if self.high == _INF:
      text = f"{noun} {'>' if self.low_open else '>='} {_num(self.low)}"
    elif self.low == -_INF:
      text = f"{noun} {'<' if self.high_open else '<='} {_num(self.high)}"
    else:
      text = (f"{noun} in {'(' if self.low_open else '['}{_num(self.low)}, "
              f"{_num(self.high)}{')' if self.high_open else ']'}")
    if self.negative_sentinel:
      text += ", or < 0"
    for s in self.sentinels:
      text += f", or {_num(s)}"
    return text + (f" ({self.why})" if self.why else "")


def _num(x) -> str:
  if isinstance(x, int) and abs(x) >= 2**16:
    return f"2**{x.bit_length()}-1" if (x + 1) & x == 0 else str(x)
  return str(x)


def _int(low, high=INT_MAX, **kw) -> Rule:
  return Rule(int, low, high, **kw)


def _float(low, high=_INF, **kw) -> Rule:
  return Rule(float, low, high, **kw)


_SEED = _int(0, SEED_MAX, why="jax.random.key keeps 32 bits of a seed")
_POSITIVE = _float(0.0, low_open=True)
_NON_NEGATIVE = _float(0.0)
_UNIT = _float(0.0, 1.0)
_UNIT_BELOW_ONE = _float(0.0, 1.0, high_open=True)
_OPEN_UNIT = _float(0.0, 1.0, low_open=True, high_open=True)
_LOW_THRESHOLD = _float(0.0, 1.0, negative_sentinel=True)
_COUNT = _int(1)
_NON_NEGATIVE_INT = _int(0)
_STEP_OR_OFF = _int(0, sentinels=(-1,))

# field -> rule, for every int and float field of config_base.base_config().
RULES: dict[str, Rule] = {
    "seed": _SEED,
    "dist.num_processes": _NON_NEGATIVE_INT,  # 0 = from the environment
    "dist.process_id": _int(0, sentinels=(-1,)),  # -1 = from the env
    "dist.init_timeout_s": _COUNT,
    "num_devices": _NON_NEGATIVE_INT,  # 0 = all local devices
    "cpu_devices": _NON_NEGATIVE_INT,  # 0 = XLA's one CPU device
    "data.image_size": _int(8),
    "data.num_workers": _COUNT,
    "data.val_fraction": _UNIT_BELOW_ONE,
    "data.synthetic.num_train": _COUNT,
    "data.synthetic.num_test": _COUNT,
    "data.synthetic.seed": _SEED,
    "data.synthetic.render_size": _int(8),
    "protocol.base": _NON_NEGATIVE_INT,  # 0 = same as the increment
    "protocol.increment": _COUNT,
    "protocol.num_tasks": _int(1, sentinels=(-1,)),  # -1 = every task
    "model.width": _COUNT,
    "model.stem_stride": _int(1, 2, choices=(1, 2)),
    "optim.lr_first": _POSITIVE,
    "optim.lr_later": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.warmup_frac": _UNIT_BELOW_ONE,
    "optim.momentum": _UNIT_BELOW_ONE,
    "optim.grad_clip": _NON_NEGATIVE,  # 0 = off
    "train.global_batch": _COUNT,
    "train.ddp_processes": _COUNT,
    "train.epochs_first": _COUNT,
    "train.epochs_later": _COUNT,
    "train.eval_batch": _COUNT,
    "train.log_every": _COUNT,
    "train.checkpoint_every": _NON_NEGATIVE_INT,  # 0 = task ends only
    "train.keep_checkpoints": _COUNT,
    "augment.cutout": _UNIT,
    "augment.randaugment_ops": _NON_NEGATIVE_INT,
    "augment.randaugment_magnitude": _UNIT,
    "memory.per_class": _NON_NEGATIVE_INT,
    "memory.total": _NON_NEGATIVE_INT,
    "memory.fraction": _UNIT_BELOW_ONE,
    "loss.g_pos": _NON_NEGATIVE,
    "loss.g_neg": _NON_NEGATIVE,
    "loss.margin": _UNIT_BELOW_ONE,
    "loss.w_pos": _NON_NEGATIVE,
    "loss.w_neg": _NON_NEGATIVE,
    "loss.lambda_kd": _NON_NEGATIVE,
    "loss.temperature": _POSITIVE,
    "loss.beta": _NON_NEGATIVE,
    "loss.pod_flat_weight": _NON_NEGATIVE,
    "relabel.tau_old": _OPEN_UNIT,
    "relabel.tau_cur": _OPEN_UNIT,
    "relabel.tau_old_low": _LOW_THRESHOLD,  # < 0 = same as tau_old
    "relabel.tau_cur_low": _LOW_THRESHOLD,  # < 0 = same as tau_cur
    "relabel.tau_pseudo": _OPEN_UNIT,
    "relabel.warmup_frac": _UNIT,
    "relabel.chunk": _COUNT,
    "eval.threshold": _OPEN_UNIT,
    "debug.nan_at_step": _STEP_OR_OFF,
    "debug.kill_at_step": _STEP_OR_OFF,
    "debug.term_at_step": _STEP_OR_OFF,
}

# Blocks that only some configs carry (the ``pretrained_*`` settings add
# ``upstream``, the pretraining budget of ``rebll_jax/upstream.py``): when a
# config has the block, every field of its defaults must be there, nothing
# else, and each numeric one obeys its rule here.
OPTIONAL_RULES: dict[str, Rule] = {
    "upstream.num_classes": _int(1, 64, why="synthetic.MAX_UPSTREAM_CLASSES"),
    "upstream.num_train": _COUNT,
    "upstream.num_test": _COUNT,
    "upstream.seed": _SEED,
    "upstream.render_size": _int(8),
    "upstream.epochs": _COUNT,
    "upstream.global_batch": _COUNT,
    "upstream.lr": _POSITIVE,
    "upstream.weight_decay": _NON_NEGATIVE,
    "upstream.train_seed": _SEED,
    "upstream.cutout": _UNIT,
}


def optional_blocks() -> dict:
  """Name -> defaults of each block a config may add to the base schema."""
  from rebll_jax import upstream  # pylint: disable=g-import-not-at-top
  return {"upstream": upstream.default_config()}


def rule_of(field: str) -> Rule:
  return RULES[field] if field in RULES else OPTIONAL_RULES[field]


def leaves(config, prefix: str = ""):
  """(dotted name, value) of every non-dict field of a ConfigDict."""
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, "keys") and callable(value.keys):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(field: str, value) -> None:
  """One field against its rule (UserError naming field, rule and value)."""
  rule = rule_of(field)
  if not is_number(value) or (rule.kind is int and not isinstance(value, int)):
    raise UserError(f"{field} must be {rule.describe()}, got {value!r} "
                    f"({type(value).__name__})")
  if rule.kind is float and not math.isfinite(value):
    raise UserError(f"{field} must be {rule.describe()}, got {value!r}")
  if not rule.holds(value):
    raise UserError(f"{field} must be {rule.describe()}, got {value!r}")


def check_values(config) -> None:
  """Every field of the base config (and of each optional block the config
  has) present, known and in range."""
  from rebll_jax import config_base  # pylint: disable=g-import-not-at-top
  schema = dict(leaves(config_base.base_config()))
  for name, defaults in optional_blocks().items():
    if name in config:
      schema.update(leaves(defaults, f"{name}."))
  have = dict(leaves(config))
  missing = sorted(set(schema) - set(have))
  if missing:
    raise UserError(f"the config lacks {len(missing)} field(s) of "
                    f"rebll_jax/config_base.py, e.g. {missing[0]!r}; a config "
                    "file must start from config_base.base_config()")
  unknown = sorted(set(have) - set(schema))
  if unknown:
    raise UserError(f"config field {unknown[0]!r} is not in "
                    "rebll_jax/config_base.py (a typo in the config file?)")
  for field in (*RULES, *OPTIONAL_RULES):
    if field in have:
      check_value(field, have[field])
