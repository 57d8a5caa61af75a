"""The one sharding helper: the device mesh and how arrays are placed on it.

A 1-D mesh over every device with axis "data": the global batch is split along
it and parameters are replicated (data parallel). Params may instead follow
big_vision-style regex rules (`config.sharding.rules`), a list of
(regex over the '/'-joined param path, PartitionSpec tuple) pairs; the first
match wins and unmatched params are replicated.
"""
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None):
  """Mesh of all (or the given) devices along the single axis "data"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) axis split over "data"."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch, mesh, field="batch_size"):
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(
        f"{field}={global_batch} must be divisible by the number of devices "
        f"({n}) and of processes ({jax.process_count()}); change {field}.")


def shard_batch(batch, mesh):
  """Per-process numpy batch -> globally sharded jax arrays.

  Each process holds its rows of the global batch (rows are split by process
  in order), so this works unchanged on one host and on many.
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)


def replicate(tree, mesh):
  """Places host values (identical on every process) replicated on the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)


def _path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(params, mesh, rules=()):
  """NamedSharding per param leaf from regex rules (default: replicated)."""
  compiled = [(re.compile(pattern), P(*spec)) for pattern, spec in rules]

  def sharding_for(path, leaf):
    name = _path_str(path)
    for pattern, spec in compiled:
      if pattern.search(name):
        # A dim that does not divide the mesh axis stays replicated.
        ok = all(ax is None or (i < np.ndim(leaf) and
                                np.shape(leaf)[i] % mesh.shape[ax] == 0)
                 for i, ax in enumerate(spec))
        return NamedSharding(mesh, spec if ok else P())
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(sharding_for, params)


def tree_paths(tree):
  """List of '/'-joined paths of a pytree's leaves (for regex rules, freezing)."""
  return [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def path_mask(tree, patterns):
  """Pytree of bools: True where a leaf's path matches any regex in patterns."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.search(_path_str(path)) for c in compiled), tree)
