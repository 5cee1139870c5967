"""Data parallelism: one mesh with a ``data`` axis, replicated params.

The train step is one ``jax.jit`` whose batch is sharded along ``data`` and
whose state is replicated. On one host, global arrays are made straight from
the host batch; on several, each process loads only its contiguous slice of
the global batch (``local_batch_slice``) and ``to_global`` assembles the
global array from the per-process pieces
(``jax.make_array_from_process_local_data``). BatchNorm statistics, the
loss mean and the gradients are then over the global batch with no
``axis_name``: the compiler inserts the cross-device (and cross-host)
reductions.

Multi-host start-up: ``initialize_distributed(config.dist)`` (called by
``train.run`` when ``config.distributed``) passes the coordinator address,
process count and process id from the config, else from the environment
variables ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, else leaves them to JAX's cluster auto-detection (Cloud
TPU pods, SLURM, Open MPI, Kubernetes).
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rebll_jax.errors import UserError


ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_kwargs(dist_config, environ=None) -> dict:
  """Arguments for ``jax.distributed.initialize``: config, then environment.

  Fields left at their defaults ("" / 0 / -1) fall back to the environment
  variables; anything still unknown is left out, so JAX auto-detects it.
  """
  environ = os.environ if environ is None else environ
  kwargs = {}
  address = (dist_config.coordinator_address
             or environ.get("JAX_COORDINATOR_ADDRESS", ""))
  if address:
    kwargs["coordinator_address"] = address
  num = dist_config.num_processes or int(environ.get("JAX_NUM_PROCESSES", 0))
  if num:
    kwargs["num_processes"] = num
  pid = dist_config.process_id
  if pid < 0 and environ.get("JAX_PROCESS_ID", "") != "":
    pid = int(environ["JAX_PROCESS_ID"])
  if pid >= 0:
    kwargs["process_id"] = pid
  if "process_id" in kwargs and "num_processes" in kwargs and not (
      0 <= kwargs["process_id"] < kwargs["num_processes"]):
    raise UserError(f"process_id={kwargs['process_id']} is not in "
                    f"[0, num_processes={kwargs['num_processes']})")
  return kwargs


def wait_for_coordinator(address: str, timeout_s: float):
  """Returns once ``address`` ("host:port") accepts a TCP connection.

  JAX's own wait for an unreachable coordinator ends in a C++ abort with a
  stack dump after ``initialization_timeout``; a wrong port or a process 0
  that never started is a user mistake, so it is one UserError instead.
  """
  host, _, port = address.rpartition(":")
  host = host.strip("[]")  # [::1]:1234
  if not host or not port.isdigit():
    raise UserError(f"coordinator address {address!r} is not host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
            f"nothing answers at the coordinator address {address} after "
            f"{timeout_s:g} s ({e.strerror or e}): is process 0 running, "
            "and is this its host:port (dist.coordinator_address / "
            "JAX_COORDINATOR_ADDRESS)? dist.init_timeout_s sets the wait"
        ) from None
      time.sleep(0.5)


def initialize_distributed(dist_config):
  """``jax.distributed.initialize`` with ``distributed_kwargs``; call before
  any other JAX computation. A no-op if already initialised."""
  if jax.distributed.is_initialized():
    return
  kwargs = distributed_kwargs(dist_config)
  timeout_s = dist_config.get("init_timeout_s", 300)
  if kwargs.get("process_id", 0) > 0 and "coordinator_address" in kwargs:
    wait_for_coordinator(kwargs["coordinator_address"], timeout_s)
  jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s))


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over all devices (or the first ``num_devices`` local ones)."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1:
      raise UserError("num_devices must be 0 (all devices) on multi-host runs")
    if num_devices > len(devices):
      visible = (f"{len(devices)} devices are" if len(devices) > 1
                 else "1 device is")
      raise UserError(f"num_devices={num_devices} but only {visible} "
                      "visible")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def local_batch_slice(global_batch: int, process_index: int | None = None,
                      process_count: int | None = None) -> slice:
  """Rows of the global batch this process loads (a contiguous block).

  ``make_mesh`` lists ``jax.devices()`` in process order, so the devices of
  process p hold exactly rows [p * B/P, (p + 1) * B/P) of a ``data``-sharded
  global batch: this slice.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch % count:
    raise UserError(f"global batch {global_batch} is not divisible by the "
                    f"{count} processes")
  per_process = global_batch // count
  start = index * per_process
  return slice(start, start + per_process)


def to_global(mesh: Mesh, local_batch: dict) -> dict:
  """Host arrays (this process's rows) -> global arrays sharded on ``data``."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def replicate(mesh: Mesh, tree):
  """``tree`` replicated on every device of ``mesh`` (all processes).

  On several processes, arrays that live on this process's devices only
  (e.g. fresh from ``model.init``) go through host memory first: a
  device-to-device put across hosts is not supported on every backend
  (CPU raises), while every process putting its own identical host copy is.
  """
  if jax.process_count() > 1:
    tree = jax.tree.map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array)
        and x.is_fully_addressable and not jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key) else x, tree)
  return jax.device_put(tree, replicated(mesh))
