r"""The frozen stage-1 image tower read out in other ways than its pool,
each through the linear probe, paired to the probe on the pool.

  python bench/feature_readout.py --family chestxray \
      --data_root ../shared/data/chest_xray --workdir runs/chestxray_fewshot_real \
      --shots 1,4,16 --seeds 5 --out results/feature_readout/kermany

The question it answers: is the linear readout of the tower's pooled
features what keeps the few-shot figures down, or the features themselves?
The pixel floor keeps the image's layout (32x32 positions) where a pool
discards it, and a conv tower's early stages keep more of the pixels than
its last. Readouts, all from the finished stage 1 of --workdir (a run of
the README command with the same --data_root):

  pooled      the tower's own pool (what the linear probe reads)
  gmp         the maximum of the LayerNorm-ed tokens over positions
  grid2/grid4 the mean tokens of each cell of a 2x2 / 4x4 grid, concatenated
  pooled+gmp  the two side by side
  pooled+pix  the pool beside the pixel floor's 32x32 pixels
  stages      ResNet towers only: the mean over positions of every stage's
              output, concatenated (earliest first; the last is the
              tower's `hidden`)

Each readout is standardised by its mean and std over the unlabelled train
pool and L2-normalised, as the linear probe does (`linear_probe_probs`), so
`pooled` equals the probe's own cells. The pool is also read by the probe
in other forms (PROBE_FORMS), to say which of the probe's ingredients its
lead over HiCA's prototype classifier (linear in the features, without an
intercept) comes from:

  pooled:no_intercept      standardised, without an intercept
  pooled:raw               not standardised (L2-normalised only)
  pooled:raw,no_intercept  neither
  pooled:support_centred,no_intercept
                           standardised with the support set's mean in
                           place of the pool's, without an intercept: a
                           classifier through the support set's centre

and once with the unlabelled pool as well as the support set
(`pooled:pool_spreading`, pool_spreading_probs): the pool labelled by
label spreading over a k-NN graph of the standardised features, seeded by
the support set's labels, then the probe fitted on support and pool: can
the images stage 1 trained on stand in for labels at few-shot time?

One JSON line per (K, seed) with every readout's balanced accuracy and the floor's goes to <out>.jsonl;
<out>.json and <out>.md hold the paired differences against `pooled`.
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.semi_supervised import LabelSpreading

from hica_jax import metrics as metrics_lib
from hica_jax import study
from hica_jax import testing
from hica_jax.evaluators import env as env_lib
from hica_jax.evaluators import linear_probe
from hica_jax.evaluators import pixel_probe
from hica_jax.models import hica_model
from hica_jax.models.vit import activation


# Probe forms of the pooled features: name -> (standardised, intercept,
# centred at the support set's mean instead of the pool's).
PROBE_FORMS = {"pooled:no_intercept": (True, False, False),
               "pooled:raw": (False, True, False),
               "pooled:raw,no_intercept": (False, False, False),
               "pooled:support_centred,no_intercept": (True, False, True)}


def probe_form_probs(form, sup_feats, sup_labels, test_feats, num_classes,
                     pool_stats):
  """f[N_test, K]: the linear probe in PROBE_FORMS' `form` fitted on the
  support set's features f[S, w] and applied to test_feats f[N_test, w];
  pool_stats = (mean f[w], std f[w]) of the unlabelled pool."""
  standardised, intercept, support_centred = PROBE_FORMS[form]
  stats = pool_stats if standardised else None
  if support_centred:
    stats = (sup_feats.mean(0), pool_stats[1])
  return linear_probe.linear_probe_probs(sup_feats, sup_labels, test_feats,
                                         num_classes, stats=stats,
                                         fit_intercept=intercept)


def pool_spreading_probs(sup_feats, sup_labels, pool_feats, test_feats,
                         num_classes, stats, neighbours=10):
  """f[N_test, K]: the linear probe fitted on the support set f[S, w] and the
  unlabelled pool f[P, w], the pool labelled by label spreading (sklearn's
  k-NN LabelSpreading, alpha 0.8) from the support labels, on the probe's
  inputs (probe_inputs with `stats`). Pool images the spreading does not
  reach (no label mass: sklearn's transduction would call them class 0)
  are left out; on Kermany's pool it reaches every image."""
  x = linear_probe.probe_inputs(np.concatenate([sup_feats, pool_feats]),
                                stats)
  seeds = np.concatenate([sup_labels, np.full(len(pool_feats), -1)])
  spread = LabelSpreading(kernel="knn", n_neighbors=neighbours, alpha=0.8,
                          max_iter=100).fit(x, seeds)
  n = len(sup_feats)
  reached = spread.label_distributions_[n:].sum(1) > 0
  return linear_probe.linear_probe_probs(
      np.concatenate([sup_feats, pool_feats[reached]]),
      np.concatenate([sup_labels, spread.transduction_[n:][reached]]),
      test_feats, num_classes, stats=stats)


def grid_means(tokens, cells):
  """f[B, N, W] tokens on a square grid -> f[B, cells*cells*W]: the mean
  token of each cell of a cells x cells grid, row-major."""
  b, n, w = tokens.shape
  side = int(round(np.sqrt(n)))
  if side * side != n or side % cells:
    raise ValueError(f"{n} tokens do not form a square grid divisible "
                     f"into {cells}x{cells} cells")
  x = tokens.reshape(b, cells, side // cells, cells, side // cells, w)
  return x.mean((2, 4)).reshape(b, cells * cells * w)


def resnet_stage_means(tower, intermediates):
  """[f[B, w_i]]: the mean over positions of the output of every stage of a
  ResNet tower (its last block's, or the activated downsampling norm's
  where a stage has no block), earliest first, from the `intermediates` of
  an apply with capture_intermediates=True."""
  inter = intermediates
  act = activation(tower.act)
  means = []
  for i in range(int(np.log2(tower.patch_size))):
    blocks = sorted((k for k in inter if k.startswith(f"stage_{i}_block_")),
                    key=lambda k: int(k.rsplit("_", 1)[1]))
    x = (inter[blocks[-1]]["__call__"][0] if blocks
         else act(inter[f"down_norm_{i}"]["__call__"][0]))
    means.append(x.mean((1, 2)))
  return means


def readout_fn(ctx, image_params):
  """A jitted images f[B, H, W, C] -> {readout: f[B, d]} of the tower."""
  tower = hica_model.image_tower(hica_model.image_tower_kwargs(
      ctx.config.model))
  is_resnet = ctx.model_config.image.get("arch", "vit") == "resnet"

  @jax.jit
  def fn(images):
    out, state = tower.apply({"params": image_params}, images,
                             capture_intermediates=is_resnet,
                             mutable=["intermediates"])
    tokens = out["tokens"]
    feats = {"pooled": out["pooled"], "gmp": tokens.max(1),
             "grid2": grid_means(tokens, 2), "grid4": grid_means(tokens, 4)}
    if is_resnet:
      feats["stages"] = jnp.concatenate(
          resnet_stage_means(tower, state["intermediates"]), -1)
    return feats
  return fn


def readouts(fn, images, pixel_size, batch_size=128):
  """{readout: f[N, d]} of images f[N, H, W, C], the combined ones too."""
  parts = [jax.device_get(fn(jnp.asarray(images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
  feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  feats["pooled+gmp"] = np.concatenate([feats["pooled"], feats["gmp"]], -1)
  feats["pooled+pix"] = np.concatenate(
      [feats["pooled"], pixel_probe.pixel_features(images, pixel_size)], -1)
  return feats


def markdown(rows, names):
  lines = ["| readout | K | balanced accuracy | minus `pooled` (95% interval) |",
           "|---|---|---|---|"]
  for r in rows:
    if r["readout"] not in names:
      continue
    d = r["delta"]
    lines.append(f"| {r['readout']} | {r['k']} | {r['mean']:.3f} | "
                 f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  testing.add_stage1_run_args(parser, shots=(1, 4, 16))
  parser.add_argument("--out", required=True,
                      help="path stem: <out>.jsonl, <out>.json, <out>.md")
  args = parser.parse_args(argv)
  ctx, env = testing.stage1_env(args.family, args.config_arg, args.data_root,
                                args.workdir)
  fn = readout_fn(ctx, env.stage1["params"]["image"])
  size = int(ctx.config.eval.pixel_size)
  pool = readouts(fn, env.pool_images(), size)
  stats = {k: env_lib.EvalEnv.feature_stats(v) for k, v in pool.items()}
  test = readouts(fn, env.seen_images, size)
  names = (list(test) + list(PROBE_FORMS) + ["pooled:pool_spreading",
                                             "floor"])
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  if os.path.exists(args.out + ".jsonl"):
    os.remove(args.out + ".jsonl")
  cells = {}
  for k in args.shots:
    for seed in range(args.seeds):
      support = env.support(k, seed)
      sup = readouts(fn, support["image"], size)
      row = {}
      for name in sup:
        probs = linear_probe.linear_probe_probs(
            sup[name], support["label"], test[name], env.num_classes,
            stats=stats[name])
        row[name] = env.seen_metrics(probs)
      for name in PROBE_FORMS:
        row[name] = env.seen_metrics(probe_form_probs(
            name, sup["pooled"], support["label"], test["pooled"],
            env.num_classes, stats["pooled"]))
      row["pooled:pool_spreading"] = env.seen_metrics(pool_spreading_probs(
          sup["pooled"], support["label"], pool["pooled"], test["pooled"],
          env.num_classes, stats["pooled"]))
      row["floor"] = env.seen_metrics(pixel_probe.pixel_probe_probs(
          support["image"], support["label"], env.seen_images,
          env.num_classes, size))
      cells[(k, seed)] = row
      testing.emit_json_line(args.out + ".jsonl", {
          "K": k, "seed": seed,
          **{n: m["balanced_accuracy"] for n, m in row.items()}})
  rows = []
  for k in args.shots:
    ref = [cells[(k, s)]["pooled"] for s in range(args.seeds)]
    for name in names:
      runs = [cells[(k, s)][name] for s in range(args.seeds)]
      rows.append(dict(
          readout=name, k=k,
          mean=metrics_lib.summarize(
              [r["balanced_accuracy"] for r in runs])["mean"],
          delta=study.paired_delta(runs, ref)["balanced_accuracy"]))
  data = {"workdir": args.workdir, "data_root": args.data_root,
          "shots": args.shots, "seeds": args.seeds, "rows": rows}
  testing.write_report(os.path.dirname(args.out) or ".",
                       os.path.basename(args.out), data,
                       markdown(rows, names))
  return data


if __name__ == "__main__":
  main()
