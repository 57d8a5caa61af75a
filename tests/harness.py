"""Multi-process test harness shared by the test files: the tiny inputs,
config overrides as flags, a driver that runs `python -m hica_jax.main` in a
fresh process (optionally signalling itself at a stage-2 step), and
comparisons of parameters, metrics and reports.

Run as a script, this file is the driver (see `_driver`).
"""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "busi_fewshot.py") + ":tiny"


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def prepare_inputs(root):
  """Builds the tiny data set and tokenizer once; runs share them."""
  from hica_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from hica_jax import testing  # pylint: disable=g-import-not-at-top
  config = testing.config("busi")
  config.data.data_dir = os.path.join(root, "data")
  context_lib.build_context(config, root)
  return {"data.data_dir": config.data.data_dir,
          "tokenizer.path": os.path.join(root, "tokenizer")}


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
  from hica_jax.training import loop as loop_lib  # pylint: disable=g-import-not-at-top

  if args.signal_at is not None:
    loop = loop_lib.train_loop
    sig = getattr(signal, args.signal)

    def signalling_loop(state, step_fn, *a, **kw):
      def step(state, *step_args):
        if kw.get("desc") == "stage2" and \
            jax.process_index() == args.signal_process and \
            int(state.step) == args.signal_at:
          os.kill(os.getpid(), sig)
        return step_fn(state, *step_args)
      return loop(state, step, *a, **kw)

    loop_lib.train_loop = signalling_loop
  app.run(main_lib.main, argv=[sys.argv[0]] + argv[split + 1:])


if __name__ == "__main__":
  _driver(sys.argv[1:])
