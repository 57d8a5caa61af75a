"""Zero-shot and few-shot evaluation.

Zero-shot: p(y=k|x) = softmax_k(s * g(x) . c_k) with text prototypes c_k.
Few-shot: for each K and seed, stage 2 runs on a class-balanced K-shot support
set from the stage-1 model, then the prototype classifier above ("hica"). On
the same support sets, from the frozen stage-1 model: a logistic-regression
probe on image features ("linear_probe"), a probe initialised from the text
prototypes and anchored to them ("zs_linear_probe", CLAP-style), and the
training-free Tip-Adapter cache ("tip_adapter").
"""
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from sklearn.linear_model import LogisticRegression

from hica_jax import losses
from hica_jax import metrics as metrics_lib
from hica_jax import train as train_lib
from hica_jax.data import pipeline


def test_arrays(ctx, tables=None, split="test"):
  """Preprocessed test examples of the task's classes (numpy, no augmentation)."""
  tables = tables or ctx.tables
  source = ctx.data.source(split)
  idx = source.indices_of(ctx.class_ids(tables.classes))
  return pipeline.eval_arrays(source, idx, ctx.preprocessor(tables, False),
                              desc=f"loading {split}")


def embed_for_prototypes(ctx, params, images, tables=None, batch_size=64):
  """(image_emb f[N,d], prototypes f[K,d], logit scale), all normalised."""
  tables = tables or ctx.tables
  image_fn, text_fn = train_lib.make_embed_fns(ctx.model, ctx.mesh)
  g, _ = train_lib.batched_apply(image_fn, params, [images], batch_size,
                                 ctx.mesh)
  d = train_lib.batched_apply(text_fn, params,
                              [tables.desc_ids, tables.desc_mask], batch_size,
                              ctx.mesh)
  protos = np.asarray(losses.category_prototypes(
      jnp.asarray(d), jnp.asarray(tables.desc_category), tables.num_classes))
  scale = float(ctx.model.apply(params, method=ctx.model.get_logit_scale))
  return g, protos, scale


def prototype_probs(ctx, params, images, tables=None, batch_size=64):
  """f[N, K] zero-shot class probabilities from text prototypes."""
  g, protos, scale = embed_for_prototypes(ctx, params, images, tables,
                                          batch_size)
  return np.asarray(jax.nn.softmax(jnp.asarray(scale * g @ protos.T), -1))


def image_features(ctx, params, images, batch_size=64):
  image_fn, _ = train_lib.make_embed_fns(ctx.model, ctx.mesh)
  _, feats = train_lib.batched_apply(image_fn, params, [images], batch_size,
                                     ctx.mesh)
  return feats


def linear_probe_probs(train_feats, train_labels, test_feats, num_classes,
                       c=1.0):
  """Multinomial logistic regression on L2-normalised frozen features."""
  def norm(f):
    return f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
  clf = LogisticRegression(C=c, max_iter=2000)
  clf.fit(norm(train_feats), train_labels)
  probs = np.zeros((len(test_feats), num_classes))
  probs[:, clf.classes_] = clf.predict_proba(norm(test_feats))
  return probs


def tip_adapter_probs(test_emb, support_emb, support_labels, prototypes,
                      scale, num_classes, alpha=1.0, beta=5.5):
  """Training-free Tip-Adapter: zero-shot logits plus a support-set cache.

  logits = s g C^T + alpha exp(-beta (1 - g F^T)) L, with F the normalised
  support embeddings and L their one-hot labels. All embeddings normalised.
  """
  affinity = test_emb @ support_emb.T
  cache = np.exp(-beta * (1.0 - affinity)) @ np.eye(num_classes)[
      support_labels]
  logits = scale * test_emb @ prototypes.T + alpha * scale * cache
  return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def zs_linear_probe_probs(support_emb, support_labels, test_emb, prototypes,
                          scale, steps=300, lr=0.05, anchor=1.0):
  """Linear probe initialised from the text prototypes (ZS-LP / CLAP-style).

  Minimises CE(s g W^T, y) + anchor * ||W - C||^2 from W = C, so with few
  shots the classifier stays near the zero-shot one.
  """
  import optax  # pylint: disable=g-import-not-at-top
  c = jnp.asarray(prototypes)
  x, y = jnp.asarray(support_emb), jnp.asarray(support_labels)

  def loss_fn(w):
    ce = optax.softmax_cross_entropy_with_integer_labels(scale * x @ w.T, y)
    return ce.mean() + anchor * jnp.sum((w - c) ** 2)

  tx = optax.adam(lr)

  @jax.jit
  def fit(w):
    def body(carry, _):
      w, opt = carry
      g = jax.grad(loss_fn)(w)
      upd, opt = tx.update(g, opt)
      return (optax.apply_updates(w, upd), opt), None
    (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
    return w

  w = fit(c)
  return np.asarray(jax.nn.softmax(scale * jnp.asarray(test_emb) @ w.T, -1))


def few_shot(ctx, init_params, test, shots, num_seeds, steps):
  """few_shot[K][method][metric] = {"mean", "std", ...}, "n_seeds"."""
  tables = ctx.tables
  source = ctx.data.source("train")
  support_pre = ctx.preprocessor(tables, train=False)
  test_feats = image_features(ctx, init_params, test["image"])
  test_emb, prototypes, scale = embed_for_prototypes(ctx, init_params,
                                                     test["image"])
  out = {}
  for k in shots:
    per_method = {m: [] for m in ("hica", "linear_probe", "zs_linear_probe",
                                  "tip_adapter")}
    for seed in range(num_seeds):
      support = train_lib.stage2_indices(ctx, k, seed)
      result = train_lib.run_stage2_on(
          ctx, init_params, support, steps, seed,
          desc=f"few-shot K={k} seed={seed}")
      probs = prototype_probs(ctx, result.state.params, test["image"])
      per_method["hica"].append(
          metrics_lib.classification_metrics(probs, test["label"],
                                             tables.num_classes))
      sup = pipeline.eval_arrays(source, support, support_pre,
                                 desc="support")
      probs = {"linear_probe": linear_probe_probs(
          image_features(ctx, init_params, sup["image"]), sup["label"],
          test_feats, tables.num_classes)}
      sup_emb, _, _ = embed_for_prototypes(ctx, init_params, sup["image"])
      probs["zs_linear_probe"] = zs_linear_probe_probs(
          sup_emb, sup["label"], test_emb, prototypes, scale)
      probs["tip_adapter"] = tip_adapter_probs(
          test_emb, sup_emb, sup["label"], prototypes, scale,
          tables.num_classes)
      for method, p in probs.items():
        per_method[method].append(metrics_lib.classification_metrics(
            p, test["label"], tables.num_classes))
      logging.info("few-shot K=%d seed=%d: hica bacc=%.3f probe bacc=%.3f", k,
                   seed, per_method["hica"][-1]["balanced_accuracy"],
                   per_method["linear_probe"][-1]["balanced_accuracy"])
    out[str(k)] = {m: summarize_runs(runs) for m, runs in per_method.items()}
  return out


def summarize_runs(runs):
  """List of metric dicts (one per seed) -> {metric: summary, "n_seeds": n}."""
  out = {name: metrics_lib.summarize([r[name] for r in runs])
         for name in runs[0]}
  out["n_seeds"] = len(runs)
  return out
