r"""Runs HiCA: the stages named in config.stages, then writes the report.

  python -m hica_jax.main --config configs/chestxray_fewshot.py \
      [--workdir runs/chestxray_fewshot] [--config.stage2.steps=500]

The config arg `study` (configs/*.py:study) adds the "study" stage after
eval: the few-shot grid, ablations, unseen categories, descriptor noise,
interpretability and efficiency (hica_jax/study.py), each cell cached in
<workdir>/study/cells, then report.{json,md,html} with plots.

The whole config is checked before any work (hica_jax/config_validation.py)
and the workdir is locked for the run. A finished stage is skipped and an
interrupted one resumes from its last checkpoint (with its data iterator
state), both only while the inputs recorded with it (config fields, data
fingerprint, predecessor, see hica_jax/workdir.py) equal the current ones;
otherwise the run stops at start naming the differences: use a new
--workdir or --config.restart=<stages>. SIGTERM
checkpoints and exits with status 0 (rerun to resume). Multi-process runs
(launch/) start one such process per host or accelerator; process 0 logs and
writes the reports, every process writes its checkpoint shards.
"""
import contextlib
import json
import os
import time

import jax
from absl import app
from absl import flags
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from hica_jax import checkpoint as ckpt_lib
from hica_jax import config_validation
from hica_jax import evaluate
from hica_jax import metrics as metrics_lib
from hica_jax import report as report_lib
from hica_jax import sharding
from hica_jax import study as study_lib
from hica_jax import tokenizer as tokenizer_lib
from hica_jax import train as train_lib
from hica_jax import workdir as workdir_lib
from hica_jax.data import pipeline
from hica_jax.models import build_model
from hica_jax.models import hf_import

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder; default runs/<config.name>.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-process init through jax.distributed.initialize(): 'auto' when the "
    "environment names several processes (JAX_NUM_PROCESSES, SLURM, TPU "
    "pod), 'on' always, 'off' never.")
flags.mark_flags_as_required(["config"])
# The optional stage after eval (config arg `study`; hica_jax/study.py).
STUDY = "study"


def _wants_distributed():
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
  if mode == "off" or (mode == "auto" and not _wants_distributed()):
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


def setup_tokenizer(config, model_config, workdir, bank):
  """The run's tokenizer: a HF folder, or WordPiece trained on the corpus.

  A text tower initialised from Hugging Face brings its own tokenizer. A
  trained vocabulary is saved in the workdir so checkpoints stay usable.
  """
  path = config.tokenizer.path or hf_import.hf_tokenizer_path(model_config)
  if path:
    return tokenizer_lib.load_tokenizer(path)
  out = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(out, "tokenizer.json")):
    return tokenizer_lib.load_tokenizer(out)
  corpus = pipeline.text_corpus(bank)
  return tokenizer_lib.train_wordpiece(corpus, out,
                                       vocab_size=config.tokenizer.vocab_size)


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


def build_context(config, workdir, mesh=None):
  """The run's Context; `mesh` defaults to every device (config.sharding)."""
  if mesh is None:
    sc = config.get("sharding")
    mesh = sharding.make_mesh(model_axis=sc.model_axis if sc else 1)
  data_dir = config.data.data_dir or os.path.join(workdir, "data")

  def open_data():
    data = pipeline.open_dataset(config.data, data_dir)
    data.split_counts()   # writes the per-split label caches once
    return data

  data = leader_first(open_data, "data")
  # A tower initialised from Hugging Face takes its architecture from there.
  model_config = hf_import.resolve_model_config(config.model)
  tok = leader_first(
      lambda: setup_tokenizer(config, model_config, workdir, data.bank),
      "tokenizer")
  model = build_model(model_config, tokenizer_lib.vocab_size(tok))
  tables = pipeline.build_text_tables(
      data.bank, data.seen, tok, model_config.text.max_len,
      config.data.max_phrase_len)
  mean, std = pipeline.normalization(config.data.normalization, model_config)
  return train_lib.Context(config=config, model_config=model_config,
                           workdir=workdir, mesh=mesh,
                           model=model, data=data, tokenizer=tok,
                           tables=tables, mean=mean, std=std)


