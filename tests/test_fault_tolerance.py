"""Runs survive SIGKILL, SIGTERM, non-finite losses and corrupt checkpoints.

The in-process tests drive `training.loop.train_loop` with the tiny stage-2
step of hica_jax.testing on 8 fake devices; the SIGKILL test kills a real
`python -m hica_jax.main` process at a random step and restarts it.
"""
import functools
import glob
import json
import logging
import os
import random
import signal

import jax
import numpy as np
import pytest

from harness import assert_trees_close
from harness import final_params
from harness import prepare_inputs
from harness import read_metrics
from harness import run_processes
from hica_jax import checkpoint as ckpt_lib
from hica_jax import metrics as metrics_lib
from hica_jax import sharding
from hica_jax import stages as stages_lib
from hica_jax import testing
from hica_jax.training import loop


class _Batches:
  """A resumable iterator over fixed numpy batches (state: the position)."""

  def __init__(self, batches):
    self.batches, self.pos = batches, 0

  def __next__(self):
    self.pos += 1
    return self.batches[self.pos - 1]

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]


@functools.lru_cache(maxsize=None)
def _model_and_step(num_steps):
  """One jitted step per test session (no retracing per run)."""
  config, model, params = testing.tiny_model()
  config.stage2.optim.eps = 1e-6
  mesh = sharding.make_mesh()
  state, step, schedule = testing.stage2_trainer(config, model, params, mesh,
                                                 num_steps=num_steps)
  del state  # each test starts from its own fresh state
  return config, params, schedule, step, mesh


def _setup(num_steps=6, nan_steps=()):
  """A tiny stage-2 state, step and data; batches at `nan_steps` hold NaNs."""
  config, params, schedule, step, mesh = _model_and_step(num_steps)
  tx, _ = loop.make_optimizer(config.stage2.optim, num_steps)
  state = loop.create_state(params, tx, mesh)
  batches = []
  for i in range(num_steps):
    batch, desc = testing.fake_stage2_batch(config, seed=i)
    if i in nan_steps:
      batch["image"] = np.full_like(batch["image"], np.nan)
    batches.append(batch)
  return state, step, _Batches(batches), sharding.replicate(desc, mesh), \
      schedule, mesh


def _recording(step_fn, record, on_step=None):
  """Wraps a step: records params after every step; calls on_step(step)."""
  def step(state, *args):
    if on_step is not None:
      on_step(int(state.step))
    state, metrics = step_fn(state, *args)
    record[int(state.step)] = jax.device_get(state.params)
    return state, metrics
  return step


def _loop(state, step_fn, it, desc, schedule, mesh, num_steps, **kw):
  return loop.train_loop(state, step_fn, it, num_steps, mesh=mesh,
                              desc="test", schedule=schedule,
                              step_args=(desc,), log_every=2,
                              extra_fn=lambda: {"data_iter": it.get_state()},
                              **kw)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops(tmp_path):
  state, step, it, desc, schedule, mesh = _setup(6, nan_steps=(1, 4))
  params0 = jax.device_get(state.params)
  record = {}
  writer = metrics_lib.MetricWriter(str(tmp_path), "nan", tensorboard=False)
  result = _loop(state, _recording(step, record), it, desc, schedule, mesh, 6,
                 writer=writer, max_nonfinite=2)
  record[0] = params0
  # Skipped steps leave params (and so everything) as they were.
  for skipped in (2, 5):
    assert_trees_close(record[skipped], record[skipped - 1], tol=0)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), record[4],
                       record[3])
  assert max(jax.tree.leaves(moved)) > 1e-4
  assert result.nonfinite_steps == 2
  assert [h["nonfinite_steps"] for h in result.history] == [1.0, 0.0, 1.0]
  with open(os.path.join(tmp_path, "metrics", "nan.jsonl")) as f:
    logged = [json.loads(l) for l in f]
  assert [r["nonfinite_steps"] for r in logged] == [1.0, 0.0, 1.0]
  assert all(np.isfinite(r["loss"]) for r in logged)

  # A streak of max_nonfinite stops training; the checkpoint is intact.
  state, step, it, desc, schedule, mesh = _setup(6, nan_steps=(2, 3, 4, 5))
  mngr = ckpt_lib.manager(str(tmp_path / "run"), "stage2")
  record = {}
  with pytest.raises(loop.NonFiniteError,
                     match=r"3 consecutive steps.*last good checkpoint is "
                           r"step 4"):
    _loop(state, _recording(step, record), it, desc, schedule, mesh, 6,
          mngr=mngr, ckpt_every=2, max_nonfinite=3)
  assert not ckpt_lib.is_final(str(tmp_path / "run"), "stage2")
  # Step 4's checkpoint holds the params of step 2: 3 and 4 were skipped.
  assert mngr.latest_step() == 4
  restored, _ = ckpt_lib.restore(mngr, ckpt_lib.abstract(state))
  assert_trees_close(jax.device_get(restored.params), record[2], tol=0)


