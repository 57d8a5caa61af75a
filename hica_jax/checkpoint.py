"""Orbax checkpoints, one manager per stage (`workdir/checkpoints/<stage>`).

A checkpoint holds the train state (params, optimiser state, step, and
stage-specific arrays) and, as JSON, the input iterator state and small
metadata, so that a resumed run sees exactly the batches it would have seen.

Multi-host: every process calls `save`/`restore` with global arrays; orbax
writes each process's shards and its primary process the metadata, so the
workdir must be storage that every host sees. A newest checkpoint that cannot
be read (corrupt, or half-written where the file system has no atomic
rename) is set aside with a warning and the previous one is used.
"""
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from hica_jax import distributed

FINAL_MARKER = "FINAL"
SET_ASIDE_PREFIX = "unreadable_step_"


def stage_dir(workdir, stage):
  return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def manager(workdir, stage, max_to_keep=2):
  return ocp.CheckpointManager(
      stage_dir(workdir, stage),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True))


def save(mngr, step, state, extra=None, force=False):
  """Saves `state` (pytree of arrays) and `extra` (JSON-able dict) at step."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            extra=ocp.args.JsonSave(extra or {}))
  mngr.save(step, args=args, force=force)


def _all_agree(ok):
  """True iff `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.int32(ok))
  return bool(np.min(flags))


def _set_aside(mngr, step):
  """Renames an unreadable step out of orbax's view (kept for inspection)."""
  src = os.path.join(os.fspath(mngr.directory), str(step))
  if jax.process_index() == 0 and os.path.exists(src):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dst = os.path.join(os.fspath(mngr.directory),
                       f"{SET_ASIDE_PREFIX}{step}_{stamp}")
    n = 0
    while os.path.exists(dst + (f"_{n}" if n else "")):
      n += 1
    os.rename(src, dst + (f"_{n}" if n else ""))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set_aside_{step}")
  mngr.reload()


def _restore_newest_readable(mngr, args_fn, step=None):
  """(step, restored) from the newest readable checkpoint, or (None, None).

  Steps that fail to restore are set aside, newest first; if none is
  readable the last error is raised, so that a wrong restore target is
  reported instead of silently starting over.
  """
  steps = [step] if step is not None else sorted(mngr.all_steps(),
                                                 reverse=True)
  error = None
  for s in steps:
    restored = None
    try:
      restored = mngr.restore(s, args=args_fn())
    except Exception as e:  # pylint: disable=broad-except
      # Corruption surfaces as many types (tensorstore, JSON, missing files).
      error = e
    if _all_agree(restored is not None):
      return s, restored
    logging.warning(
        "Checkpoint %s/%d cannot be restored (%s); setting it aside and "
        "using the previous one.", os.fspath(mngr.directory), s,
        f"{type(error).__name__}: {str(error)[:300]}" if error else
        "failed on another process")
    _set_aside(mngr, s)
  if error is not None:
    raise RuntimeError(f"No readable checkpoint in {mngr.directory}; the "
                       "last error is above. Delete the folder to start "
                       "over.") from error
  return None, None


def restore(mngr, abstract_state, step=None):
  """Restores (state, extra) onto the shardings of `abstract_state`.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding`.
  Without `step`, the newest readable checkpoint; (None, None) if none.
  """
  _, restored = _restore_newest_readable(
      mngr, lambda: ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          extra=ocp.args.JsonRestore()), step)
  if restored is None:
    return None, None
  return restored["state"], dict(restored["extra"] or {})


def restore_params(mngr, shardings_fn, step=None):
  """Only `state["params"]` of a checkpoint, placed by `shardings_fn`.

  shardings_fn: abstract params (ShapeDtypeStructs) -> their shardings.
  The optimiser state is not read, so evaluation and the next stage never
  hold it in memory.
  """
  step = mngr.latest_step() if step is None else step
  # The "state" item is a PyTree checkpoint; read only its params subtree.
  path = os.path.join(os.fspath(mngr.directory), str(step), "state")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(path)).tree["params"]
    shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                          meta)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, shardings_fn(shapes))
    restored = handler.restore(epath.Path(path), args=ocp.args.PyTreeRestore(
        item={"params": target},
        restore_args={"params": ocp.checkpoint_utils.construct_restore_args(
            target)},
        partial_restore=True))
  finally:
    handler.close()
  return restored["params"]


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of jax arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def mark_final(workdir, stage, step):
  """Marks a stage finished; written after its last checkpoint is durable.

  Every process returns only once the marker exists, so that all of them
  take the same branch when they next ask `is_final`.
  """
  if jax.process_index() == 0:
    path = os.path.join(stage_dir(workdir, stage), FINAL_MARKER)
    with open(path + ".tmp", "w") as f:
      f.write(str(step))
    os.replace(path + ".tmp", path)
  distributed.barrier(f"final_{stage}")


def is_final(workdir, stage):
  return os.path.exists(os.path.join(stage_dir(workdir, stage), FINAL_MARKER))
