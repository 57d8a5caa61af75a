"""The study: every claim of HiCA on one data set, as cached cells.

  python -m hica_jax.main --config configs/chestxray_fewshot.py:study

It runs after the eval stage (config arg `study`) on the same cells
(evaluators/grid.py): the few-shot grid is the eval stage's with
study.shots, study.seeds and study.methods, and the study adds only its
extra sections:
- ablations at study.ablation_shots: HiCA from random init (no_stage1) and
  with the L_g, L_l or L_c weight 0; full HiCA is the reference row;
- unseen categories (held out of both stages): every contrastive model also
  classifies the test images of all categories against prototypes of all
  categories (generalised zero-shot);
- descriptor noise: HiCA at K = study.noise_shots with the bank corrupted by
  data/noise.py at study.noise_rates, for training and prototypes;
- the sweep (study.sweep, at K = study.sweep_shots x `ablation_seeds`):
  HiCA with one set of overrides each (loss weights, temperature, local
  mode, which tower keeps its stage-1 weights), reported as the paired
  difference to HiCA on the same support sets;
- interpretability (interpret.py) and efficiency (parameters, step time,
  images/s, eval latency).
"""
import dataclasses
import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hica_jax import interpret
from hica_jax import metrics as metrics_lib
from hica_jax import predict
from hica_jax import sharding
from hica_jax.data import noise as noise_lib
from hica_jax.data import pipeline
from hica_jax.evaluators import grid
from hica_jax.evaluators import hica
from hica_jax.evaluators.env import summarize_runs
from hica_jax.training import stage2

ABLATIONS = ("no_stage1", "no_global", "no_local", "no_cross")
# Metrics whose loss under noise the report gives.
DROP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
cell_name = grid.cell_name
# The baselines HiCA is compared with, seed by seed, in the "versus" section.
VERSUS = ("pixel_probe", "supervised_ce", "global_only", "linear_probe")


def paired_delta(runs, reference):
  """{metric: summary of runs[i][metric] - reference[i][metric]}: the paired
  difference of two methods on the same support sets and seeds."""
  return {m: metrics_lib.summarize([r[m] - h[m] for r, h in
                                    zip(runs, reference)])
          for m in DROP_METRICS}


def display_images(images, mean, std):
  """Normalised model inputs f[N, H, W, C] -> f[N, H, W, C] in [0, 1].

  Per-image standardisation (mean None) cannot be undone: min-max per image.
  """
  if mean is None:
    lo = images.min(axis=(1, 2, 3), keepdims=True)
    hi = images.max(axis=(1, 2, 3), keepdims=True)
    return (images - lo) / np.maximum(hi - lo, 1e-6)
  return np.clip(images * np.asarray(std) + np.asarray(mean), 0, 1)


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