@pytest.mark.slow
def test_sigterm_during_a_step_checkpoints_and_resumes_exactly(tmp_path):
  num_steps = 6
  state, step, it, desc, schedule, mesh = _setup(num_steps)
  reference = _loop(state, step, it, desc, schedule, mesh, num_steps)
  ref_params = jax.device_get(reference.state.params)

  state, step, it, desc, schedule, mesh = _setup(num_steps)
  mngr = ckpt_lib.manager(str(tmp_path), "stage2")
  record = {}
  handler = signal.getsignal(signal.SIGTERM)
  # SIGTERM arrives while step 3 (0-based) runs.
  sigterm = lambda s: s == 3 and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(loop.Preempted, match="after step 4"):
    _loop(state, _recording(step, record, sigterm), it, desc, schedule, mesh,
          num_steps, mngr=mngr, ckpt_every=4)
  assert signal.getsignal(signal.SIGTERM) is handler
  assert mngr.latest_step() == 4

  # Restore and finish: same params and logged metrics as without SIGTERM.
  state, step, it, desc, schedule, mesh = _setup(num_steps)
  restored, extra = ckpt_lib.restore(mngr, ckpt_lib.abstract(state))
  assert_trees_close(jax.device_get(restored.params), record[4], tol=0)
  it.set_state(extra["data_iter"])
  assert it.pos == 4
  result = _loop(restored, step, it, desc, schedule, mesh, num_steps,
                 mngr=mngr, ckpt_every=4, resume=extra)
  # The resumed run reports its whole training time, not only the rest.
  assert result.seconds > extra["elapsed_seconds"] > 0
  assert_trees_close(jax.device_get(result.state.params), ref_params)
  assert result.history[-1]["step"] == num_steps
  np.testing.assert_allclose(result.history[-1]["loss"],
                             reference.history[-1]["loss"], rtol=1e-6)


def _data_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d",
                                             "*"), recursive=True)
           if os.path.isfile(f)]
  assert files
  return files


def _corrupt(step_dir):
  """Overwrites every array data file of a checkpoint with garbage."""
  for f in _data_files(step_dir):
    with open(f, "wb") as out:
      out.write(b"\x00garbage" * 3)


