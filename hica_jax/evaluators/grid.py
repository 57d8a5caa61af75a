"""Cached evaluation cells: methods x K x seeds, and anything else a study
adds. Each cell is <workdir>/cells/<name>-<hash>.json, the hash over the
config fields the cell depends on; finished cells are read back, so an
interrupted evaluation resumes, a rerun rewrites its report in seconds, and a
changed config recomputes only what it changes.
"""
import dataclasses
import hashlib
import json
import os
import time

import jax
from absl import logging
from tqdm import tqdm

from hica_jax import base_config
from hica_jax import evaluators
from hica_jax.evaluators import env as env_lib
from hica_jax.evaluators import linear_probe
from hica_jax.evaluators import pixel_probe

# Config fields behind the stage-1 model and the data: every model cell's.
BASE_DEPS = ("seed", "data", "tokenizer", "model", "stage1")
# ...and the test-time crops of the readouts fitted on frozen features.
PROBE_DEPS = BASE_DEPS + ("eval.probe_crops",)
# ...and behind a few-shot training run (the one step rule included).
TRAIN_DEPS = BASE_DEPS + ("stage2.batch_size", "stage2.optim", "stage2.loss",
                          "stage2.freeze", "stage2.freeze_for",
                          "stage2.thaw_lr_scale", "stage2.accum_steps",
                          "eval.fewshot_steps", "eval.fewshot_steps_per_shot",
                          "eval.fewshot_min_steps")
# ...and behind a run of HiCA's objective (hica, global_only, ablations,
# noise and sweep cells), which adds eval.hica_freeze to stage2.freeze,
# normalises the tower's features by eval.hica_feature_norm, starts
# image_proj by eval.hica_proj_init and holds eval.hica_logit_scale.
HICA_DEPS = TRAIN_DEPS + ("eval.hica_freeze", "eval.hica_feature_norm",
                          "eval.hica_proj_init", "eval.hica_logit_scale")
# The pixel floor reads only the preprocessed images of the data.
PIXEL_DEPS = ("seed", "data", "model.init", "model.image_init",
              "eval.pixel_size")
DEPS = {"model": BASE_DEPS, "probe": PROBE_DEPS, "train": TRAIN_DEPS,
        "hica": HICA_DEPS, "pixels": PIXEL_DEPS}


def config_value(config, path):
  """config field at dotted `path` as plain JSON-able data (None if absent)."""
  value = config
  for part in path.split("."):
    value = value.get(part) if value is not None else None
  return value.to_dict() if hasattr(value, "to_dict") else value


