r"""Few-shot inference variants on the same stage-2 params, paired.

  python bench/fewshot_inference.py --family chestxray \
      --data_root ../shared/data/chest_xray --workdir <a finished stage 1> \
      --shots 4,16 --seeds 5 --out /tmp/fewshot_inference.jsonl

For each (K, seed) one HiCA few-shot run (stage 2 on the support set, as the
study's `hica` cell) gives the params; every variant below then classifies
the seen test images from those params, so the differences between variants
are paired on everything but the inference rule:

  text       the prototype classifier of the method (text prototypes c_k);
  tta        the same, each test embedding averaged over 6 views (the image,
             its mirror, four 7/8 corner crops resized back);
  support    nearest support-set mean m_k (normalised stage-2 embeddings);
  fused      prototypes normalise(c_k + m_k);
  pool       c_k refined by soft k-means over the unlabelled train pool
             (labels unused; the support set keeps its labels);
  pool_tta   the refined prototypes with the test-time views.

One JSON line per cell and a summary per (variant, K) with the paired
difference to `text` go to --out and stdout.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import metrics as metrics_lib
from hica_jax import predict
from hica_jax import study
from hica_jax import testing
from hica_jax.data import pipeline
from hica_jax.evaluators import hica


def views(images):
  """f[N,H,W,C] -> list of 6 f[N,H,W,C]: the image, its mirror, 4 corner
  crops of 7/8 the side resized back (bilinear)."""
  n, h, w, c = images.shape
  ch, cw = h * 7 // 8, w * 7 // 8
  out = [images, images[:, :, ::-1]]
  for y0, x0 in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
    crop = jnp.asarray(images[:, y0:y0 + ch, x0:x0 + cw])
    out.append(np.asarray(jax.image.resize(crop, (n, h, w, c), "bilinear")))
  return out


def soft_kmeans(protos, support_emb, support_y, pool_emb, scale, iters):
  """Prototypes f[K,d] refined on the pool: each round assigns the pool
  softly (softmax of s * e.p) and re-estimates every prototype as the
  normalised sum of its labelled support embeddings and weighted pool."""
  k = protos.shape[0]
  onehot = np.eye(k)[support_y]
  for _ in range(iters):
    w = predict.probs_from_embeddings(pool_emb, protos, scale)
    protos = onehot.T @ support_emb + w.T @ pool_emb
    protos = protos / np.linalg.norm(protos, axis=-1, keepdims=True)
  return protos


RULES = ("text", "tta", "support", "fused", "pool", "pool_tta")


def rule_probs(env, params, support, test_views, pool, pool_iters):
  """{rule: f[N_seen, K] probabilities} of every RULES entry from one set
  of stage-2 params. support: the support set's arrays (task labels);
  test_views: views(seen test images); pool: f[P,H,W,C] train-pool images."""
  model, mesh, bs = env.model, env.mesh, env.batch_size

  def emb(images):
    return predict.embed_images(model, params, images, mesh, bs)[0]

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  scale = predict.logit_scale(model, params)
  c = predict.text_prototypes(model, params, env.ctx.tables, mesh, bs)
  g = emb(test_views[0])
  g_tta = unit(np.mean([emb(v) for v in test_views], 0))
  s_emb, s_y = emb(support["image"]), np.asarray(support["label"])
  m = unit(np.stack([s_emb[s_y == j].mean(0) for j in range(len(c))]))
  refined = soft_kmeans(c, s_emb, s_y, emb(pool), scale, pool_iters)
  pf = predict.probs_from_embeddings
  return {"text": pf(g, c, scale), "tta": pf(g_tta, c, scale),
          "support": pf(g, m, scale), "fused": pf(g, unit(c + m), scale),
          "pool": pf(g, refined, scale), "pool_tta": pf(g_tta, refined, scale)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  testing.add_stage1_run_args(parser, shots=(4, 16),
                              data_root_required=False)
  parser.add_argument("--pool_iters", type=int, default=3)
  parser.add_argument("--out", default="/tmp/fewshot_inference.jsonl")
  args = parser.parse_args(argv)

  ctx, env = testing.stage1_env(args.family, args.config_arg, args.data_root,
                                args.workdir)
  test_views = views(env.seen_images)
  source = ctx.data.source("train")
  pool = pipeline.eval_arrays(source, source.indices_of(env.seen_ids),
                              ctx.preprocessor(train=False),
                              desc="train pool")["image"]
  cells = {}
  for k in args.shots:
    for seed in range(args.seeds):
      params = hica.train_variant(env, "hica", k, seed)
      probs = rule_probs(env, params, env.support(k, seed), test_views, pool,
                         args.pool_iters)
      for name, p in probs.items():
        metrics = env.seen_metrics(p)
        cells[(name, k, seed)] = metrics
        testing.emit_json_line(args.out, {
            "variant": name, "K": k, "seed": seed,
            "balanced_accuracy": metrics["balanced_accuracy"],
            "auc": metrics["auc"]})
  for name in RULES[1:]:
    for k in args.shots:
      a = [cells[(name, k, s)] for s in range(args.seeds)]
      b = [cells[("text", k, s)] for s in range(args.seeds)]
      testing.emit_json_line(args.out, {
          "variant": name, "K": k,
          "summary": metrics_lib.summarize([x["balanced_accuracy"]
                                            for x in a]),
          "auc": metrics_lib.summarize([x["auc"] for x in a]),
          "delta_vs_text": study.paired_delta(a, b)["balanced_accuracy"]})
  return cells


if __name__ == "__main__":
  main()
