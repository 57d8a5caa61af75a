"""A workdir that knows what made it: the run lock and stage provenance.

Lock: `<workdir>/.hica_lock`, an flock held by process 0 for the whole run
and holding its pid, host and start time. A second run on the same workdir
exits at once naming that process; a lock file left by a process that died
(the flock went with it) is taken over with a warning.

Provenance: each training stage writes `checkpoints/<stage>/provenance.json`
before its first step: the config fields it depends on, the data set's
identity and content fingerprint, what it started from (stage 2: the hash of
stage 1's record) and the code version. `plan_stages` compares those records
with what the current config would produce, before any work: a finished or
interrupted stage made from other inputs stops the run with the differing
fields named, unless `config.restart` names the stage (its old checkpoints
are then moved aside, never deleted).
"""
import contextlib
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from absl import logging

from hica_jax import base_config

LOCK_FILE = ".hica_lock"
RECORD_FILE = "provenance.json"
TRAINED_STAGES = ("stage1", "stage2")
# Config subtrees each stage depends on (stage 2 depends on stage 1 through
# its init record, not through stage 1's fields).
STAGE_DEPS = {"stage1": ("seed", "data", "tokenizer", "model", "stage1"),
              "stage2": ("seed", "data", "tokenizer", "model", "stage2")}
# Fields that do not change what a stage computes: where things are written
# and read from (the data set enters through its fingerprint), how often it
# checkpoints and logs, memory knobs with equal results (GradCache chunks,
# loss column chunks), and stage 2's start (recorded as its init).
NOT_INPUTS = ("data.root", "data.data_dir", "stage1.ckpt_every",
              "stage1.log_every", "stage2.ckpt_every", "stage2.log_every",
              "stage2.accum_steps", "stage2.loss.chunk_size", "stage2.init")
_ORBAX_TMP_GLOB = "*.orbax-checkpoint-tmp*"


# ----------------------------------------------------------------------------
# The lock.


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir."""


def _describe(owner):
  argv = " ".join(owner.get("argv", []))[:200]
  return (f"pid {owner.get('pid')} on host {owner.get('host')}, started "
          f"{owner.get('started')}" + (f" ({argv})" if argv else ""))


class WorkdirLock:
  """flock on `<workdir>/.hica_lock`; use as a context manager."""

  def __init__(self, workdir):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None

  def _read_owner(self):
    try:
      with open(self.path) as f:
        text = f.read().strip()
      return json.loads(text) if text else None
    except (OSError, json.JSONDecodeError):
      return None

  def acquire(self):
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      owner = self._read_owner() or {}
      raise WorkdirBusy(
          f"Workdir {self.workdir} is in use by {_describe(owner)}. Wait for "
          "that run to finish (or stop it), or pass another --workdir."
      ) from None
    previous = self._read_owner()
    if previous:
      logging.warning("Workdir %s: took over the lock left by %s, which is "
                      "no longer running.", self.workdir, _describe(previous))
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now().isoformat(timespec="seconds"),
             "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self):
    if self._fd is None:
      return
    # Emptied, not removed: a process that opened the file meanwhile must
    # contend for the same inode.
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def remove_orbax_temporaries(workdir):
  """Deletes half-written orbax step folders (a save cut by Ctrl-C or a
  kill); only safe while holding the lock. Returns their paths."""
  found = sorted(glob.glob(os.path.join(os.path.abspath(workdir),
                                        "checkpoints", "*", _ORBAX_TMP_GLOB)))
  for path in found:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path, ignore_errors=True)
    logging.warning("Removed %s, a checkpoint whose write was interrupted.",
                    path)
  return found


@contextlib.contextmanager
def sigterm_raises(exception_fn):
  """SIGTERM raises exception_fn() in the main thread for the block's
  duration (the training loop installs its own handler inside it), so a
  SIGTERM before or between training loops ends the run cleanly."""
  def handler(*_):
    raise exception_fn()
  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------
# Provenance records.


class StageMismatch(RuntimeError):
  """The workdir holds stages made from other inputs than the config's."""


