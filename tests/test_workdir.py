"""A workdir that knows what made it: stage provenance, the run lock, the
checkpoint fallback of finished stages, and nothing lost on a config change.

The end-to-end tests share one tiny stage-1 run and work on copies of it.
"""
import glob
import json
import logging
import os
import shutil
import signal
import time

import jax
import ml_collections
import numpy as np
import pytest

import fixtures_real as fx
from hica_jax import testing
from hica_jax import checkpoint as ckpt_lib
from hica_jax import stages as stages_lib
from hica_jax import sharding
from hica_jax.training import loop
from hica_jax import workdir as workdir_lib


def _config(stages=("stage1",), **overrides):
  config = testing.config("chestxray", "tiny")
  config.stages = stages
  return testing.apply_overrides(config, overrides)


def _listing(workdir):
  """Every file under the workdir's checkpoints with its size."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "checkpoints", "**"),
                        recursive=True):
    if os.path.isfile(path):
      out[os.path.relpath(path, workdir)] = os.path.getsize(path)
  return out


def _metrics(workdir, stage):
  with open(os.path.join(workdir, "metrics", f"{stage}.jsonl")) as f:
    return f.read()


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1_run"))
  stages_lib.run(_config(), workdir)
  return workdir


@pytest.fixture
def workdir(stage1_run, tmp_path):
  out = str(tmp_path / "w")
  shutil.copytree(stage1_run, out)
  return out


def test_finished_stage_records_what_made_it(workdir):
  record = workdir_lib.read_record(workdir, "stage1")
  assert record["inputs"]["model.image.width"] == 32
  assert record["inputs"]["stage1.steps"] == 6
  assert "stage1.ckpt_every" not in record["inputs"]
  assert record["data"]["dataset"] == "synthetic_chestxray"
  assert record["data"]["fingerprint"] == "s32_n12-2-6_seed0_d0250"
  assert record["init"] == {"from": "model"}
  assert set(record["code"]) == {"version", "git_commit", "libraries",
                                 "cpus"}
  assert record["code"]["libraries"]["jax"] == jax.__version__
  assert record["code"]["cpus"] >= 1


def test_changed_data_stops_before_any_work(workdir, tmp_path):
  root = fx.write_kermany(str(tmp_path / "downloads"))
  before, metrics = _listing(workdir), _metrics(workdir, "stage1")
  with pytest.raises(workdir_lib.StageMismatch) as e:
    stages_lib.run(_config(**{"data.root": root}), workdir)
  message = str(e.value)
  assert "stage1 (finished)" in message
  assert "data.dataset: 'synthetic_chestxray' -> 'kermany'" in message
  assert "--workdir" in message and "--config.restart=stage1" in message
  assert _listing(workdir) == before
  assert _metrics(workdir, "stage1") == metrics


def test_config_change_on_an_interrupted_stage_keeps_its_progress(workdir):
  ckpt_lib.unmark_final(workdir, "stage1")  # As if stopped after step 6.
  before = _listing(workdir)
  with pytest.raises(workdir_lib.StageMismatch,
                     match=r"stage1 \(interrupted\)[\s\S]*model.image.width: "
                           r"32 -> 48"):
    stages_lib.run(_config(**{"model.image.width": 48}), workdir)
  assert _listing(workdir) == before
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*",
                                    ckpt_lib.SET_ASIDE_PREFIX + "*"))
  # The original config resumes at step 6: nothing is trained again.
  metrics = _metrics(workdir, "stage1")
  stages_lib.run(_config(), workdir)
  assert ckpt_lib.is_final(workdir, "stage1")
  assert _metrics(workdir, "stage1") == metrics


def test_restart_moves_the_old_stage_aside_and_trains_anew(workdir):
  old_record = workdir_lib.read_record(workdir, "stage1")
  stages_lib.run(_config(**{"stage1.optim.lr": 2e-3,
                          "restart": "stage1"}), workdir)
  [aside] = glob.glob(os.path.join(workdir, "checkpoints",
                                   "stage1.replaced_*"))
  with open(os.path.join(aside, workdir_lib.RECORD_FILE)) as f:
    assert json.load(f)["hash"] == old_record["hash"]
  new_record = workdir_lib.read_record(workdir, "stage1")
  assert new_record["inputs"]["stage1.optim.lr"] == 2e-3
  assert ckpt_lib.is_final(workdir, "stage1")


# Reads still in flight when a read fails must not reach pytest as
# "Event loop is closed" (checkpoint._drop_closed_loop_callbacks).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_final_step_resumes_from_the_previous(workdir, caplog):
  final_dir = os.path.join(ckpt_lib.stage_dir(workdir, "stage1"), "6")
  for f in glob.glob(os.path.join(final_dir, "state", "**", "d", "*"),
                     recursive=True):
    os.truncate(f, os.path.getsize(f) // 2)
  caplog.set_level(logging.WARNING)
  stages_lib.run(_config(), workdir)
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "final checkpoint (step 6) cannot be read" in warned
  assert "resumes from step 3" in warned
  assert ckpt_lib.is_final(workdir, "stage1")
  assert glob.glob(os.path.join(ckpt_lib.stage_dir(workdir, "stage1"),
                                ckpt_lib.SET_ASIDE_PREFIX + "6_*"))
  mesh = sharding.make_mesh()
  step, _ = ckpt_lib.restore_params(
      ckpt_lib.manager(workdir, "stage1"),
      lambda t: jax.tree.map(lambda _: sharding.replicated(mesh), t),
      return_step=True)
  assert step == 6
  with open(os.path.join(workdir, "stages.json")) as f:
    assert json.load(f)["stage1"]["steps"] == 6


def test_a_busy_workdir_is_refused_and_named(workdir):
  with workdir_lib.WorkdirLock(workdir):
    with pytest.raises(workdir_lib.WorkdirBusy,
                       match=rf"in use by pid {os.getpid()} on host "):
      stages_lib.run(_config(), workdir)
  # Released: the next run proceeds (and, finished, trains nothing).
  metrics = _metrics(workdir, "stage1")
  stages_lib.run(_config(), workdir)
  assert _metrics(workdir, "stage1") == metrics


# ----------------------------------------------------------------------------
# Cheap units: plans, lock, checkpoints.


def _fake_finished(workdir, stage, record):
  os.makedirs(os.path.join(ckpt_lib.stage_dir(workdir, stage), "6"))
  workdir_lib.write_record(workdir, stage, record)
  ckpt_lib.mark_final(workdir, stage, 6)


_DATA = {"dataset": "synthetic_chestxray", "fingerprint": "f"}


def test_stage2_without_stage1_needs_an_explicit_init(tmp_path):
  workdir = str(tmp_path)
  config = _config(stages=("stage2", "eval"))
  with pytest.raises(workdir_lib.MissingPredecessor,
                     match=r"no finished stage 1.*--config.stage2.init=model"):
    workdir_lib.plan_stages(config, workdir, _DATA)
  config.stage2.init = "model"
  plan = workdir_lib.plan_stages(config, workdir, _DATA)
  assert plan["stage2"]["init"] == {"from": "model"}
  _fake_finished(workdir, "stage2", plan["stage2"])
  # A later full run must not keep the stage 2 that never saw stage 1.
  full = _config(stages=("stage1", "stage2", "eval"))
  with pytest.raises(workdir_lib.StageMismatch,
                     match=r"stage2 \(finished\)[\s\S]*init.from: 'model' -> "
                           r"'stage1'[\s\S]*restart=stage2"):
    workdir_lib.plan_stages(full, workdir, _DATA)


def test_changed_stage1_makes_its_finished_stage2_stale(tmp_path):
  workdir = str(tmp_path)
  config = _config(stages=("stage1", "stage2"))
  plan = workdir_lib.plan_stages(config, workdir, _DATA)
  for stage in ("stage1", "stage2"):
    _fake_finished(workdir, stage, plan[stage])
  assert workdir_lib.plan_stages(config, workdir, _DATA) == plan
  # Eval alone checks the stages it loads, too.
  eval_only = _config(stages=("eval",), **{"stage1.mlm_rate": 0.3})
  with pytest.raises(workdir_lib.StageMismatch) as e:
    workdir_lib.plan_stages(eval_only, workdir, _DATA)
  assert "stage1.mlm_rate: 0.15 -> 0.3" in str(e.value)
  assert "init.record" in str(e.value)  # stage 2 started from the old one
  assert "--config.restart=stage1,stage2" in str(e.value)
  # Logging and checkpoint cadence are not inputs.
  same = _config(stages=("stage1", "stage2"), **{"stage1.log_every": 1,
                                                 "stage2.ckpt_every": 1})
  assert workdir_lib.plan_stages(same, workdir, _DATA) == plan


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  path = os.path.join(tmp_path, workdir_lib.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"pid": 999999, "host": "gone", "started": "yesterday"}, f)
  caplog.set_level(logging.WARNING)
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with open(path) as f:
      assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirBusy, match="started "):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert any("pid 999999 on host gone" in r.getMessage()
             for r in caplog.records)


def test_interrupted_orbax_writes_are_removed_under_the_lock(tmp_path):
  tmp = os.path.join(tmp_path, "checkpoints", "stage2",
                     "4.orbax-checkpoint-tmp-1234")
  kept = os.path.join(tmp_path, "checkpoints", "stage2", "2")
  os.makedirs(os.path.join(tmp, "state"))
  os.makedirs(kept)
  with workdir_lib.run_lock(str(tmp_path)):
    assert not os.path.exists(tmp) and os.path.isdir(kept)


def test_sigterm_outside_a_loop_raises_the_clean_stop():
  with pytest.raises(loop.Preempted, match="outside"):
    with workdir_lib.sigterm_raises(
        lambda: loop.Preempted("outside a loop")):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)  # Interrupted by the handler's exception.


def test_shape_change_is_a_mismatch_not_corruption(tmp_path):
  mesh = sharding.make_mesh()
  state = sharding.replicate({"params": {"w": np.arange(8.0)},
                              "step": np.int32(0)}, mesh)
  mngr = ckpt_lib.manager(str(tmp_path), "stage2")
  ckpt_lib.save(mngr, 2, state)
  mngr.wait_until_finished()
  wider = sharding.replicate({"params": {"w": np.arange(6.0)},
                              "step": np.int32(0)}, mesh)
  with pytest.raises(ckpt_lib.CheckpointMismatch,
                     match=r"params/w: stored shape \(8,\), expected \(6,\)"):
    ckpt_lib.restore(mngr, ckpt_lib.abstract(wider))
  assert os.listdir(mngr.directory) == ["2"]
  restored, _ = ckpt_lib.restore(mngr, ckpt_lib.abstract(state))
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.arange(8.0))


def test_neutral_added_fields_keep_old_records_and_cells_valid():
  """A field added later at its neutral value (base_config.
  NEUTRAL_ADDED_FIELDS) leaves stage records and cell keys as they were
  without it; any other value is an input like every other."""
  from hica_jax import base_config  # pylint: disable=g-import-not-at-top
  from hica_jax.evaluators import grid  # pylint: disable=g-import-not-at-top
  config = _config()
  old = ml_collections.ConfigDict(config.to_dict())
  for field in base_config.NEUTRAL_ADDED_FIELDS:
    parent, leaf = base_config.field_parent(old, field)
    del parent[leaf]
    assert field not in workdir_lib.stage_inputs(config, "stage1")
  assert (workdir_lib.stage_inputs(config, "stage1")
          == workdir_lib.stage_inputs(old, "stage1"))
  cell = grid.Cell("hica_K1_s0", None, grid.HICA_DEPS, {"k": 1})
  assert cell.key(config) == cell.key(old)
  # A sequence's neutral value holds as a list too (JSON reads tuples so).
  assert base_config.is_neutral("eval.hica_freeze", [])
  assert not base_config.is_neutral("eval.hica_freeze", ["^params/image/"])
  queued = testing.apply_overrides(_config(), {
      "stage1.swav.queue_length": 64})
  assert workdir_lib.stage_inputs(queued, "stage1")[
      "stage1.swav.queue_length"] == 64
  assert cell.key(queued) != cell.key(config)
  thawed = testing.apply_overrides(_config(), {"stage2.freeze_for": 0.5})
  assert cell.key(thawed) != cell.key(config)
