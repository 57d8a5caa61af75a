"""Multi-process helpers: initialisation, leader-first builds, barriers and
the preemption watch. On one process every helper is a no-op or a plain
call, so single-machine code paths are the multi-host ones.
"""
import contextlib
import itertools
import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


def wants_distributed():
  env = os.environ
  if int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  # TPU VMs of a multi-host slice list every worker's hostname.
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",")
              if h]) > 1


def initialize_distributed(mode):
  """Calls jax.distributed.initialize() when running multi-process.

  Our launch scripts export JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID; on SLURM and TPU pods JAX detects the cluster itself.
  """
  if mode == "off" or (mode == "auto" and not wants_distributed()):
    return False
  env = os.environ
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  if env.get("JAX_PLATFORMS", "") == "cpu":
    # CPU processes reduce across each other through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def leader_first(fn, name):
  """fn() on process 0, then on the others.

  Builds that write to the workdir (data set, tokenizer) run once where the
  folder is shared, and the other processes find the result; where each
  host has its own disk they build their own (deterministically equal) copy.
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"leader_first_{name}")
  return out if jax.process_index() == 0 else fn()


def barrier(name):
  """Waits for every process (a no-op on one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# JAX's preemption sync manager is process-global and wants step ids that
# only grow, across every loop of the run; so is this counter.
_SYNC_IDS = itertools.count(1)


@contextlib.contextmanager
def preemption_watch():
  """Yields should_stop() -> bool: True once SIGTERM arrived.

  Multi-process, JAX's preemption service catches SIGTERM on any process
  and should_stop() turns True at the same call on every process (call it
  once per step on all of them). On one process a SIGTERM handler is held
  for the duration of the block.
  """
  if jax.process_count() > 1:
    yield lambda: multihost_utils.reached_preemption_sync_point(
        next(_SYNC_IDS))
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  received = []
  previous = signal.signal(signal.SIGTERM, lambda *_: received.append(1))
  try:
    yield lambda: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)
