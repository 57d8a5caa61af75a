"""The study (issue 6): every claim of HiCA on one data set, as cached cells.

  python -m hica_jax.main --config configs/chestxray_fewshot.py:study

main runs it after the eval stage (config arg `study`). The grid
(`config.study`), all methods on the same class-balanced support sets
(train.stage2_indices(ctx, K, seed)):
- few-shot, K in study.shots x study.seeds: zero_shot (stage-1 model, no
  support), hica (stage 2 on the support set from the stage-1 params),
  global_only (the same with the L_l and L_c weights 0: CLIP-style
  contrastive fine-tuning), linear_probe, zs_linear_probe and tip_adapter
  (heads on the frozen stage-1 model), supervised_ce (image tower + linear
  head fine-tuned with cross-entropy, stage 2's optimiser and steps);
- ablations at study.ablation_shots: HiCA from random init (no_stage1) and
  with the L_g, L_l or L_c weight 0; full HiCA is the reference row;
- unseen categories (held out of both stages): every contrastive model also
  classifies the test images of all categories against prototypes of all
  categories (generalised zero-shot);
- descriptor noise: HiCA at K = study.noise_shots with the bank corrupted by
  data/noise.py at study.noise_rates, for training and prototypes;
- interpretability (interpret.py) and efficiency (parameters, step time,
  images/s, eval latency);
- the sweep (study.sweep, at K = study.sweep_shots x `ablation_seeds`):
  HiCA with one set of overrides each (loss weights, temperature, local
  mode, which tower keeps its stage-1 weights), reported as the paired
  difference to HiCA on the same support sets: the investigation of where
  HiCA does or does not beat the baselines.
Each cell is <workdir>/study/cells/<name>-<hash>.json, the hash over the
config fields the cell depends on; finished cells are read back, so an
interrupted study resumes and a changed config recomputes only what it
changes.
"""
import dataclasses
import functools
import hashlib
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from hica_jax import evaluate
from hica_jax import interpret
from hica_jax import metrics as metrics_lib
from hica_jax import sharding
from hica_jax import train as train_lib
from hica_jax.data import noise as noise_lib
from hica_jax.data import pipeline

METHODS = (("zero_shot", "hica", "global_only") + evaluate.FROZEN_HEADS +
           ("supervised_ce",))
ABLATIONS = ("no_stage1", "no_global", "no_local", "no_cross")
# Stage-2 loss weights that each contrastive variant sets to zero.
ZEROED = {"hica": (), "no_stage1": (),
          "global_only": ("local_weight", "cross_weight"),
          "no_global": ("global_weight",), "no_local": ("local_weight",),
          "no_cross": ("cross_weight",)}
# Config fields behind the stage-1 model and the data: every cell's inputs.
BASE_DEPS = ("seed", "data", "tokenizer", "model", "stage1")
# ...and behind a few-shot training run.
TRAIN_DEPS = BASE_DEPS + ("stage2.batch_size", "stage2.optim", "stage2.loss",
                          "stage2.freeze", "stage2.accum_steps", "study.steps",
                          "eval.fewshot_steps", "eval.fewshot_steps_per_shot",
                          "eval.fewshot_min_steps")
# Metrics whose loss under noise the report gives.
DROP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def display_images(images, mean, std):
  """Normalised model inputs f[N, H, W, C] -> f[N, H, W, C] in [0, 1].

  Per-image standardisation (mean None) cannot be undone: min-max per image.
  """
  if mean is None:
    lo = images.min(axis=(1, 2, 3), keepdims=True)
    hi = images.max(axis=(1, 2, 3), keepdims=True)
    return (images - lo) / np.maximum(hi - lo, 1e-6)
  return np.clip(images * np.asarray(std) + np.asarray(mean), 0, 1)


