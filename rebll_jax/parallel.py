"""Data parallelism: one mesh with a ``data`` axis, replicated params.

The train step is one ``jax.jit`` whose batch is sharded along ``data`` and
whose state is replicated. On one host, global arrays are made straight from
the host batch; on several, each process contributes its slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rebll_jax.errors import UserError


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over all devices (or the first ``num_devices`` local ones)."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1:
      raise UserError("num_devices must be 0 (all devices) on multi-host runs")
    if num_devices > len(devices):
      raise UserError(f"num_devices={num_devices} but only {len(devices)} "
                      "devices are visible")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def local_batch_slice(global_batch: int) -> slice:
  """Rows of the global batch this process loads."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def to_global(mesh: Mesh, local_batch: dict) -> dict:
  """Host arrays (this process's rows) -> global arrays sharded on ``data``."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def replicate(mesh: Mesh, tree):
  return jax.device_put(tree, replicated(mesh))