class MissingPredecessor(RuntimeError):
  """A stage would start from a stage this workdir does not have."""


def _flatten(value, prefix, out):
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    for k in sorted(value):
      _flatten(value[k], f"{prefix}.{k}" if prefix else k, out)
  else:
    out[prefix] = list(value) if isinstance(value, tuple) else value
  return out


def stage_inputs(config, stage):
  """{dotted field: value} of every config leaf `stage` depends on."""
  out = {}
  for top in STAGE_DEPS[stage]:
    _flatten(config.get(top), top, out)
  skip = NOT_INPUTS + (() if not config.data.get("root")
                       else ("data.synthetic",))
  return base_config.drop_neutral("", {
      k: v for k, v in out.items()
      if not any(k == s or k.startswith(s + ".") for s in skip)})


def data_identity(handle):
  """The data set's identity: name, categories and content fingerprint.

  handle: pipeline.DatasetHandle. Real data sets fingerprint their files
  (names, sizes, contents) and options; the synthetic builders'
  config names encode every generation parameter.
  """
  builder = handle.builder
  fingerprint_fn = getattr(builder, "content_fingerprint", None)
  fingerprint = (fingerprint_fn() if fingerprint_fn is not None
                 else builder.builder_config.name)
  return {"dataset": handle.name, "builder": builder.name,
          "version": str(builder.version),
          "categories": list(handle.categories), "fingerprint": fingerprint}


# The libraries whose versions can change a run's figures (XLA's kernels,
# the optimiser, the random streams and image resampling of the input
# pipeline, the probes' solver).
NUMERIC_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "pillow",
                     "scikit-learn")


