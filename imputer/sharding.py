"""The one-dimensional `data` mesh: batches are split along it and the state is replicated.

The same code runs on one CPU, several local devices and several hosts. Each host supplies its
own slice of the global batch, and `jax.make_array_from_process_local_data` assembles the
global array from those slices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


MESH_KINDS = ('flat', 'topology')


def make_mesh(kind: str = 'flat') -> Mesh:
  """Return the `data` mesh over every device of every process.

  'flat' takes jax.devices() in order. 'topology' takes the order of jax's mesh_utils, in
  which neighbours on the axis are neighbours on the chips' interconnect (TPU slices), which
  makes the gradient all-reduce cheaper. Elsewhere it is the same order.
  """
  if kind == 'flat':
    devices = np.asarray(jax.devices())
  elif kind == 'topology':
    devices = mesh_utils.create_device_mesh((jax.device_count(),))
  else:
    raise ValueError(f"mesh={kind!r} is unknown; use 'flat' or 'topology'.")
  return Mesh(devices, ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, field: str = 'batch_size') -> None:
  devices = mesh.devices.size
  if batch_size % devices or batch_size % jax.process_count():
    raise ValueError(
        f'{field}={batch_size} must be divisible by the {devices} devices and '
        f'{jax.process_count()} processes; pick a multiple of {devices}.')


def process_rows(global_rows: np.ndarray) -> np.ndarray:
  """Return this process's contiguous share of a global batch's row indices."""
  share = len(global_rows) // jax.process_count()
  start = jax.process_index() * share
  return global_rows[start:start + share]


def to_global(local_batch, mesh: Mesh):
  """Assemble a global batch, sharded along `data`, from this process's slice."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
