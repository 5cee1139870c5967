"""XLA compiler options for our jitted programs on the CPU backend.

XLA:CPU (jax 0.10) hands parts of a program to the YNNPACK library
("library fusions"): by default convolutions (forward and the filter
gradient) and reductions. On the default experiment's small ResNet
(batch 64, 64 px, 2 cores) YNNPACK's convolutions run on one thread and
its filter gradients are 2-3x slower than XLA's own Eigen convolution
(3x3, 32 -> 32 channels at 16x16, batch 64: 8.3 ms vs 2.7 ms), while its reductions
(the BatchNorm statistics) are 4-6x faster than XLA's emitter.
``config.model.cpu_library_fusion`` chooses, for every jitted program of a
run (train step, prediction, upstream pretraining):

- ``"reductions"`` (default): YNNPACK for reductions only; convolutions and
  dots go to XLA's Eigen kernels. The small ResNet's train step: 1.25-1.4x
  faster than XLA's default (experiments/benchmark_step.py, README).
- ``"xla_default"``: whatever this XLA version does by default.
- ``"off"``: no library fusions.

Same function either way, to float32 rounding (different kernels sum in a
different order). Other backends ignore the choice.

``config.model.cpu_scheduler`` orders each program's instructions:
``"memory"`` (default; XLA's memory-optimised list scheduler) or
``"xla_default"``. Scheduling runs after fusion and changes no kernel, so
every value is bit-identical either way (tests/test_xla_cpu.py); on the
default experiment's step the memory-optimised order was 3-11% faster in 6
of 7 interleaved pairs (2026-12-06, docs/cpu_speed_log.md), and it is the order the whole
run compiles with, CPU only. An XLA that does not
know the option (a newer or older jaxlib) compiles with its defaults and
says so once in the log.

``config.cpu_devices`` = N > 0 splits the host CPU into N XLA devices
before JAX starts (``split_host_cpu``, called by the CLI), so the data
parallel train step runs N batch shards side by side: XLA:CPU runs many of
a small model's ops (elementwise fusions, YNNPACK's reductions) on one
thread each, and N shards keep the cores busy (default experiment on 2
cores: 127 s -> 112-116 s for the whole run). Only the CPU platform is split;
a GPU or TPU run's devices are unchanged.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

CPU_LIBRARY_FUSIONS = ("reductions", "xla_default", "off")
_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_VALUES = {"reductions": "LIBRARY_FUSION_TYPE_REDUCE", "off": ""}


def compiler_options(choice: str) -> dict | None:
  """``jax.jit(..., compiler_options=)`` for a ``cpu_library_fusion``
  choice on the default backend (None: XLA's defaults)."""
  if choice not in CPU_LIBRARY_FUSIONS:
    raise ValueError(f"unknown model.cpu_library_fusion {choice!r}; valid: "
                     f"{list(CPU_LIBRARY_FUSIONS)}")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu" or choice == "xla_default":
    return None
  return _supported(_OPTION, _VALUES[choice])


@functools.lru_cache(maxsize=None)
def _supported(option: str, value) -> dict | None:
  """``{option: value}`` if this XLA compiles with it (probed once), else
  None with one warning."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  options = {option: value}
  try:
    jax.jit(lambda x: jnp.sum(x * x), compiler_options=options)(
        jnp.ones((4, 4)))
  except Exception as e:  # pylint: disable=broad-except
    log.warning("this XLA does not take %s=%r (%s); compiling with its "
                "defaults", option, value, str(e).splitlines()[0][:200])
    return None
  return options


def init_options() -> dict | None:
  """Compiler options for the one-shot parameter-initialisation program.

  It is all random-number generation (the forward pass is dead code), and
  XLA:CPU spends seconds in LLVM's full optimisation of the unrolled
  threefry rounds for code that runs once, in milliseconds. Backend
  optimisation level 1 compiles it 2-3 s faster (small ResNet 3.2 -> 1.0 s,
  ResNet-50 5.9 -> 3.3 s, TResNet-M 9.0 -> 5.9 s) and gives bit-identical
  parameters (tests/test_xla_cpu.py); level 0 does not (different bits).
  Other backends compile with their defaults.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    return None
  return _supported("xla_backend_optimization_level", 1)


CPU_SCHEDULERS = ("memory", "xla_default")
_SCHEDULER_OPTION = "xla_cpu_scheduler_type"
_SCHEDULER_VALUES = {"memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def scheduler_options(choice: str) -> dict | None:
  """``compiler_options`` for a ``model.cpu_scheduler`` choice on the
  default backend (None: XLA's defaults)."""
  if choice not in CPU_SCHEDULERS:
    raise ValueError(f"unknown model.cpu_scheduler {choice!r}; valid: "
                     f"{list(CPU_SCHEDULERS)}")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu" or choice == "xla_default":
    return None
  return _supported(_SCHEDULER_OPTION, _SCHEDULER_VALUES[choice])


def options_for(model_config) -> dict | None:
  """The compiler options of a run's ``config.model`` (a config saved
  before ``cpu_scheduler`` existed compiles with XLA's scheduler)."""
  options = {
      **(compiler_options(model_config.cpu_library_fusion) or {}),
      **(scheduler_options(model_config.get("cpu_scheduler", "xla_default"))
         or {})}
  return options or None


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def split_host_cpu(cpu_devices: int) -> str:
  """Asks XLA for ``cpu_devices`` CPU devices (XLA_FLAGS); call it before
  JAX is imported. Returns what was done, for the log ("" for 0)."""
  if cpu_devices <= 0:
    return ""
  flags = os.environ.get("XLA_FLAGS", "")
  if _DEVICE_COUNT_FLAG in flags:
    return (f"cpu_devices={cpu_devices} left alone: XLA_FLAGS already sets "
            f"{_DEVICE_COUNT_FLAG}")
  if "jax" in sys.modules:
    return (f"cpu_devices={cpu_devices} left alone: JAX was imported before "
            "the CPU could be split")
  os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={cpu_devices}".strip()
  return f"host CPU split into {cpu_devices} XLA devices (cpu_devices)"