def _library_version(name):
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def code_version():
  """{"version": package version, "git_commit": HEAD or None, "libraries":
  {name: version or None} of NUMERIC_LIBRARIES, "cpus": the cores this
  process may run on}. The last two say why a run on another machine or
  install need not repeat a figure to the last digit (XLA:CPU's results
  depend on its thread count)."""
  version = _library_version("hica-jax")
  commit = None
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        timeout=5, cwd=os.path.dirname(os.path.abspath(__file__))
    ).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    pass
  return {"version": version, "git_commit": commit,
          "libraries": {n: _library_version(n) for n in NUMERIC_LIBRARIES},
          "cpus": len(os.sched_getaffinity(0))
                  if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def code_provenance(workdir):
  """{"report": code_version() now, stage: the code_version() that trained
  each finished stage (from its record), for report.json. Evaluation cells
  cached by earlier code are not told apart (their keys name what they
  compute, not the code)."""
  out = {"report": code_version()}
  for stage in TRAINED_STAGES:
    record = read_record(workdir, stage)
    if record is not None and record.get("code") is not None:
      out[stage] = record["code"]
  return out


def _hash(obj):
  blob = json.dumps(obj, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def make_record(config, stage, data, init, code=None):
  """A stage's provenance: inputs, data identity, init; hash over those.

  init: {"from": "model"} or {"from": "stage1", "record": <its hash>}.
  The code version is recorded but not hashed (a new commit must not make
  every workdir stale); a difference is logged.
  """
  record = {"stage": stage, "inputs": stage_inputs(config, stage),
            "data": data, "init": init}
  record["hash"] = _hash({k: record[k] for k in ("inputs", "data", "init")})
  record["code"] = code if code is not None else code_version()
  return record


def record_path(workdir, stage):
  return os.path.join(os.path.abspath(workdir), "checkpoints", stage,
                      RECORD_FILE)


def read_record(workdir, stage):
  path = record_path(workdir, stage)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_record(workdir, stage, record):
  """Writes the record atomically (call on process 0 only)."""
  path = record_path(workdir, stage)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  record = dict(record, written=time.strftime("%Y-%m-%d %H:%M:%S"))
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1, sort_keys=True, default=str)
  os.replace(path + ".tmp", path)


def differences(old, new):
  """["field: old -> new", ...] between two records (inputs, data, init)."""
  out = []
  for part in ("inputs", "data", "init"):
    a, b = old.get(part) or {}, new.get(part) or {}
    for k in sorted(set(a) | set(b)):
      if a.get(k, "<absent>") != b.get(k, "<absent>"):
        name = k if part == "inputs" else f"{part}.{k}"
        out.append(f"{name}: {a.get(k, '<absent>')!r} -> "
                   f"{b.get(k, '<absent>')!r}")
  return out


def stage_progress(workdir, stage):
  """"finished", "interrupted" (checkpoint steps, no FINAL) or "none"."""
  from hica_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if ckpt_lib.is_final(workdir, stage):
    return "finished"
  folder = ckpt_lib.stage_dir(workdir, stage)
  if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
    return "interrupted"
  return "none"


def move_aside(workdir, stage):
  """Moves checkpoints/<stage> to checkpoints/<stage>.replaced_<time>."""
  from hica_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  src = ckpt_lib.stage_dir(workdir, stage)
  if not os.path.exists(src):
    return None
  dst = f"{src}.replaced_{time.strftime('%Y%m%d-%H%M%S')}"
  n = 0
  while os.path.exists(dst + (f"_{n}" if n else "")):
    n += 1
  dst += f"_{n}" if n else ""
  os.rename(src, dst)
  logging.warning("config.restart: moved %s aside to %s; %s trains anew.",
                  src, dst, stage)
  return dst


def restart_stages(config):
  return [s.strip() for s in (config.get("restart") or "").split(",")
          if s.strip()]


def plan_stages(config, workdir, data):
  """Checks every stage the run trains or loads against the workdir.

  data: data_identity(...) of the opened data set. Returns {stage: record}
  of the stages to check (those in config.stages, and finished ones that
  eval/study load), each the record the current config produces. Raises
  MissingPredecessor or StageMismatch (naming every differing field and the
  two ways on) before any work. Reads only; see `apply_plan`.
  """
  stages, restart = tuple(config.stages), set(restart_stages(config))
  evaluates = "eval" in stages or "study" in stages
  code = code_version()
  plan, problems = {}, []
  records = {}
  for stage in TRAINED_STAGES:
    progress = stage_progress(workdir, stage)
    if stage == "stage1":
      init = {"from": "model"}
    elif config.stage2.get("init", "stage1") == "model":
      init = {"from": "model"}
    else:
      s1_progress = stage_progress(workdir, "stage1")
      if "stage1" not in stages and (s1_progress != "finished" or
                                     "stage1" in restart):
        if stage in stages:
          what = ("only an interrupted stage 1" if s1_progress ==
                  "interrupted" else "no finished stage 1")
          raise MissingPredecessor(
              f"config.stages={list(stages)} trains stage 2, which starts "
              f"from stage 1, but {workdir} has {what}. Add stage1 to "
              "config.stages (--config.stages=\"('stage1', 'stage2', "
              "'eval')\"), or start stage 2 from the model's initialisation "
              "with --config.stage2.init=model.")
      init = {"from": "stage1", "record": records["stage1"]["hash"]}
    record = make_record(config, stage, data, init, code)
    records[stage] = record
    if stage not in stages and not (evaluates and progress == "finished"):
      continue
    plan[stage] = record
    if progress == "none" or stage in restart:
      continue
    old = read_record(workdir, stage)
    if old is None:
      logging.warning(
          "%s in %s has no provenance record (made by an older version); "
          "assuming it matches the current config.", stage, workdir)
      continue
    if old.get("hash") != record["hash"]:
      problems.append((stage, progress, differences(old, record)))
    elif old.get("code") != code:
      logging.info("%s was made by code %s; running %s.", stage,
                   old.get("code"), code)
  if problems:
    lines = []
    for stage, progress, diffs in problems:
      lines.append(f"{stage} ({progress}) was made from other inputs:")
      lines += [f"    {d}" for d in diffs]
    names = ",".join(s for s, _, _ in problems)
    missing = [s for s, _, _ in problems if s not in stages]
    also = (f" and {missing} added to config.stages" if missing else "")
    raise StageMismatch(
        f"Workdir {os.path.abspath(workdir)} holds stages made from other "
        "inputs than this config:\n  " + "\n  ".join(lines) + "\nNothing was "
        "changed. Either pass a new --workdir, or train those stages anew "
        f"with --config.restart={names}{also} (their checkpoints are moved "
        "aside, not deleted).")
  return plan


def apply_plan(config, workdir, plan, is_leader=True):
  """Moves aside the stages config.restart names, then writes the records
  of the stages about to train (process 0 only)."""
  if not is_leader:
    return
  for stage in restart_stages(config):
    if stage in config.stages:
      move_aside(workdir, stage)
  for stage, record in plan.items():
    if stage in config.stages and stage_progress(workdir, stage) != \
        "finished":
      write_record(workdir, stage, record)
    elif read_record(workdir, stage) is None and \
        stage_progress(workdir, stage) == "finished":
      write_record(workdir, stage, record)  # adopt an older workdir's stage


# ----------------------------------------------------------------------------
# The run flow's calls (hica_jax/main.py run()).


@contextlib.contextmanager
def run_lock(workdir):
  """Holds the workdir lock for a run: process 0 takes it, every process
  learns whether it could (so none waits at a barrier for a process that
  stopped); stale orbax temporaries are removed under the lock."""
  import jax  # pylint: disable=g-import-not-at-top
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
      remove_orbax_temporaries(workdir)
    except WorkdirBusy as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = multihost_utils.process_allgather(np.int32(error is None))
    if error is None and not np.min(ok):
      raise WorkdirBusy(f"Workdir {workdir} is in use by another run (see "
                        "process 0's log).")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def check_before_stages(config, workdir, data_handle):
  """After the data set is open, before any training: the data suit the
  config (every class has images, at least the largest K), and the
  workdir's stages match it (plan_stages); then config.restart's stages
  are moved aside and the records written. Returns the plan."""
  import jax  # pylint: disable=g-import-not-at-top
  from hica_jax import config_validation  # pylint: disable=g-import-not-at-top
  from hica_jax import distributed  # pylint: disable=g-import-not-at-top
  where = config.data.get("root") or f"{data_handle.name} (synthetic)"
  config_validation.validate_data(config, data_handle.split_counts(),
                                  data_handle.seen, where)
  config_validation.validate_class_phrases(config, data_handle.bank,
                                           data_handle.seen)
  plan = plan_stages(config, workdir, data_identity(data_handle))
  apply_plan(config, workdir, plan, is_leader=jax.process_index() == 0)
  distributed.barrier("workdir_plan")
  return plan


def verify_finished(config, workdir, stage, shardings_fn):
  """True when `stage` is finished and its final step is readable.

  A final step that cannot be read is set aside (checkpoint.restore_params)
  and the stage is marked unfinished, so that it resumes from its newest
  readable step when it runs; a stage the run only loads (not in
  config.stages) then fails with what to do.
  """
  from hica_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  final = ckpt_lib.final_step(workdir, stage)
  if final is None:
    return False
  try:
    used, _ = ckpt_lib.restore_params(ckpt_lib.manager(workdir, stage),
                                      shardings_fn, return_step=True)
  except RuntimeError:
    # Nothing readable (every step set aside): a rerun trains it anew.
    ckpt_lib.unmark_final(workdir, stage)
    raise
  if used == final:
    return True
  ckpt_lib.unmark_final(workdir, stage)
  resume = f"it resumes from step {used}"
  if stage not in config.stages:
    raise RuntimeError(
        f"{stage}: the final checkpoint (step {final}) in "
        f"{ckpt_lib.stage_dir(workdir, stage)} cannot be read and was set "
        f"aside; add {stage} to config.stages so that {resume}.")
  logging.warning("%s: the final checkpoint (step %d) cannot be read and was "
                  "set aside; %s.", stage, final, resume)
  return False