@dataclasses.dataclass
class Cell:
  """One unit of evaluation: fn(stem) -> JSON-able dict, cached by key."""
  name: str
  fn: object
  deps: tuple
  params: dict

  def key(self, config):
    deps = {p: config_value(config, p) for p in self.deps}
    # A dep that is itself an added field counts as absent at its neutral
    # value, as in a config that predates it.
    deps = {p: v for p, v in deps.items()
            if not (p in base_config.NEUTRAL_ADDED_FIELDS
                    and (v is None or base_config.is_neutral(p, v)))}
    blob = json.dumps({"deps": {p: base_config.drop_neutral(p, v)
                                for p, v in deps.items()},
                       "cell": self.params},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cell_name(method, k, seed):
  return f"{method}_K{k}_s{seed}"


def method_cell(env, method, k, seed, field="config.eval.methods"):
  """The cell of one evaluator on the (K, seed) support set."""
  ev = evaluators.get(method, field)
  if method == "zero_shot":
    return Cell("zero_shot", lambda _: ev.cell(env), BASE_DEPS,
                {"name": "zero_shot"})
  name = cell_name(method, k, seed)
  params = {"name": name, "k": k, "seed": seed}
  if ev.revision > 1:
    params["revision"] = ev.revision
  return Cell(name, lambda _: ev.cell(env, k, seed), DEPS[ev.depends_on],
              params)


# The few-shot methods that also run once on every label of the train pool
# (cell "<method>_all"): what the frozen features, and the raw pixels, reach
# with all labels, beside the stage-2 model trained on them.
ALL_LABELS = {"linear_probe": (linear_probe.all_labels_cell, PROBE_DEPS),
              "pixel_probe": (pixel_probe.all_labels_cell, PIXEL_DEPS)}


def few_shot_cells(env, methods, shots, seeds, field="config.eval.methods"):
  """zero_shot, stage2_model (when a stage-2 model exists), the ALL_LABELS
  cells of `methods` and every method x K x seed cell."""
  cells = [method_cell(env, "zero_shot", None, None)]
  if env.stage2 is not None:
    cells.append(Cell("stage2_model",
                      lambda _: env.evaluate_prototypes(env.stage2),
                      BASE_DEPS + ("stage2",), {"name": "stage2_model"}))
  for m in methods:
    if m in ALL_LABELS:
      fn, deps = ALL_LABELS[m]
      # revision 2: C cross-validated on the labels (was C=1).
      cells.append(Cell(f"{m}_all", lambda _, fn=fn: fn(env), deps,
                        {"name": f"{m}_all", "revision": 2}))
  cells += [method_cell(env, m, k, s, field) for m in methods
            if m != "zero_shot" for k in shots for s in range(seeds)]
  return cells


def few_shot_summary(results, methods, shots, seeds):
  """few_shot[K][method] = summarize_runs over seeds (zero_shot: 1 run)."""
  def runs(m, k):
    if m == "zero_shot":
      return [results["zero_shot"]["metrics"]]
    return [results[cell_name(m, k, s)]["metrics"] for s in range(seeds)]
  return {str(k): {m: env_lib.summarize_runs(runs(m, k)) for m in methods}
          for k in shots}


def unique(cells):
  """Cells by name, first occurrence kept, order kept."""
  return list({c.name: c for c in reversed(cells)}.values())[::-1]


def run(cells, workdir, config):
  """Computes the missing cells; returns ({name: result}, counts)."""
  cell_dir = os.path.join(workdir, "cells")
  os.makedirs(cell_dir, exist_ok=True)
  stem = lambda c: os.path.join(cell_dir, f"{c.name}-{c.key(config)}")
  results, todo = {}, []
  # Which cells are done is decided once, up front, so that every process
  # of a multi-process run computes the same cells in the same order.
  for cell in cells:
    path = stem(cell) + ".json"
    if os.path.exists(path):
      with open(path) as f:
        results[cell.name] = json.load(f)["result"]
    else:
      todo.append(cell)
  logging.info("Evaluation: %d cells, %d cached, %d to compute.", len(cells),
               len(cells) - len(todo), len(todo))
  bar = tqdm(todo, desc="evaluation cells", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  for cell in bar:
    bar.set_postfix_str(cell.name)
    t0 = time.time()
    result = cell.fn(stem(cell))
    result["seconds"] = time.time() - t0
    results[cell.name] = result
    if jax.process_index() == 0:
      path = stem(cell) + ".json"
      with open(path + ".tmp", "w") as f:
        json.dump({"name": cell.name, "params": cell.params,
                   "result": result}, f, indent=1)
      os.replace(path + ".tmp", path)
  return results, {"cells": len(cells), "computed": len(todo),
                   "cached": len(cells) - len(todo)}


def evaluate(env, workdir, eval_config):
  """The eval stage: zero-shot, the stage-2 model and the few-shot grid of
  eval.methods x eval.shots x eval.seeds. Returns report sections."""
  methods, shots, seeds = (tuple(eval_config.methods),
                           tuple(eval_config.shots), int(eval_config.seeds))
  results, counts = run(few_shot_cells(env, methods, shots, seeds), workdir,
                        env.config)
  out = {"zero_shot": results["zero_shot"]["metrics"],
         "few_shot": few_shot_summary(results, methods, shots, seeds),
         "evaluation": counts}
  if "stage2_model" in results:
    out["stage2_eval"] = results["stage2_model"]["metrics"]
  out["all_labels"] = all_labels_section(env, results)
  return out


def all_labels_section(env, results):
  """{"stage2_model" | method: {"metrics", "n_train"}}: the classifiers
  trained on the train split's labels (stage 2 on config.stage2.shots per
  class; None: all)."""
  out = {}
  if "stage2_model" in results:
    s2 = env.config.stage2
    out["stage2_model"] = {
        "metrics": results["stage2_model"]["metrics"],
        "n_train": int(len(env.ctx.support_indices(s2.get("shots"),
                                                   env.config.seed)))}
  for m in ALL_LABELS:
    if f"{m}_all" in results:
      out[m] = {k: results[f"{m}_all"][k] for k in ("metrics", "n_train",
                                                    "c")}
  return out
