"""The stages a run is made of, by name, and the run itself.

  stage1 -> training/stage1.py   domain pretraining (checkpointed)
  stage2 -> training/stage2.py   HiCA alignment on the train split
  eval   -> evaluators/grid.py   zero-shot, stage-2 model, few-shot grid
  study  -> study.py             the eval grid widened, plus ablations,
                                 unseen, noise, sweep, interpretability,
                                 efficiency

The whole config is checked before any work (config_validation.py) and
the workdir is locked for the run. A finished stage is skipped and an
interrupted one resumes from its last checkpoint, both only while the inputs
recorded with it (config fields, data fingerprint, predecessor: workdir.py)
equal the current ones; otherwise the run stops at start naming the
differences (use a new --workdir or --config.restart=<stages>). Evaluation
cells are cached in the workdir, so a rerun rewrites the report from them.
"""
import json
import os
import time

import jax
from absl import logging

from hica_jax import base_config
from hica_jax import config_validation
from hica_jax import context as context_lib
from hica_jax import metrics as metrics_lib
from hica_jax import report as report_lib
from hica_jax import study as study_lib
from hica_jax import workdir as workdir_lib
from hica_jax.evaluators import env as env_lib
from hica_jax.evaluators import grid
from hica_jax.training import stage1
from hica_jax.training import stage2

TRAINING = {"stage1": stage1.run, "stage2": stage2.run}
EVALUATION = ("eval", "study")
NAMES = tuple(TRAINING) + EVALUATION


def check(config, num_devices):
  """Fails fast, listing every bad field, before any work."""
  config_validation.validate(config, num_devices, jax.process_count())
  if "study" in config.stages:
    study_lib.check_config(config)


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


def train(ctx, config):
  """Runs the training stages of config.stages; returns stages.json's dict."""
  summary_path = os.path.join(ctx.workdir, "stages.json")
  stages = _load_json(summary_path)
  for stage, run_fn in TRAINING.items():
    if stage not in config.stages:
      continue
    if workdir_lib.verify_finished(config, ctx.workdir, stage,
                                   ctx.param_shardings) and stage in stages:
      logging.info("%s: final checkpoint exists, skipping.", stage)
      continue
    writer = metrics_lib.MetricWriter(ctx.workdir, stage)
    result = run_fn(ctx, writer=writer)
    writer.close()
    stages[stage] = {"steps": int(result.steps),
                     "final_loss": float(result.final_loss),
                     "seconds": float(result.seconds),
                     "nonfinite_steps": int(result.nonfinite_steps)}
    _save_json(summary_path, stages)
  return stages


def local_term_note(config, data):
  """What stage 2's local term did on this data (a line for the report), or
  None when the training split has ROI masks or the term is off.

  A real build gives an image a local phrase only with its ROI, so without
  masks neither mode has an example to align: 'roi' has no region and
  'attention' no phrase, unless stage2.loss.phrases='class' gives every
  image a phrase of its class.
  """
  loss = config.stage2.loss
  read_summary = getattr(data.builder, "read_summary", None)
  summary = read_summary() if read_summary else None
  if (summary is None or loss.local_weight == 0
      or summary["splits"]["train"]["with_roi"]):
    return None
  if loss.get("phrases", "roi") == "class":
    with_phrases = [c for c in data.seen
                    if data.bank["categories"][c].get("phrases")]
    return ("No training image has an ROI mask; with stage2.loss.phrases="
            "'class' the local term (mode 'attention') aligned the patches "
            "of every image of " + ", ".join(with_phrases) + " with a bank "
            "phrase of its class, the other classes' images taking no part.")
  return ("No training image has an ROI mask (build summary: "
          f"{summary['masks']['mask_files']} mask files), and local phrases "
          "come with ROIs, so the local term (mode "
          f"'{loss.local_mode}') contributed nothing: stage 2 trained the "
          "global and cross terms. Neither local mode can act on this data "
          "set; add masks (BUSI's *_mask.png files) or a manifest with "
          "masks or boxes (README, \"Your own data\").")


def evaluate(ctx, config, stages):
  """The eval stage (and the study): report sections from cached cells."""
  for stage in TRAINING:  # finished stages that the evaluation loads
    if stage not in config.stages:
      workdir_lib.verify_finished(config, ctx.workdir, stage,
                                  ctx.param_shardings)
  stage1_params = context_lib.load_final_params(ctx, "stage1")
  if stage1_params is None:
    logging.warning("No finished stage 1: evaluating from initialisation.")
    stage1_params = context_lib.init_params(ctx,
                                            jax.random.PRNGKey(config.seed))
  env = env_lib.EvalEnv(ctx, stage1_params,
                        context_lib.load_final_params(ctx, "stage2"))
  report = {
      "config_name": config.name,
      "dataset": {"name": ctx.data.name, "categories": ctx.data.seen,
                  "unseen": ctx.data.unseen,
                  "splits": ctx.data.split_counts()},
      "stages": stages,
  }
  note = local_term_note(config, ctx.data)
  if note:
    report["dataset"]["local_term"] = note
  if "eval" in config.stages:
    report.update(grid.evaluate(env, ctx.workdir, config.eval))
  if "study" in config.stages:
    # Shares the eval stage's cells; its few-shot grid is a superset.
    report.update(study_lib.run(env, ctx.workdir))
  return report


def run(config, workdir=None, mesh=None, explicit=()):
  """Runs config.stages in workdir (None: runs/<config.name>); returns the
  report dict (or None).

  explicit: the dotted config fields given on the command line, which keep
  their values when data.root sets the real-image defaults (config.real).
  Raises training.loop.Preempted after SIGTERM (the stage's state
  checkpointed).
  """
  t0 = time.time()
  real_defaults = base_config.resolve_real_defaults(config, explicit)
  if real_defaults:
    logging.info("Real images (data.root): defaults %s (config.real; fields "
                 "given on the command line keep their values).",
                 real_defaults)
  workdir = workdir or os.path.join("runs", config.name)
  check(config, mesh.devices.size if mesh is not None else jax.device_count())
  with workdir_lib.run_lock(workdir):
    return _run_locked(config, workdir, mesh, t0, real_defaults)


def _run_locked(config, workdir, mesh, t0, real_defaults):
  ctx = context_lib.build_context(config, workdir, mesh)
  workdir_lib.check_before_stages(config, workdir, ctx.data)
  logging.info("Data set %s: categories %s (unseen %s); %d devices.",
               ctx.data.name, ctx.data.categories, ctx.data.unseen,
               ctx.mesh.devices.size)
  stages = train(ctx, config)
  if not any(s in config.stages for s in EVALUATION):
    return None
  report = evaluate(ctx, config, stages)
  # The study's fields are set on every real run but act only in a study.
  report["real_defaults"] = {
      k: v for k, v in real_defaults.items()
      if "study" in config.stages or not k.startswith("study.")}
  report["timing"] = {"total_seconds": float(time.time() - t0)}
  report["code"] = workdir_lib.code_provenance(workdir)
  report_lib.write(workdir, report)
  logging.info("Wrote %s", os.path.join(workdir, "report.json"))
  return report