class Study:
  """The study's cells (the few-shot grid plus its own) and its sections."""

  def __init__(self, env):
    self.env, self.ctx, self.config = env, env.ctx, env.config
    self.sc = env.config.study

  @property
  def ablation_seeds(self):
    """Seeds of the ablation, noise and sweep cells: the first
    ablation_seeds of the few-shot seeds, so their HiCA reference row
    reuses those cells."""
    return int(min(self.sc.get("ablation_seeds") or self.sc.seeds,
                   self.sc.seeds))

  @functools.cached_property
  def sweep_variants(self):
    return [parse_sweep_variant(spec, self.config.stage2.loss)
            for spec in self.sc.get("sweep", ())]

  # -- cells -----------------------------------------------------------------

  def sweep_cell(self, variant, k, seed, _):
    """HiCA with the sweep variant's overrides on the (K, seed) support set."""
    env = self.env
    if variant.init == "stage1":
      init = env.stage1
    elif variant.init == "random":
      init = env.random_init
    else:  # one tower (and its projection) from random init
      other = "text" if variant.init == "image_stage1" else "image"
      init = _mix_towers(env.stage1, env.random_init,
                         (other, f"{other}_proj"))
    if variant.logit_scale is not None:
      init = _set_logit_scale(init, variant.logit_scale)
    loss = ml_collections.ConfigDict(self.config.stage2.loss.to_dict())
    loss.update(variant.loss)
    return env.evaluate_prototypes(
        hica.train(env, init, loss, k, seed, name=variant.name,
                   from_stage1=variant.init in ("stage1", "image_stage1")))

  def noise_cell(self, rate, k, seed, _):
    """HiCA trained and evaluated with a corrupted bank (seeded by `seed`);
    `clean_prototypes`: the same model with prototypes of the clean bank."""
    env = self.env
    bank = noise_lib.corrupt_bank(self.ctx.data.bank, rate, seed)
    params = hica.train_variant(
        env, "hica", k, seed, tables=env.tables(bank, self.ctx.tables.classes))
    g, _ = predict.embed_images(env.model, params, env.test["image"],
                                env.mesh, env.batch_size)
    scale = predict.logit_scale(env.model, params)
    protos = predict.text_prototypes(
        env.model, params, env.tables(bank, env.categories), env.mesh,
        env.batch_size)
    out = env.score_all(predict.probs_from_embeddings(g, protos, scale))
    clean = predict.text_prototypes(env.model, params, env.all_tables,
                                    env.mesh, env.batch_size)
    out["clean_prototypes"] = env.score_all(predict.probs_from_embeddings(
        g, clean, scale))["metrics"]
    return out

  def interpretability_cell(self, stem):
    """Pointing game and IoU over the test images with ROIs; the gallery's
    images, masks and maps go to <stem>.npz."""
    env, ic = self.env, self.sc.interpret
    test = env.test
    rows = interpret.roi_examples(test)
    if not len(rows):
      return {"n_images": 0}
    images, labels = test["image"][rows], test["label"][rows]
    masks = test["roi_mask"][rows] > 0.5
    fraction = interpret.threshold_fraction(masks, ic.threshold,
                                            ic.top_fraction)
    models = {"stage1": env.stage1}
    if env.stage2 is not None:
      models["stage2"] = env.stage2
    maps = {name: interpret.phrase_patch_maps(
        env.model, params, images, test["phrase_ids"][rows],
        test["phrase_mask"][rows], self.ctx.model_config.text.max_len,
        env.mesh) for name, params in models.items()}
    scores = {name: interpret.score_maps(m, masks, fraction)
              for name, m in maps.items()}
    grid_shape = next(iter(maps.values())).shape[1:]
    scores["random"] = interpret.random_map_scores(
        grid_shape, masks, fraction, ic.random_draws, self.config.seed)
    out = {"n_images": len(rows), "threshold": ic.threshold,
           "top_fraction": float(ic.top_fraction),
           "mean_roi_area": float(masks.mean()), "grid": list(grid_shape),
           "models": {name: interpret.summarize_scores(s, labels,
                                                       env.categories)
                      for name, s in scores.items()}}
    pick = interpret.gallery_rows(labels, ic.gallery)
    shown = display_images(images[pick], self.ctx.mean, self.ctx.std)
    if jax.process_index() == 0:
      np.savez_compressed(
          stem + ".npz", image=(shown * 255).astype(np.uint8),
          mask=masks[pick],
          **{f"map_{n}": interpret.upsample(m[pick], masks.shape[1:]).astype(
              np.float16) for n, m in maps.items()})
    phrases = env.all_tables.phrases
    out["gallery"] = {
        "file": os.path.relpath(stem + ".npz", self.ctx.workdir),
        "categories": [env.categories[int(y)] for y in labels[pick]],
        "phrases": [phrases[int(i)] for i in test["phrase_id"][rows][pick]]}
    return out

  def efficiency_cell(self, _):
    """Parameter counts, stage-2 step time (median over timed steps after
    warm-up, the compiled step shared with the study's HiCA runs), images
    per second, and prototype-classification latency per image."""
    env, ctx, ec = self.env, self.ctx, self.sc.efficiency
    tree = env.stage1.get("params", env.stage1)
    count = lambda t: int(sum(np.size(x) for x in jax.tree.leaves(t)))
    params = {"image": count(tree["image"]), "text": count(tree["text"]),
              "total": count(tree)}
    params["projections_and_scale"] = (params["total"] - params["image"] -
                                       params["text"])
    n = ec.warmup_steps + ec.timed_steps
    state, step_fn, schedule = stage2.setup(ctx, env.stage1, n)
    bs = ctx.config.stage2.batch_size
    it = iter(pipeline.train_dataset(
        ctx.data.source("train"), env.support_indices(max(self.sc.shots), 0),
        ctx.preprocessor(), bs, n, seed=0))
    desc, times = ctx.desc_arrays(), []
    for step in range(n):
      batch = sharding.shard_batch(next(it), ctx.mesh)
      t0 = time.perf_counter()
      state, m = step_fn(state, batch, desc, np.float32(schedule(step)))
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[ec.warmup_steps:]))

    images = env.test["image"]
    protos = predict.text_prototypes(env.model, env.stage1, ctx.tables,
                                     env.mesh)
    scale = predict.logit_scale(env.model, env.stage1)
    eval_bs = ctx.config.eval.batch_size

    def classify(x, batch_size):
      g, _ = predict.embed_images(env.model, env.stage1, x, env.mesh,
                                  batch_size)
      return predict.probs_from_embeddings(g, protos, scale)

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
    """The few-shot grid's cells, then the study's own, each once."""
    sc, env, n = self.sc, self.env, self.ablation_seeds
    field = "config.study.methods"
    cells = grid.few_shot_cells(env, tuple(sc.methods), tuple(sc.shots),
                                int(sc.seeds), field)

    def hica_cell(variant, k, seed):
      name = cell_name(variant, k, seed)
      return grid.Cell(name, lambda _: hica.cell(env, k, seed, variant),
                       grid.HICA_DEPS, {"name": name, "k": k, "seed": seed})

    for k in sc.ablation_shots:
      for variant in ("hica",) + tuple(sc.ablations):
        cells += [hica_cell(variant, k, s) for s in range(n)]
    for rate in sc.noise_rates:
      for seed in range(n):
        if float(rate) == 0.0:  # the clean bank: HiCA's own cell
          cells.append(hica_cell("hica", sc.noise_shots, seed))
        else:
          name = cell_name(f"noise{float(rate)}", sc.noise_shots, seed)
          cells.append(grid.Cell(
              name, functools.partial(self.noise_cell, float(rate),
                                      sc.noise_shots, seed),
              grid.HICA_DEPS, {"name": name, "rate": float(rate),
                                "k": sc.noise_shots, "seed": seed}))
    for variant in self.sweep_variants:
      for seed in range(n):
        cells.append(hica_cell("hica", sc.sweep_shots, seed))  # reference
        name = cell_name(variant.name, sc.sweep_shots, seed)
        cells.append(grid.Cell(
            name, functools.partial(self.sweep_cell, variant,
                                    sc.sweep_shots, seed),
            grid.HICA_DEPS, {"name": name, "k": sc.sweep_shots,
                              "seed": seed, "spec": variant.spec}))
    cells.append(grid.Cell("interpretability", self.interpretability_cell,
                           grid.BASE_DEPS + ("stage2", "study.interpret"),
                           {"name": "interpretability"}))
    cells.append(grid.Cell(
        "efficiency", self.efficiency_cell,
        grid.TRAIN_DEPS + ("eval.batch_size", "study.efficiency",
                           "study.shots"), {"name": "efficiency"}))
    return grid.unique(cells)

  # -- report sections -------------------------------------------------------

  def runs(self, results, method, k, key="metrics", seeds=None):
    return [results[cell_name(method, k, s)][key]
            for s in range(seeds or self.sc.seeds)]

  def ablations(self, results):
    """Each variant's summary and its paired difference to full HiCA."""
    n, out = self.ablation_seeds, {}
    for k in self.sc.ablation_shots:
      ref = self.runs(results, "hica", k, seeds=n)
      out[str(k)] = {"full": summarize_runs(ref)}
      for v in self.sc.ablations:
        runs = self.runs(results, v, k, seeds=n)
        out[str(k)][v] = dict(summarize_runs(runs),
                              delta=paired_delta(runs, ref))
    return out

  def versus(self, results):
    """HiCA minus each baseline on the same support sets, per K: the
    paired difference over the grid's seeds (mean, std, 95% interval)."""
    baselines = [m for m in VERSUS if m in self.sc.methods]
    if "hica" not in self.sc.methods or not baselines:
      return {}
    out = {}
    for k in self.sc.shots:
      hica = self.runs(results, "hica", k)
      out[str(k)] = {b: paired_delta(hica, self.runs(results, b, k))
                     for b in baselines}
    return out

  def probe_floor(self, results):
    """The frozen stage-1 features against the raw pixels: the linear
    probe minus the pixel floor on the same support sets, per K."""
    if not {"linear_probe", "pixel_probe"} <= set(self.sc.methods):
      return {}
    return {str(k): paired_delta(self.runs(results, "linear_probe", k),
                                 self.runs(results, "pixel_probe", k))
            for k in self.sc.shots}

  def sweep(self, results):
    """Each variant's summary and its paired difference to HiCA (same
    support sets and seeds): mean, std and 95% interval of the per-seed
    differences, per metric."""
    if not self.sweep_variants:
      return {}
    k, n = self.sc.sweep_shots, self.ablation_seeds
    ref = self.runs(results, "hica", k, seeds=n)
    out = {"shots": k, "seeds": n, "reference": summarize_runs(ref),
           "variants": {}}
    for v in self.sweep_variants:
      runs = self.runs(results, v.name, k, seeds=n)
      out["variants"][v.spec] = dict(summarize_runs(runs),
                                     delta=paired_delta(runs, ref))
    return out

  def noise(self, results):
    k, rates, n = self.sc.noise_shots, {}, self.ablation_seeds
    for rate in self.sc.noise_rates:
      name = "hica" if float(rate) == 0.0 else f"noise{float(rate)}"
      noisy = self.runs(results, name, k, seeds=n)
      clean = noisy if name == "hica" else self.runs(results, name, k,
                                                     "clean_prototypes", n)
      rates[str(float(rate))] = {"noisy_bank": summarize_runs(noisy),
                                 "clean_prototypes": summarize_runs(clean)}
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
                     for i, c in enumerate(self.env.categories)}
    out["seen_task_balanced_accuracy"] = metrics_lib.summarize(
        [c["metrics"]["balanced_accuracy"] for c in cells])
    out["n_seeds"] = len(cells)
    return out

  def unseen(self, results):
    out = {"categories": list(self.ctx.data.unseen),
           "seen": list(self.ctx.tables.classes)}
    if not self.env.unseen_ids:
      return out
    out["models"] = {"zero_shot": self.unseen_summary([results["zero_shot"]])}
    if "stage2_model" in results:
      out["models"]["stage2"] = self.unseen_summary([results["stage2_model"]])
    contrastive = [m for m in self.sc.methods if m in hica.ZEROED]
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
        "few_shot": grid.few_shot_summary(results, tuple(sc.methods),
                                          tuple(sc.shots), int(sc.seeds)),
        "ablations": self.ablations(results),
        "versus": self.versus(results),
        "probe_floor": self.probe_floor(results),
        "unseen": self.unseen(results),
        "noise": self.noise(results),
        "sweep": self.sweep(results),
        "interpretability": interp,
        "efficiency": self.efficiency(results),
        "study": dict(counts, shots=list(sc.shots), seeds=int(sc.seeds),
                      steps=int(self.config.eval.fewshot_steps),
                      methods=list(sc.methods),
                      ablations=list(sc.ablations),
                      ablation_shots=list(sc.ablation_shots),
                      noise_rates=[float(r) for r in sc.noise_rates],
                      noise_shots=int(sc.noise_shots),
                      sweep=[str(v) for v in sc.get("sweep", ())]),
    }


def run(env, workdir):
  """Runs (or resumes) the study on env's models; returns report sections."""
  study = Study(env)
  return study.sections(*grid.run(study.cells(), workdir, env.config))
