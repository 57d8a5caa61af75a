"""Multi-host runs simulated on localhost, and the launch scripts.

Two JAX processes with 2 CPU devices each (gloo collectives) run stage 2 and
evaluation through `python -m hica_jax.main`; process 1 is sent SIGTERM
mid-run, both stop at the step JAX's preemption service agrees on, and a
relaunch resumes from the checkpoint both wrote. The result must equal one
process with 4 devices: same parameters, metrics and evaluation numbers.

Run as a script, this file is the driver the tests launch (see `_driver`).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "busi_fewshot.py") + ":tiny"


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def prepare_inputs(root):
  """Builds the tiny data set and tokenizer once; runs share them."""
  from hica_jax import base_config  # pylint: disable=g-import-not-at-top
  from hica_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  config = base_config.get_base_config("busi", "tiny")
  config.data.data_dir = os.path.join(root, "data")
  main_lib.build_context(config, root)
  return {"data.data_dir": config.data.data_dir,
          "tokenizer.path": os.path.join(root, "tokenizer")}


def apply_overrides(config, overrides):
  """The in-process twin of `--config.a.b=v` flags."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def override_flags(overrides):
  return [f"--config.{k}={v!r}" if not isinstance(v, str) else
          f"--config.{k}={v}" for k, v in overrides.items()]


def driver_command(workdir, overrides, devices, signal_at=None,
                   signal_name="SIGTERM", signal_process=0):
  """argv of this file as a driver: hica_jax.main in a fresh process."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--devices={devices}"]
  if signal_at is not None:
    cmd += [f"--signal_at={signal_at}", f"--signal={signal_name}",
            f"--signal_process={signal_process}"]
  return cmd + ["--", "--config", CONFIG, f"--workdir={workdir}"] + \
      override_flags(overrides)


def driver_env(**extra):
  """Environment of a driver: the test session's XLA cache, quiet logs."""
  import jax  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             HICA_COMPILATION_CACHE=jax.config.jax_compilation_cache_dir or
             "off", PYTHONPATH=REPO)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_processes(workdir, overrides, num_processes, devices, timeout=400,
                  **signal_args):
  """Starts `num_processes` drivers as one JAX job; returns their results."""
  port = free_port()
  procs = []
  for i in range(num_processes):
    env = driver_env() if num_processes == 1 else driver_env(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=num_processes, JAX_PROCESS_ID=i)
    cmd = driver_command(workdir, overrides, devices, **signal_args)
    if num_processes > 1:
      cmd.append("--distributed=on")
    procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, text=True,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT))
  out = []
  for p in procs:
    try:
      log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, log))
  return out


def read_metrics(workdir, stage):
  """Metric records by step; a resumed run's re-logged steps replace the old."""
  by_step = {}
  with open(os.path.join(workdir, "metrics", f"{stage}.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      record.pop("time")
      by_step[record["step"]] = record
  return by_step


def final_params(workdir, stage, mesh):
  from hica_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  params = ckpt_lib.restore_params(
      ckpt_lib.manager(workdir, stage),
      lambda t: jax.tree.map(lambda _: sharding.replicated(mesh), t))
  return jax.device_get(params)


def assert_trees_close(a, b, tol=1e-5):
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol,
      atol=tol), a, b)


def assert_reports_close(a, b, tol=1e-5):
  """Every number of two report dicts agrees (timings excluded)."""
  def walk(x, y, path):
    if isinstance(x, dict):
      assert set(x) == set(y), path
      for k in x:
        if k not in ("timing", "seconds"):
          walk(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, (list, tuple)):
      assert len(x) == len(y), path
      for i, (u, v) in enumerate(zip(x, y)):
        walk(u, v, f"{path}[{i}]")
    elif isinstance(x, float) or isinstance(y, float):
      if x is None or y is None:
        assert x is None and y is None, path
      else:
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=path)
    else:
      assert x == y, path
  walk(a, b, "report")


# ----------------------------------------------------------------------------
# Tests.


@pytest.mark.slow
def test_two_processes_equal_one_process_across_preemption(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from hica_jax import base_config  # pylint: disable=g-import-not-at-top
  from hica_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import sharding  # pylint: disable=g-import-not-at-top
  overrides = dict(prepare_inputs(str(tmp_path / "inputs")), **{
      "stages": ("stage2", "eval"), "stage2.init": "model",
      "stage2.steps": 8, "stage2.ckpt_every": 2,
      "stage2.log_every": 2, "stage2.optim.eps": 1e-6,
      # FSDP, so that each process writes its own shards of the checkpoint.
      "sharding.preset": "fsdp", "sharding.fsdp_min_size": 1024,
      "eval.shots": (1,), "eval.seeds": 1, "eval.fewshot_steps": 2})

  # Reference: one process, 4 devices, uninterrupted.
  ref_dir = str(tmp_path / "one_process")
  config = apply_overrides(base_config.get_base_config("busi", "tiny"),
                           overrides)
  mesh4 = sharding.make_mesh(jax.devices()[:4])
  ref_report = main_lib.run(config, ref_dir, mesh=mesh4)

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


# ----------------------------------------------------------------------------
# Driver: `python tests/test_multihost.py --devices=N [--signal_at=S ...] --
# <hica_jax.main flags>`. Sets the device count before JAX starts, then runs
# main; with --signal_at it sends itself a signal at the start of stage-2
# step S (on process --signal_process): a deterministic preemption or kill.


def _driver(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--signal_at", type=int, default=None)
  parser.add_argument("--signal", default="SIGTERM")
  parser.add_argument("--signal_process", type=int, default=0)
  split = argv.index("--")
  args = parser.parse_args(argv[:split])
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", args.devices)
  from absl import app  # pylint: disable=g-import-not-at-top
  from hica_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import train as train_lib  # pylint: disable=g-import-not-at-top

  if args.signal_at is not None:
    loop = train_lib.train_loop
    sig = getattr(signal, args.signal)

    def signalling_loop(state, step_fn, *a, **kw):
      def step(state, *step_args):
        if kw.get("desc") == "stage2" and \
            jax.process_index() == args.signal_process and \
            int(state.step) == args.signal_at:
          os.kill(os.getpid(), sig)
        return step_fn(state, *step_args)
      return loop(state, step, *a, **kw)

    train_lib.train_loop = signalling_loop
  app.run(main_lib.main, argv=[sys.argv[0]] + argv[split + 1:])


if __name__ == "__main__":
  _driver(sys.argv[1:])
