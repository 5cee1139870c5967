"""Checks of a config against the machine, before anything is compiled.

Each failure is a ``UserError`` whose one-line message names the problem and
the fix. The CLI prints it and exits with code 2.
"""

from __future__ import annotations

import os
import tempfile

from rebll_jax import data, methods, models, optim
from rebll_jax.errors import UserError


def _check(condition: bool, message: str):
  if not condition:
    raise UserError(message)


def check_config(config):
  """Checks that need no data and no devices."""
  methods.get_method(config.method)
  _check(config.data.source in data.SOURCES,
         f"unknown data.source {config.data.source!r}; valid: "
         f"{sorted(data.SOURCES)}")
  _check(config.model.arch in models.ARCHS,
         f"unknown model.arch {config.model.arch!r}; valid: "
         f"{sorted(models.ARCHS)}")
  _check(config.model.dtype in models.DTYPES,
         f"unknown model.dtype {config.model.dtype!r}; valid: "
         f"{sorted(models.DTYPES)}")
  _check(config.optim.name in optim.OPTIMIZERS,
         f"unknown optim.name {config.optim.name!r}; valid: "
         f"{list(optim.OPTIMIZERS)}")
  _check(config.optim.schedule in optim.SCHEDULES,
         f"unknown optim.schedule {config.optim.schedule!r}; valid: "
         f"{list(optim.SCHEDULES)}")
  _check(config.memory.selection in ("herding", "random"),
         f"unknown memory.selection {config.memory.selection!r}; valid: "
         "['herding', 'random']")
  _check(config.memory.mix in ("uniform", "fraction"),
         f"unknown memory.mix {config.memory.mix!r}; valid: "
         "['uniform', 'fraction']")
  _check(0.0 <= config.memory.fraction < 1.0,
         "memory.fraction must be in [0, 1)")
  _check(config.memory.per_class >= 0 and config.memory.total >= 0,
         "memory.per_class and memory.total must be >= 0")
  _check(config.train.global_batch > 0, "train.global_batch must be > 0")
  _check(config.train.epochs_first > 0 and config.train.epochs_later > 0,
         "train.epochs_first and train.epochs_later must be > 0")
  _check(config.train.eval_batch > 0, "train.eval_batch must be > 0")
  _check(config.train.log_every > 0, "train.log_every must be > 0")
  _check(config.train.checkpoint_every >= 0,
         "train.checkpoint_every must be >= 0 (0 = only at task boundaries)")
  _check(config.data.image_size >= 8, "data.image_size must be >= 8")
  _check(config.optim.lr_first > 0 and config.optim.lr_later > 0,
         "optim.lr_first and optim.lr_later must be > 0")
  _check(0.0 <= config.optim.warmup_frac < 1.0,
         "optim.warmup_frac must be in [0, 1)")
  for name in ("tau_old", "tau_cur"):
    value = config.relabel[name]
    _check(0.0 < value < 1.0, f"relabel.{name} must be in (0, 1)")
  _check(config.relabel.chunk > 0, "relabel.chunk must be > 0")


def check_devices(config, num_devices: int, num_processes: int):
  batch = config.train.global_batch
  _check(batch % num_devices == 0,
         f"train.global_batch={batch} is not divisible by the {num_devices} "
         f"devices; use a multiple of {num_devices}")
  _check(config.train.eval_batch % num_devices == 0,
         f"train.eval_batch={config.train.eval_batch} is not divisible by "
         f"the {num_devices} devices; use a multiple of {num_devices}")
  _check(batch % num_processes == 0,
         f"train.global_batch={batch} is not divisible by the "
         f"{num_processes} processes")


def check_workdir(workdir: str):
  """Creates the workdir and proves it writable (a probe file)."""
  _check(bool(workdir), "--workdir is required")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".probe"):
      pass
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); "
                    "pick another --workdir") from None