def _load_json(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _save_json(path, obj):
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run(config, workdir, mesh=None):
  """Runs config.stages in workdir; returns the report dict (or None).

  Raises train.Preempted after SIGTERM (the stage's state checkpointed).
  """
  t0 = time.time()
  config_validation.validate(
      config, mesh.devices.size if mesh is not None else jax.device_count(),
      jax.process_count())
  if STUDY in config.stages:
    study_lib.check_config(config)
  with workdir_lib.run_lock(workdir):
    return _run_locked(config, workdir, mesh, t0)


def _run_locked(config, workdir, mesh, t0):
  ctx = build_context(config, workdir, mesh)
  workdir_lib.check_before_stages(config, workdir, ctx.data)
  logging.info("Data set %s: categories %s (unseen %s); %d devices.",
               ctx.data.name, ctx.data.categories, ctx.data.unseen,
               ctx.mesh.devices.size)
  summary_path = os.path.join(workdir, "stages.json")
  stages = _load_json(summary_path)
  for stage in ("stage1", "stage2"):
    if stage not in config.stages:
      continue
    if workdir_lib.verify_finished(config, workdir, stage,
                                   ctx.param_shardings) and stage in stages:
      logging.info("%s: final checkpoint exists, skipping.", stage)
      continue
    writer = metrics_lib.MetricWriter(workdir, stage)
    run_fn = train_lib.run_stage1 if stage == "stage1" else \
        train_lib.run_stage2
    result = run_fn(ctx, writer=writer)
    writer.close()
    stages[stage] = {"steps": int(result.steps),
                     "final_loss": float(result.final_loss),
                     "seconds": float(result.seconds),
                     "nonfinite_steps": int(result.nonfinite_steps)}
    _save_json(summary_path, stages)

  if "eval" not in config.stages and STUDY not in config.stages:
    return None
  report = {
      "config_name": config.name,
      "dataset": {"name": ctx.data.name, "categories": ctx.data.seen,
                  "unseen": ctx.data.unseen,
                  "splits": ctx.data.split_counts()},
      "stages": stages,
  }
  for stage in ("stage1", "stage2"):  # Finished stages eval loads.
    if stage not in config.stages:
      workdir_lib.verify_finished(config, workdir, stage, ctx.param_shardings)
  stage1_params = train_lib.load_final_params(ctx, "stage1")
  if stage1_params is None:
    logging.warning("No finished stage 1: evaluating from initialisation.")
    stage1_params = train_lib.init_params(ctx, jax.random.PRNGKey(config.seed))
  test = evaluate.test_arrays(ctx)
  probs = evaluate.prototype_probs(ctx, stage1_params, test["image"])
  report["zero_shot"] = metrics_lib.classification_metrics(
      probs, test["label"], ctx.tables.num_classes)
  stage2_params = train_lib.load_final_params(ctx, "stage2")
  if stage2_params is not None:
    probs = evaluate.prototype_probs(ctx, stage2_params, test["image"])
    report["stage2_eval"] = metrics_lib.classification_metrics(
        probs, test["label"], ctx.tables.num_classes)
  if STUDY in config.stages:
    # The study's grid replaces eval's few-shot runs (a superset of them).
    report.update(study_lib.run(ctx, stage1_params, stage2_params))
  else:
    report["few_shot"] = evaluate.few_shot(
        ctx, stage1_params, test, config.eval.shots, config.eval.seeds,
        config.eval)
  report["timing"] = {"total_seconds": float(time.time() - t0)}
  report_lib.write(workdir, report)
  logging.info("Wrote %s", os.path.join(workdir, "report.json"))
  return report


def enable_compilation_cache(path=None):
  """Persistent XLA cache: repeated runs skip most compilation (minutes on
  a small CPU machine). HICA_COMPILATION_CACHE=off disables it."""
  path = path or os.environ.get(
      "HICA_COMPILATION_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "hica_jax", "xla"))
  if path == "off":
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class _QuietLibraries:
  """Drops INFO chatter of orbax/tfds/grain from the log; warnings stay."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/")

  def filter(self, record):
    return record.levelno >= 30 or not any(
        n in record.pathname for n in self.NOISY)


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  enable_compilation_cache()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  initialize_distributed(_DISTRIBUTED.value)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  try:
    # SIGTERM before or between training loops also ends the run cleanly
    # (multi-process runs leave SIGTERM to JAX's preemption service).
    with (workdir_lib.sigterm_raises(lambda: train_lib.Preempted(
        "Stopped by SIGTERM outside a training loop (nothing new to "
        "save); rerun the same command to resume.")) if
          jax.process_count() == 1 else contextlib.nullcontext()):
      run(config, workdir)
  except train_lib.Preempted as e:
    # A clean exit: the checkpoint is durable and a rerun resumes from it.
    logging.warning("%s", e)


if __name__ == "__main__":
  app.run(main)
