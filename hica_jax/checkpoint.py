"""Orbax checkpoints, one manager per stage (`workdir/checkpoints/<stage>`).

A checkpoint holds the train state (params, optimiser state, step, and
stage-specific arrays) and, as JSON, the input iterator state and small
metadata, so that a resumed run sees exactly the batches it would have seen.
"""
import os

import jax
import orbax.checkpoint as ocp

FINAL_MARKER = "FINAL"


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


def restore(mngr, abstract_state, step=None):
  """Restores (state, extra) onto the shardings of `abstract_state`.

  `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding`.
  """
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      extra=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["extra"] or {})


def restore_raw(mngr, step=None):
  """Restores (state, extra) as saved, without a target structure."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), extra=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["extra"] or {})


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of jax arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def mark_final(workdir, stage, step):
  """Marks a stage finished; written after its last checkpoint is durable."""
  if jax.process_index() == 0:
    path = os.path.join(stage_dir(workdir, stage), FINAL_MARKER)
    with open(path, "w") as f:
      f.write(str(step))


def is_final(workdir, stage):
  return os.path.exists(os.path.join(stage_dir(workdir, stage), FINAL_MARKER))
