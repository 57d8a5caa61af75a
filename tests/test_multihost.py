"""Multi-host runs simulated on localhost, and the launch scripts.

Two JAX processes with 2 CPU devices each (gloo collectives) run stage 2 and
evaluation through `python -m hica_jax.main`; process 1 is sent SIGTERM
mid-run, both stop at the step JAX's preemption service agrees on, and a
relaunch resumes from the checkpoint both wrote. The result must equal one
process with 4 devices: same parameters, metrics and evaluation numbers.
The driver and helpers are in tests/harness.py.
"""
import json
import os
import re
import subprocess

import numpy as np
import pytest

from harness import REPO
from harness import assert_reports_close
from harness import assert_trees_close
from harness import final_params
from harness import prepare_inputs
from harness import read_metrics
from harness import run_processes

# ----------------------------------------------------------------------------
# Tests.


@pytest.mark.slow
def test_two_processes_equal_one_process_across_preemption(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from hica_jax import sharding  # pylint: disable=g-import-not-at-top
  from hica_jax import stages  # pylint: disable=g-import-not-at-top
  from hica_jax import testing  # pylint: disable=g-import-not-at-top
  overrides = dict(prepare_inputs(str(tmp_path / "inputs")), **{
      "stages": ("stage2", "eval"), "stage2.init": "model",
      "stage2.steps": 8, "stage2.ckpt_every": 2,
      "stage2.log_every": 2, "stage2.optim.eps": 1e-6,
      # FSDP, so that each process writes its own shards of the checkpoint.
      "sharding.preset": "fsdp", "sharding.fsdp_min_size": 1024,
      "eval.shots": (1,), "eval.seeds": 1, "eval.fewshot_steps": 2})

  # Reference: one process, 4 devices, uninterrupted.
  ref_dir = str(tmp_path / "one_process")
  config = testing.apply_overrides(testing.config("busi"), overrides)
  mesh4 = sharding.make_mesh(jax.devices()[:4])
  ref_report = stages.run(config, ref_dir, mesh=mesh4)

  # Two processes x 2 devices; process 1 gets SIGTERM before stage-2 step 3.
  workdir = str(tmp_path / "two_processes")
  results = run_processes(workdir, overrides, 2, 2, signal_at=2,
                          signal_process=1)
  stops = []
  for i, (rc, log) in enumerate(results):
    assert rc == 0, f"process {i}:\n{log[-4000:]}"
    stops += re.findall(r"(\S+): stopped by SIGTERM after step (\d+)", log)
  # Both stopped at the one step they agreed on (stage 2, or a few-shot run
  # when the agreement came after stage 2's last step).
  assert len(stops) == 2 and stops[0] == stops[1], stops
  stage2_dir = os.path.join(workdir, "checkpoints", "stage2")
  steps = sorted(int(d) for d in os.listdir(stage2_dir) if d.isdigit())
  assert steps and steps[-1] >= 3, steps
  # Both processes wrote their shards of the newest checkpoint.
  state_dir = os.path.join(stage2_dir, str(steps[-1]), "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  assert not os.path.exists(os.path.join(workdir, "report.json"))

  results = run_processes(workdir, overrides, 2, 2)
  for i, (rc, log) in enumerate(results):
    assert rc == 0, f"process {i}:\n{log[-4000:]}"
  # Only process 0 logs at INFO.
  assert "Wrote " in results[0][1] and "Wrote " not in results[1][1]

  assert_trees_close(final_params(workdir, "stage2", mesh4),
                     final_params(ref_dir, "stage2", mesh4))
  ref_metrics = read_metrics(ref_dir, "stage2")
  metrics = read_metrics(workdir, "stage2")
  assert sorted(metrics) == sorted(ref_metrics) == [2, 4, 6, 8]
  for step in ref_metrics:
    for k, v in ref_metrics[step].items():
      np.testing.assert_allclose(metrics[step][k], v, rtol=1e-5, atol=1e-5,
                                 err_msg=f"step {step} {k}")
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  with open(os.path.join(ref_dir, "report.json")) as f:
    assert_reports_close(report, json.load(f))
  assert ref_report["stage2_eval"]["accuracy"] >= 0.0


def _fake_gcloud(tmp_path):
  """A `gcloud` on PATH that records any call (a dry run makes none)."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  calls = tmp_path / "gcloud_calls"
  gcloud = bindir / "gcloud"
  gcloud.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
  gcloud.chmod(0o755)
  return dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"), calls


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(tmp_path):
  env, calls = _fake_gcloud(tmp_path)
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--dry-run",
       "--name=hica-v4", "--zone=us-central2-b", "--project=my-proj",
       "--accelerator-type=v4-16", "--spot", "--",
       "--config", "configs/busi_fewshot.py",
       "--workdir=/mnt/shared/runs/busi", "--config.stage2.steps=500"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert not calls.exists(), calls.read_text()
  out = proc.stdout
  lines = [l for l in out.splitlines() if l.startswith("gcloud ")]
  # Create-or-reuse, copy, install, run: each on every worker.
  assert any("tpus tpu-vm describe hica-v4" in l and
             "tpus tpu-vm create hica-v4" in l and "--spot" in l and
             "--accelerator-type=v4-16" in l for l in lines), out
  assert any("tpu-vm scp" in l and "--worker=all" in l for l in lines), out
  assert any("tpu-vm ssh" in l and "--worker=all" in l and "pip install" in l
             for l in lines), out
  run = [l for l in lines if "python -m hica_jax.main" in l]
  assert len(run) == 1 and "--worker=all" in run[0], out
  for arg in ("--config configs/busi_fewshot.py",
              "--workdir=/mnt/shared/runs/busi", "--config.stage2.steps=500",
              "--zone=us-central2-b", "--project=my-proj"):
    assert arg in run[0], run[0]


def test_tpu_pod_without_a_name_fails_clearly(tmp_path):
  env, calls = _fake_gcloud(tmp_path)
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--dry-run",
       "--zone=z", "--", "--config", "configs/busi_fewshot.py"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "--name" in proc.stderr
  assert not calls.exists()


def test_slurm_script_runs_one_process_per_gpu_through_srun():
  with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
    script = f.read()
  proc = subprocess.run(["bash", "-n", os.path.join(REPO, "launch",
                                                    "slurm.sbatch")],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert "#SBATCH --ntasks-per-node" in script and "srun" in script
  assert "python -m hica_jax.main" in script and "--distributed=on" in script