def _truncate(step_dir):
  """Cuts every array data file in half, as an interrupted write would."""
  for f in _data_files(step_dir):
    os.truncate(f, os.path.getsize(f) // 2)


# Reads still in flight when a read fails must not reach pytest as
# "Event loop is closed" (checkpoint._drop_closed_loop_callbacks).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path,
                                                                 caplog):
  mesh = sharding.make_mesh()
  state = sharding.replicate({"w": np.arange(8.0), "step": np.int32(0)}, mesh)
  mngr = ckpt_lib.manager(str(tmp_path), "stage2", max_to_keep=3)
  for step in (2, 4, 6):
    ckpt_lib.save(mngr, step, jax.tree.map(lambda x, s=step: x + s, state),
                  {"data_iter": {"step": step}})
  mngr.wait_until_finished()
  _corrupt(os.path.join(mngr.directory, "6"))
  # Half-written (a file system without atomic rename, a dying disk).
  _truncate(os.path.join(mngr.directory, "4"))
  # A save killed mid-write leaves a temporary folder orbax never lists.
  os.makedirs(os.path.join(mngr.directory,
                           "8.orbax-checkpoint-tmp-1234567", "state"))

  caplog.set_level(logging.WARNING)
  mngr = ckpt_lib.manager(str(tmp_path), "stage2", max_to_keep=3)
  restored, extra = ckpt_lib.restore(mngr, ckpt_lib.abstract(state))
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(8.0) + 2)
  assert extra["data_iter"] == {"step": 2}
  warned = [r.getMessage() for r in caplog.records
            if "cannot be read" in r.getMessage()]
  assert len(warned) == 2 and "/6 " in warned[0] and "/4 " in warned[1]
  # Set aside (kept for inspection), so training can save those steps anew.
  assert mngr.all_steps() == [2]
  assert len(glob.glob(os.path.join(mngr.directory,
                                    ckpt_lib.SET_ASIDE_PREFIX + "*"))) == 2
  ckpt_lib.save(mngr, 4, state)
  mngr.wait_until_finished()
  assert mngr.latest_step() == 4

  # Nothing readable: a clear error, not a silent fresh start.
  _corrupt(os.path.join(mngr.directory, "2"))
  _corrupt(os.path.join(mngr.directory, "4"))
  with pytest.raises(RuntimeError, match="No readable checkpoint"):
    ckpt_lib.restore(ckpt_lib.manager(str(tmp_path), "stage2"),
                     ckpt_lib.abstract(state))


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_restart_matches_uninterrupted(
    tmp_path):
  overrides = dict(prepare_inputs(str(tmp_path / "inputs")), **{
      "stages": ("stage2",), "stage2.init": "model", "stage2.steps": 8,
      "stage2.ckpt_every": 2,
      "stage2.log_every": 4, "stage2.optim.eps": 1e-6})
  ref_dir = str(tmp_path / "uninterrupted")
  config = testing.apply_overrides(testing.config("busi"), overrides)
  stages_lib.run(config, ref_dir)

  kill_at = random.randint(1, 7)
  workdir = str(tmp_path / "killed")
  [(rc, log)] = run_processes(workdir, overrides, 1, 8, signal_at=kill_at,
                              signal_name="SIGKILL")
  assert rc == -signal.SIGKILL, f"kill at {kill_at}: rc {rc}\n{log[-3000:]}"
  assert not ckpt_lib.is_final(workdir, "stage2")
  [(rc, log)] = run_processes(workdir, overrides, 1, 8)
  assert rc == 0, f"kill at {kill_at}:\n{log[-3000:]}"

  mesh = sharding.make_mesh()
  assert_trees_close(final_params(workdir, "stage2", mesh),
                     final_params(ref_dir, "stage2", mesh))
  ref, got = read_metrics(ref_dir, "stage2"), read_metrics(workdir, "stage2")
  assert sorted(got) == sorted(ref) == [4, 8], f"kill at {kill_at}"
  # One record per step: what the killed run logged after its last
  # checkpoint is dropped when the restart redoes those steps.
  with open(os.path.join(workdir, "metrics", "stage2.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [4, 8], f"kill at {kill_at}: {steps}"
  for step, record in ref.items():
    for k, v in record.items():
      np.testing.assert_allclose(got[step][k], v, rtol=1e-5, atol=1e-5,
                                 err_msg=f"kill at {kill_at}: {step} {k}")
  with open(os.path.join(workdir, "stages.json")) as f:
    stages = json.load(f)
  with open(os.path.join(ref_dir, "stages.json")) as f:
    np.testing.assert_allclose(stages["stage2"]["final_loss"],
                               json.load(f)["stage2"]["final_loss"],
                               rtol=1e-5)


def test_metric_writer_discards_steps_after_a_resume_point(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path), "s", tensorboard=False)
  for step in (2, 4, 6):
    writer.write(step, {"loss": float(step)})
  writer.discard_after(4)
  writer.write(6, {"loss": 0.5})
  with open(writer.path) as f:
    records = [json.loads(line) for line in f]
  assert [(r["step"], r["loss"]) for r in records] == [(2, 2.0), (4, 4.0),
                                                       (6, 0.5)]
