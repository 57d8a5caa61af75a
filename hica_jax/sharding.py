"""The one sharding helper: the device mesh and how arrays are placed on it.

Mesh: every device along the axis "data" (the global batch is split along
it), or a 2-D ("data", "model") mesh when `config.sharding.model_axis` > 1.
Devices are ordered by process, so the devices of one process hold one
contiguous block of the global batch: the rows its input pipeline reads.

Params follow big_vision-style rules: a list of (regex over the '/'-joined
param path, spec). Every matching rule applies, in order: a tuple spec sets
the PartitionSpec (it names the trailing dims, so one rule also serves
scanned layers with a leading layer axis; a dim the mesh axis does not
divide stays whole); the string "fsdp" additionally splits the largest
still-whole dim that "data" divides over "data" (params under
`fsdp_min_size` elements stay as they are). Unmatched params are replicated.
`config_rules` expands `config.sharding` into rules; optimiser state follows
its params (`follow_params`).
"""
import math
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
FSDP = "fsdp"

# Megatron-style split of the wide layers over "model": the first matmul of
# attention and MLP by output columns, the second by input rows, so each
# block needs one reduction. Other params stay whole on that axis.
MODEL_AXIS_RULES = (
    (r"attn/(query|key|value)/kernel$", (None, MODEL_AXIS)),
    (r"attn/(query|key|value)/bias$", (MODEL_AXIS,)),
    (r"attn/out/kernel$", (MODEL_AXIS, None)),
    (r"mlp/fc1/kernel$", (None, MODEL_AXIS)),
    (r"mlp/fc1/bias$", (MODEL_AXIS,)),
    (r"mlp/fc2/kernel$", (MODEL_AXIS, None)),
)
PRESETS = {
    "dp": (),                       # params and optimiser state replicated
    "fsdp": ((r".*", FSDP),),       # both split over "data"
}


def make_mesh(devices=None, model_axis=1):
  """Mesh ("data",) over all (or the given) devices, or ("data", "model").

  With a model axis, each group of `model_axis` devices must lie inside one
  process: the batch is replicated over "model", and a process feeds only
  its own rows.
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  n = len(devices)
  if model_axis == 1:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  per_process = n // len({d.process_index for d in devices})
  if model_axis < 1 or n % model_axis or per_process % model_axis:
    raise ValueError(
        f"config.sharding.model_axis={model_axis} must divide the devices of "
        f"each process ({per_process} of {n}); pick a divisor of "
        f"{per_process}.")
  return Mesh(np.asarray(devices).reshape(n // model_axis, model_axis),
              (DATA_AXIS, MODEL_AXIS))


def data_size(mesh):
  """Number of shards of the batch (the size of the "data" axis)."""
  return mesh.shape[DATA_AXIS]


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) axis split over "data" (replicated over "model")."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch, mesh, field="batch_size"):
  n = data_size(mesh)
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(
        f"{field}={global_batch} must be divisible by the data-parallel "
        f"devices ({n}) and the processes ({jax.process_count()}); change "
        f"{field}.")


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


def place(tree, shardings):
  """Puts a pytree on the given shardings, on one process or many.

  Host values (numpy, or process-local jax arrays) must be equal on every
  process; global arrays are resharded on device.
  """
  def put(x, s):
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda y: y, out_shardings=s)(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(put, tree, shardings)


def replicate(tree, mesh):
  """Places host values (identical on every process) replicated on the mesh."""
  return place(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def to_host(tree):
  """Global arrays -> numpy on every process (gathered across processes)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and \
        not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def _path_str(path):
  return "/".join(
      str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
      for k in path)


def config_rules(sharding_config):
  """config.sharding -> rules: user rules, model-axis rules, the preset's."""
  if sharding_config is None:
    return ()
  preset = sharding_config.get("preset", "dp")
  if preset not in PRESETS:
    raise ValueError(f"config.sharding.preset={preset!r}: choose from "
                     f"{sorted(PRESETS)}.")
  rules = tuple(tuple(r) for r in sharding_config.get("rules", ()) or ())
  if sharding_config.get("model_axis", 1) > 1:
    rules += MODEL_AXIS_RULES
  return rules + PRESETS[preset]


def _check_rule(pattern, spec, mesh):
  if spec == FSDP:
    return
  if not isinstance(spec, (tuple, list)):
    raise ValueError(f"sharding rule {pattern!r}: spec {spec!r} must be a "
                     f"tuple of mesh axes / None, or {FSDP!r}.")
  for ax in spec:
    for name in (ax if isinstance(ax, (tuple, list)) else (ax,)):
      if name is not None and name not in mesh.shape:
        raise ValueError(
            f"sharding rule {pattern!r} names mesh axis {name!r}; the mesh "
            f"has {tuple(mesh.shape)} (config.sharding.model_axis > 1 adds "
            f"{MODEL_AXIS!r}).")


def _axis_size(mesh, ax):
  names = ax if isinstance(ax, (tuple, list)) else (ax,)
  return math.prod(mesh.shape[a] for a in names)


def spec_for(name, shape, mesh, rules, fsdp_min_size=2**12):
  """PartitionSpec of one param (path `name`, `shape`) under `rules`."""
  spec = [None] * len(shape)
  for pattern, tactic in rules:
    if not re.search(pattern, name):
      continue
    if tactic == FSDP:
      used = {a for ax in spec if ax is not None
              for a in (ax if isinstance(ax, tuple) else (ax,))}
      n = mesh.shape[DATA_AXIS]
      free = [i for i, ax in enumerate(spec)
              if ax is None and shape[i] % n == 0 and shape[i] >= n]
      if DATA_AXIS not in used and free and \
          math.prod(shape) >= fsdp_min_size:
        spec[max(free, key=lambda i: shape[i])] = DATA_AXIS
      continue
    tactic = tuple(tuple(a) if isinstance(a, list) else a for a in tactic)
    if len(tactic) > len(shape):
      raise ValueError(f"sharding rule {pattern!r} -> {tactic} names "
                       f"{len(tactic)} dims but param {name} has shape "
                       f"{tuple(shape)}; narrow the regex.")
    lead = len(shape) - len(tactic)
    spec = [None] * lead + [
        ax if ax is None or shape[lead + i] % _axis_size(mesh, ax) == 0
        else None for i, ax in enumerate(tactic)]
  return P(*spec)


def param_shardings(params, mesh, rules=(), fsdp_min_size=2**12):
  """NamedSharding per param leaf from regex rules (default: replicated)."""
  for pattern, spec in rules:
    _check_rule(pattern, spec, mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_for(
          _path_str(path), np.shape(leaf), mesh, rules, fsdp_min_size)),
      params)


def follow_params(tree, params, shardings, mesh):
  """Shardings for a tree whose leaves mirror params (optimiser moments).

  A leaf whose path ends with a param's path and has its shape gets that
  param's sharding; everything else (counts, scalars) is replicated.
  """
  by_path = {}
  for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(shardings)):
    by_path[_path_str(path)] = (np.shape(leaf), s)

  def find(path, leaf):
    parts = _path_str(path).split("/")
    for i in range(len(parts)):
      hit = by_path.get("/".join(parts[i:]))
      if hit is not None and hit[0] == np.shape(leaf):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(find, tree)


def tree_paths(tree):
  """List of '/'-joined paths of a pytree's leaves (for regex rules, freezing)."""
  return [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def path_mask(tree, patterns):
  """Pytree of bools: True where a leaf's path matches any regex in patterns."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.search(_path_str(path)) for c in compiled), tree)