@dataclasses.dataclass
class Cell:
  """One unit of the study: fn(stem) -> JSON-able dict, cached by key."""
  name: str
  fn: object
  deps: tuple
  params: dict

  def key(self, config):
    blob = json.dumps({"deps": {p: config_value(config, p)
                                for p in self.deps}, "cell": self.params},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def config_value(config, path):
  """config field at dotted `path` as plain JSON-able data (None if absent)."""
  value = config
  for part in path.split("."):
    value = value.get(part) if value is not None else None
  return value.to_dict() if hasattr(value, "to_dict") else value


def cell_name(method, k, seed):
  return f"{method}_K{k}_s{seed}"


# Where a sweep variant's few-shot run starts: the stage-1 model, random
# init, or stage 1's weights for one tower (and its projection) only.
SWEEP_INITS = ("stage1", "random", "image_stage1", "text_stage1")


@dataclasses.dataclass(frozen=True)
class SweepVariant:
  """One entry of config.study.sweep, e.g. "cross_weight=1.0,beta=0.0".

  Keys: fields of config.stage2.loss; `logit_scale` (the scale s the
  few-shot run starts from, stage 1's otherwise); `init` (SWEEP_INITS).
  """
  spec: str
  loss: dict
  logit_scale: float | None = None
  init: str = "stage1"

  @property
  def name(self):
    return "sweep[" + re.sub(r"[^A-Za-z0-9_.=,+-]", "_", self.spec) + "]"


def parse_sweep_variant(spec, loss_config):
  """config.study.sweep entry -> SweepVariant; ValueError naming the field
  on a typo, so that a study fails at start, not hours in."""
  loss, logit_scale, init = {}, None, "stage1"
  where = f"config.study.sweep entry {spec!r}"
  for item in filter(None, (x.strip() for x in str(spec).split(","))):
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not value:
      raise ValueError(f"{where}: {item!r} is not key=value.")
    if key == "init":
      if value not in SWEEP_INITS:
        raise ValueError(f"{where}: init must be one of {SWEEP_INITS}.")
      init = value
    elif key == "logit_scale":
      logit_scale = float(value)
      if not 0 < logit_scale <= 100:
        raise ValueError(f"{where}: logit_scale must be in (0, 100].")
    elif key in loss_config:
      old = loss_config[key]
      try:
        if isinstance(old, bool):
          if value.lower() not in ("true", "false"):
            raise ValueError(value)
          loss[key] = value.lower() == "true"
        else:  # an unset placeholder (chunk_size) is an int
          loss[key] = int(value) if old is None else type(old)(value)
      except ValueError as e:
        raise ValueError(f"{where}: {key}={value!r} is not a "
                         f"{type(old).__name__}.") from e
    else:
      raise ValueError(
          f"{where}: unknown key {key!r}; use init, logit_scale or a field "
          f"of config.stage2.loss ({', '.join(sorted(loss_config))}).")
  if not (loss or logit_scale or init != "stage1"):
    raise ValueError(f"{where}: no overrides.")
  return SweepVariant(str(spec), loss, logit_scale, init)


def check_config(config):
  """Fails fast on study settings that would only break later."""
  for spec in config.study.get("sweep", ()):
    parse_sweep_variant(spec, config.stage2.loss)


def _mix_towers(base, other, take):
  """`base` params with the top-level entries `take` from `other` (the
  level holding "image" and "text", under any "params" wrappers)."""
  if "image" in base:
    return {k: (other[k] if k in take else v) for k, v in base.items()}
  return {k: _mix_towers(v, other[k], take) for k, v in base.items()}


def _set_logit_scale(params, scale):
  if "logit_scale" in params:
    return dict(params, logit_scale=jnp.log(jnp.float32(scale)))
  return {k: _set_logit_scale(v, scale) for k, v in params.items()}


def variant_loss(loss_config, variant):
  """Copy of config.stage2.loss with the variant's weights zeroed."""
  out = ml_collections.ConfigDict(loss_config.to_dict())
  for field in ZEROED[variant]:
    out[field] = 0.0
  return out


class Study:
  """The cells of the study and the report sections built from them."""

  def __init__(self, ctx, stage1_params, stage2_params=None):
    self.ctx, self.config, self.sc = ctx, ctx.config, ctx.config.study
    self.stage1, self.stage2 = stage1_params, stage2_params
    self.dir = os.path.join(ctx.workdir, "study", "cells")
    self.categories = list(ctx.data.categories)
    # Index in `categories` of every class of the stage-2 task, in order.
    self.seen_ids = np.asarray(ctx.class_ids(ctx.tables.classes))
    self.unseen_ids = ctx.class_ids(ctx.data.unseen)

  # -- inputs shared by cells (built on first use) -------------------------

  def tables(self, bank, classes):
    ctx = self.ctx
    return pipeline.build_text_tables(bank, classes, ctx.tokenizer,
                                      ctx.model_config.text.max_len,
                                      ctx.config.data.max_phrase_len)

  @functools.cached_property
  def all_tables(self):
    """Descriptors of every category, seen and unseen, in data-set order."""
    return self.tables(self.ctx.data.bank, self.categories)

  @functools.cached_property
  def test(self):
    """Test arrays of every category; labels index `self.categories`."""
    return evaluate.test_arrays(self.ctx, self.all_tables)

  @functools.cached_property
  def seen_rows(self):
    return np.flatnonzero(np.isin(self.test["label"], self.seen_ids))

  @functools.cached_property
  def seen_labels(self):
    """Task labels (index into ctx.tables.classes) of the seen rows."""
    task = {int(c): i for i, c in enumerate(self.seen_ids)}
    return np.asarray([task[int(y)] for y in self.test["label"][
        self.seen_rows]])

  @functools.cached_property
  def frozen(self):
    """Stage-1 embeddings of the seen test images (frozen-model heads)."""
    return evaluate.frozen_embeddings(self.ctx, self.stage1,
                                      self.test["image"][self.seen_rows])

  @functools.cached_property
  def random_init(self):
    """The params stage 1 starts from: the no-stage-1 ablation's init."""
    return train_lib.init_params(self.ctx,
                                 jax.random.PRNGKey(self.config.seed))

  # -- scoring ---------------------------------------------------------------

  def seen_metrics(self, probs):
    """classification_metrics of the seen task from f[N_test, K] seen-task
    probabilities of the seen test rows."""
    return metrics_lib.classification_metrics(probs, self.seen_labels,
                                              len(self.seen_ids))

  def score_all(self, probs_all):
    """Probabilities over all categories of every test image -> the seen
    task's metrics (unseen columns and rows dropped: the renormalised
    softmax over seen prototypes) and, with unseen categories, the
    generalised zero-shot metrics."""
    p = probs_all[self.seen_rows][:, self.seen_ids]
    out = {"metrics": self.seen_metrics(p / p.sum(-1, keepdims=True))}
    if self.unseen_ids:
      out["unseen"] = metrics_lib.generalised_zero_shot_metrics(
          probs_all, self.test["label"], self.unseen_ids)
    return out

  def evaluate_prototypes(self, params, tables=None):
    tables = tables or self.all_tables
    return self.score_all(evaluate.prototype_probs(
        self.ctx, params, self.test["image"], tables))

  # -- cells -----------------------------------------------------------------

  def steps(self, k):
    return evaluate.fewshot_steps(k, self.config.eval, self.sc.steps)

  def train_contrastive(self, variant, k, seed, tables=None):
    """Params after stage 2 of `variant` (a ZEROED key or a SweepVariant)
    on the (K, seed) support set."""
    if isinstance(variant, SweepVariant):
      if variant.init == "stage1":
        init = self.stage1
      elif variant.init == "random":
        init = self.random_init
      else:  # one tower (and its projection) from random init
        other = "text" if variant.init == "image_stage1" else "image"
        init = _mix_towers(self.stage1, self.random_init,
                           (other, f"{other}_proj"))
      if variant.logit_scale is not None:
        init = _set_logit_scale(init, variant.logit_scale)
      loss = ml_collections.ConfigDict(self.config.stage2.loss.to_dict())
      loss.update(variant.loss)
      name = variant.name
    else:
      init = self.random_init if variant == "no_stage1" else self.stage1
      loss, name = variant_loss(self.config.stage2.loss, variant), variant
    support = train_lib.stage2_indices(self.ctx, k, seed)
    result = train_lib.run_stage2_on(
        self.ctx, init, support, self.steps(k), seed, tables=tables,
        loss_config=loss, desc=f"{name} K={k} seed={seed}")
    return result.state.params

  def contrastive_cell(self, variant, k, seed, _):
    return self.evaluate_prototypes(self.train_contrastive(variant, k, seed))

  def frozen_head_cell(self, method, k, seed, _):
    support = evaluate.support_arrays(
        self.ctx, train_lib.stage2_indices(self.ctx, k, seed))
    probs = evaluate.frozen_head_probs(self.ctx, self.stage1, support,
                                       self.frozen, (method,))[method]
    return {"metrics": self.seen_metrics(probs)}

  def supervised_cell(self, k, seed, _):
    probs = evaluate.supervised_ce_probs(
        self.ctx, self.stage1, train_lib.stage2_indices(self.ctx, k, seed),
        self.steps(k), seed, self.test["image"][self.seen_rows])
    return {"metrics": self.seen_metrics(probs)}

  def noise_cell(self, rate, k, seed, _):
    """HiCA trained and evaluated with a corrupted bank (seeded by `seed`);
    `clean_prototypes`: the same model with prototypes of the clean bank."""
    bank = noise_lib.corrupt_bank(self.ctx.data.bank, rate, seed)
    params = self.train_contrastive(
        "hica", k, seed, tables=self.tables(bank, self.ctx.tables.classes))
    g, protos, scale = evaluate.embed_for_prototypes(
        self.ctx, params, self.test["image"],
        self.tables(bank, self.categories))
    out = self.score_all(evaluate.probs_from_embeddings(g, protos, scale))
    clean = evaluate.text_prototypes(self.ctx, params, self.all_tables)
    out["clean_prototypes"] = self.score_all(evaluate.probs_from_embeddings(
        g, clean, scale))["metrics"]
    return out

  def interpretability_cell(self, stem):
    """Pointing game and IoU over the test images with ROIs; the gallery's
    images, masks and maps go to <stem>.npz."""
    ic, test = self.sc.interpret, self.test
    rows = interpret.roi_examples(test)
    if not len(rows):
      return {"n_images": 0}
    images, labels = test["image"][rows], test["label"][rows]
    masks = test["roi_mask"][rows] > 0.5
    fraction = interpret.threshold_fraction(masks, ic.threshold,
                                            ic.top_fraction)
    models = {"stage1": self.stage1}
    if self.stage2 is not None:
      models["stage2"] = self.stage2
    maps = {name: interpret.phrase_patch_maps(
        self.ctx, params, images, test["phrase_ids"][rows],
        test["phrase_mask"][rows]) for name, params in models.items()}
    scores = {name: interpret.score_maps(m, masks, fraction)
              for name, m in maps.items()}
    grid = next(iter(maps.values())).shape[1:]
    scores["random"] = interpret.random_map_scores(
        grid, masks, fraction, ic.random_draws, self.config.seed)
    out = {"n_images": len(rows), "threshold": ic.threshold,
           "top_fraction": float(ic.top_fraction),
           "mean_roi_area": float(masks.mean()), "grid": list(grid),
           "models": {name: interpret.summarize_scores(s, labels,
                                                       self.categories)
                      for name, s in scores.items()}}
    pick = interpret.gallery_rows(labels, ic.gallery)
    shown = display_images(images[pick], self.ctx.mean, self.ctx.std)
    if jax.process_index() == 0:
      np.savez_compressed(
          stem + ".npz", image=(shown * 255).astype(np.uint8),
          mask=masks[pick],
          **{f"map_{n}": interpret.upsample(m[pick], masks.shape[1:]).astype(
              np.float16) for n, m in maps.items()})
    phrases = self.all_tables.phrases
    out["gallery"] = {
        "file": os.path.relpath(stem + ".npz", self.ctx.workdir),
        "categories": [self.categories[int(y)] for y in labels[pick]],
        "phrases": [phrases[int(i)] for i in test["phrase_id"][rows][pick]]}
    return out

  def efficiency_cell(self, _):
    """Parameter counts, stage-2 step time (median over timed steps after
    warm-up, the compiled step shared with the study's HiCA runs), images
    per second, and prototype-classification latency per image."""
    ctx, ec = self.ctx, self.sc.efficiency
    tree = self.stage1.get("params", self.stage1)
    count = lambda t: int(sum(np.size(x) for x in jax.tree.leaves(t)))
    params = {"image": count(tree["image"]), "text": count(tree["text"]),
              "total": count(tree)}
    params["projections_and_scale"] = (params["total"] - params["image"] -
                                       params["text"])
    n = ec.warmup_steps + ec.timed_steps
    state, step_fn, schedule = train_lib.stage2_setup(ctx, self.stage1, n)
    bs = ctx.config.stage2.batch_size
    it = iter(pipeline.train_dataset(
        ctx.data.source("train"),
        train_lib.stage2_indices(ctx, max(self.sc.shots), 0),
        ctx.preprocessor(), bs, n, seed=0))
    desc, times = ctx.desc_arrays(), []
    for step in range(n):
      batch = sharding.shard_batch(next(it), ctx.mesh)
      t0 = time.perf_counter()
      state, m = step_fn(state, batch, desc, np.float32(schedule(step)))
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[ec.warmup_steps:]))

    images = self.test["image"]
    protos = evaluate.text_prototypes(ctx, self.stage1)
    scale = evaluate.logit_scale(ctx, self.stage1)
    image_fn, _ = evaluate.embed_fns(ctx)
    eval_bs = ctx.config.eval.batch_size

    def classify(x, batch_size):
      g, _ = train_lib.batched_apply(image_fn, self.stage1, [x], batch_size,
                                     ctx.mesh)
      return evaluate.probs_from_embeddings(g, protos, scale)

    def timed(fn, reps):
      fn()  # warm-up: compilation of every batch shape
      out = []
      for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
      return float(np.median(out))

    batch_s = timed(lambda: classify(images, eval_bs), 3)
    single_s = timed(lambda: classify(images[:1], 1), 10)
    dev = jax.devices()[0]
    return {
        "params": params,
        "train_step": {"batch_size": bs, "median_seconds": step_s,
                       "images_per_second": bs / step_s,
                       "timed_steps": int(ec.timed_steps),
                       "warmup_steps": int(ec.warmup_steps)},
        "eval": {"batch_size": eval_bs, "images": len(images),
                 "ms_per_image": 1e3 * batch_s / len(images),
                 "ms_single_image": 1e3 * single_s},
        "device": {"platform": dev.platform, "kind": dev.device_kind,
                   "devices": jax.device_count(),
                   "cpu_count": os.cpu_count()}}

  def cells(self):
    """Every cell of the configured grid, each once, cheap ones first."""
    sc, out = self.sc, {}

    def add(name, fn, deps, **params):
      out.setdefault(name, Cell(name, fn, deps, dict(params, name=name)))

    def evaluate_cell(params):
      return lambda _: self.evaluate_prototypes(params)

    def method_cell(method, k, seed):
      name = cell_name(method, k, seed)
      if method in evaluate.FROZEN_HEADS:
        add(name, functools.partial(self.frozen_head_cell, method, k, seed),
            BASE_DEPS, k=k, seed=seed)
      elif method == "supervised_ce":
        add(name, functools.partial(self.supervised_cell, k, seed),
            TRAIN_DEPS, k=k, seed=seed)
      else:
        add(name, functools.partial(self.contrastive_cell, method, k, seed),
            TRAIN_DEPS, k=k, seed=seed, zeroed=ZEROED[method])

    add("zero_shot", evaluate_cell(self.stage1), BASE_DEPS)
    if self.stage2 is not None:
      add("stage2_model", evaluate_cell(self.stage2), BASE_DEPS + ("stage2",))
    seeds = range(sc.seeds)
    for method in sc.methods:
      for k in sc.shots:
        for seed in seeds:
          if method != "zero_shot":
            method_cell(method, k, seed)
    for k in sc.ablation_shots:
      for variant in ("hica",) + tuple(sc.ablations):
        for seed in range(self.ablation_seeds):
          method_cell(variant, k, seed)
    for rate in sc.noise_rates:
      for seed in range(self.ablation_seeds):
        if float(rate) == 0.0:  # the clean bank: HiCA's own cell
          method_cell("hica", sc.noise_shots, seed)
        else:
          add(cell_name(f"noise{float(rate)}", sc.noise_shots, seed),
              functools.partial(self.noise_cell, float(rate),
                                sc.noise_shots, seed),
              TRAIN_DEPS, rate=float(rate), k=sc.noise_shots, seed=seed)
    for variant in self.sweep_variants:
      for seed in range(self.ablation_seeds):
        method_cell("hica", sc.sweep_shots, seed)  # the paired reference
        add(cell_name(variant.name, sc.sweep_shots, seed),
            functools.partial(self.contrastive_cell, variant,
                              sc.sweep_shots, seed),
            TRAIN_DEPS, k=sc.sweep_shots, seed=seed, spec=variant.spec)
    add("interpretability", self.interpretability_cell,
        BASE_DEPS + ("stage2", "study.interpret"))
    add("efficiency", self.efficiency_cell,
        TRAIN_DEPS + ("eval.batch_size", "study.efficiency", "study.shots"))
    return list(out.values())

  # -- running ---------------------------------------------------------------

  def stem(self, cell):
    return os.path.join(self.dir, f"{cell.name}-{cell.key(self.config)}")

  def run(self):
    """Computes the missing cells; returns ({name: result}, counts)."""
    os.makedirs(self.dir, exist_ok=True)
    cells, results, todo = self.cells(), {}, []
    # Which cells are done is decided once, up front, so that every process
    # of a multi-process run computes the same cells in the same order.
    for cell in cells:
      path = self.stem(cell) + ".json"
      if os.path.exists(path):
        with open(path) as f:
          results[cell.name] = json.load(f)["result"]
      else:
        todo.append(cell)
    logging.info("Study: %d cells, %d cached, %d to compute.", len(cells),
                 len(cells) - len(todo), len(todo))
    bar = tqdm(todo, desc="study cells", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    for cell in bar:
      bar.set_postfix_str(cell.name)
      t0 = time.time()
      result = cell.fn(self.stem(cell))
      result["seconds"] = time.time() - t0
      results[cell.name] = result
      if jax.process_index() == 0:
        path = self.stem(cell) + ".json"
        with open(path + ".tmp", "w") as f:
          json.dump({"name": cell.name, "params": cell.params,
                     "result": result}, f, indent=1)
        os.replace(path + ".tmp", path)
    return results, {"cells": len(cells), "computed": len(todo),
                     "cached": len(cells) - len(todo)}

  # -- report sections -------------------------------------------------------

  @property
  def ablation_seeds(self):
    """Seeds of the ablation and noise cells: the first ablation_seeds of
    the few-shot seeds, so their HiCA reference row reuses those cells."""
    return int(min(self.sc.get("ablation_seeds") or self.sc.seeds,
                   self.sc.seeds))

  def runs(self, results, method, k, key="metrics", seeds=None):
    return [results[cell_name(method, k, s)][key]
            for s in range(seeds or self.sc.seeds)]

  def few_shot(self, results):
    """few_shot[K][method] = summarize_runs over seeds (zero_shot: 1 run)."""
    return {str(k): {m: evaluate.summarize_runs(
        [results["zero_shot"]["metrics"]] if m == "zero_shot"
        else self.runs(results, m, k)) for m in self.sc.methods}
            for k in self.sc.shots}

  def ablations(self, results):
    n = self.ablation_seeds
    return {str(k): dict(
        {"full": evaluate.summarize_runs(self.runs(results, "hica", k,
                                                   seeds=n))},
        **{v: evaluate.summarize_runs(self.runs(results, v, k, seeds=n))
           for v in self.sc.ablations}) for k in self.sc.ablation_shots}

  @functools.cached_property
  def sweep_variants(self):
    return [parse_sweep_variant(spec, self.config.stage2.loss)
            for spec in self.sc.get("sweep", ())]

  def sweep(self, results):
    """Each variant's summary and its paired difference to HiCA (same
    support sets and seeds): mean, std and 95% interval of the per-seed
    differences, per metric."""
    if not self.sweep_variants:
      return {}
    k, n = self.sc.sweep_shots, self.ablation_seeds
    ref = self.runs(results, "hica", k, seeds=n)
    out = {"shots": k, "seeds": n,
           "reference": evaluate.summarize_runs(ref), "variants": {}}
    for v in self.sweep_variants:
      runs = self.runs(results, v.name, k, seeds=n)
      out["variants"][v.spec] = dict(
          evaluate.summarize_runs(runs),
          delta={m: metrics_lib.summarize([r[m] - h[m] for r, h in
                                           zip(runs, ref)])
                 for m in DROP_METRICS})
    return out

  def noise(self, results):
    k, rates = self.sc.noise_shots, {}
    for rate in self.sc.noise_rates:
      name = "hica" if float(rate) == 0.0 else f"noise{float(rate)}"
      n = self.ablation_seeds
      noisy = self.runs(results, name, k, seeds=n)
      clean = noisy if name == "hica" else self.runs(results, name, k,
                                                     "clean_prototypes", n)
      rates[str(float(rate))] = {
          "noisy_bank": evaluate.summarize_runs(noisy),
          "clean_prototypes": evaluate.summarize_runs(clean)}
    base = rates.get("0.0")
    for entry in rates.values():
      entry["drop"] = None if base is None else {
          m: base["noisy_bank"][m]["mean"] - entry["noisy_bank"][m]["mean"]
          for m in DROP_METRICS}
    return {"shots": k, "kinds": list(noise_lib.KINDS), "rates": rates}

  def unseen_summary(self, cells):
    """Generalised zero-shot summaries over a list of cell results."""
    runs = [c["unseen"] for c in cells]
    out = {name: metrics_lib.summarize([r[name] for r in runs])
           for name in ("seen_accuracy", "unseen_accuracy", "harmonic_mean",
                        "balanced_accuracy")}
    out["recall"] = {c: metrics_lib.summarize([r["recall"][i] for r in runs])
                     for i, c in enumerate(self.categories)}
    out["seen_task_balanced_accuracy"] = metrics_lib.summarize(
        [c["metrics"]["balanced_accuracy"] for c in cells])
    out["n_seeds"] = len(cells)
    return out

  def unseen(self, results):
    out = {"categories": list(self.ctx.data.unseen),
           "seen": list(self.ctx.tables.classes)}
    if not self.unseen_ids:
      return out
    out["models"] = {"zero_shot": self.unseen_summary([results["zero_shot"]])}
    if "stage2_model" in results:
      out["models"]["stage2"] = self.unseen_summary([results["stage2_model"]])
    contrastive = [m for m in self.sc.methods if m in ZEROED]
    out["few_shot"] = {str(k): {m: self.unseen_summary([
        results[cell_name(m, k, s)] for s in range(self.sc.seeds)])
                                for m in contrastive} for k in self.sc.shots}
    return out

  def efficiency(self, results):
    out = dict(results["efficiency"])
    out.pop("seconds", None)
    kinds = {}
    for name, r in results.items():
      kinds.setdefault(name.split("_K")[0], []).append(r["seconds"])
    out["cell_seconds"] = {kind: {"n": len(s), "mean": float(np.mean(s)),
                                  "total": float(np.sum(s))}
                           for kind, s in sorted(kinds.items())}
    return out

  def sections(self, results, counts):
    sc = self.sc
    interp = dict(results["interpretability"])
    interp.pop("seconds", None)
    return {
        "few_shot": self.few_shot(results),
        "ablations": self.ablations(results),
        "unseen": self.unseen(results),
        "noise": self.noise(results),
        "sweep": self.sweep(results),
        "interpretability": interp,
        "efficiency": self.efficiency(results),
        "study": dict(counts, shots=list(sc.shots), seeds=int(sc.seeds),
                      steps=int(sc.steps), methods=list(sc.methods),
                      ablations=list(sc.ablations),
                      ablation_shots=list(sc.ablation_shots),
                      noise_rates=[float(r) for r in sc.noise_rates],
                      noise_shots=int(sc.noise_shots),
                      sweep=[str(v) for v in sc.get("sweep", ())]),
    }


def run(ctx, stage1_params, stage2_params=None):
  """Runs (or resumes) the study; returns the report sections."""
  study = Study(ctx, stage1_params, stage2_params)
  return study.sections(*study.run())
