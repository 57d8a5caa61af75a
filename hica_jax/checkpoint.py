"""Orbax checkpoints, one manager per stage (`workdir/checkpoints/<stage>`).

A checkpoint holds the train state (params, optimiser state, step, and
stage-specific arrays) and, as JSON, the input iterator state and small
metadata, so that a resumed run sees exactly the batches it would have seen.

Multi-host: every process calls `save`/`restore` with global arrays; orbax
writes each process's shards and its primary process the metadata, so the
workdir must be storage that every host sees. A newest checkpoint that cannot
be read (corrupt, or half-written where the file system has no atomic
rename) is set aside with a warning and the previous one is used; a
readable one holding other shapes (a config change) raises
CheckpointMismatch and is left alone.
"""
import os
import sys
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


class CheckpointMismatch(ValueError):
  """A readable checkpoint holding another tree or other shapes than the
  run expects (a config change, not corruption): nothing is set aside."""


def _step_dir(mngr, step):
  return os.path.join(os.fspath(mngr.directory), str(step))


def _stored_state_tree(mngr, step):
  """Metadata tree (ArrayMetadata leaves) of a step's "state" item; raises
  when the step's metadata cannot be read."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(epath.Path(_step_dir(mngr, step), "state")).tree
  finally:
    handler.close()


def _shapes_by_path(tree):
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {jax.tree_util.keystr(p, simple=True, separator="/"):
          tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def tree_differences(stored, expected, limit=8):
  """["path: stored (3, 4), expected (3, 8)", ...] between a checkpoint's
  metadata tree and an abstract tree (ShapeDtypeStruct leaves)."""
  a, b = _shapes_by_path(stored), _shapes_by_path(expected)
  out = [f"{k}: only in the checkpoint" for k in sorted(set(a) - set(b))]
  out += [f"{k}: not in the checkpoint" for k in sorted(set(b) - set(a))]
  out += [f"{k}: stored shape {a[k]}, expected {b[k]}"
          for k in sorted(set(a) & set(b)) if a[k] != b[k]]
  return out[:limit] + ([f"... {len(out) - limit} more"]
                        if len(out) > limit else [])


def _drop_closed_loop_callbacks():
  """After a failed read, tensorstore reads still in flight finish on
  threads and post to orbax's event loop, already closed by the failure:
  each prints "Exception ignored ... Event loop is closed" (hundreds for a
  real model). Those, and only those, are dropped from then on. Installed
  before the first read, not in its `except`: a thread can post between
  the loop closing and the handler running (seen once in CI)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _describe_error(error):
  return (f"{type(error).__name__}: {str(error)[:300]}" if error else
          "failed on another process")


def _restore_newest_readable(mngr, restore_fn, expected=None, step=None):
  """(step, restored) from the newest readable checkpoint, or (None, None).

  restore_fn: step -> restored pytree. expected: optional abstract tree the
  "state" item must match; a readable checkpoint that does not match raises
  CheckpointMismatch and is left where it is. Steps whose files cannot be
  read are set aside, newest first; if none is readable the last error is
  raised, so that a wrong restore target is reported instead of silently
  starting over.
  """
  steps = [step] if step is not None else sorted(mngr.all_steps(),
                                                 reverse=True)
  _drop_closed_loop_callbacks()
  error = None
  for s in steps:
    restored, stored, error = None, None, None
    try:
      stored = _stored_state_tree(mngr, s)
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if _all_agree(stored is not None) and expected is not None:
      diffs = tree_differences(stored, expected)
      if diffs:
        raise CheckpointMismatch(
            f"Checkpoint {_step_dir(mngr, s)} is readable but holds other "
            "arrays than this run builds (a changed config, not "
            "corruption; nothing was moved):\n  " + "\n  ".join(diffs) +
            "\nRun with the config that made it, pass a new --workdir, or "
            "restart the stage (config.restart).")
    if stored is not None:
      try:
        restored = restore_fn(s)
      except Exception as e:  # pylint: disable=broad-except
        # Corruption surfaces as many types (tensorstore, JSON, missing files).
        error = e
    if _all_agree(restored is not None):
      return s, restored
    logging.warning(
        "Checkpoint %s/%d cannot be read (%s); setting it aside and "
        "using the previous one.", os.fspath(mngr.directory), s,
        _describe_error(error))
    _set_aside(mngr, s)
  if error is not None:
    raise RuntimeError(
        f"No readable checkpoint in {mngr.directory} (every step was set "
        f"aside as {SET_ASIDE_PREFIX}*; the last error: "
        f"{_describe_error(error)}). Delete that folder, or restart the "
        "stage (config.restart), to train it anew.") from None
  return None, None


def restore(mngr, abstract_state, step=None):
  """Restores (state, extra) onto the shardings of `abstract_state`.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding`.
  Without `step`, the newest readable checkpoint; (None, None) if none.
  Raises CheckpointMismatch when the checkpoint holds other shapes.
  """
  _, restored = _restore_newest_readable(
      mngr, lambda s: mngr.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          extra=ocp.args.JsonRestore())),
      expected=abstract_state, step=step)
  if restored is None:
    return None, None
  return restored["state"], dict(restored["extra"] or {})


def _read_params(path, shardings_fn):
  """`state["params"]` of the step folder `path`, placed by shardings_fn."""
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
    return jax.block_until_ready(restored["params"])
  finally:
    handler.close()


def restore_params(mngr, shardings_fn, step=None, return_step=False):
  """Only `state["params"]` of a checkpoint, placed by `shardings_fn`.

  shardings_fn: abstract params (ShapeDtypeStructs) -> their shardings.
  The optimiser state is not read, so evaluation and the next stage never
  hold it in memory. Without `step`, the newest readable step (unreadable
  newer ones are set aside with a warning, as when resuming); a clear error
  naming the folder when none is readable. return_step: (step, params).
  """
  used, params = _restore_newest_readable(
      mngr, lambda s: _read_params(os.path.join(_step_dir(mngr, s), "state"),
                                   shardings_fn), step=step)
  if used is None:
    raise FileNotFoundError(f"No checkpoint in {mngr.directory}.")
  return (used, params) if return_step else params


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


def final_step(workdir, stage):
  """The step a finished stage ended at (its FINAL marker), or None."""
  path = os.path.join(stage_dir(workdir, stage), FINAL_MARKER)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return int(f.read().strip() or 0)


def unmark_final(workdir, stage):
  """Removes a stage's FINAL marker (its final step was set aside), so the
  stage resumes from its newest readable step."""
  if jax.process_index() == 0:
    path = os.path.join(stage_dir(workdir, stage), FINAL_MARKER)
    if os.path.exists(path):
      os.remove(path)
  distributed.barrier(f"unfinal_{stage}")
