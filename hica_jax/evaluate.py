"""Zero-shot and few-shot evaluation.

Zero-shot: p(y=k|x) = softmax_k(s * g(x) . c_k) with text prototypes c_k.
Few-shot: for each K and seed, stage 2 runs on a class-balanced K-shot support
set from the stage-1 model, then the prototype classifier above ("hica"). On
the same support sets, from the frozen stage-1 model: a logistic-regression
probe on image features ("linear_probe"), a probe initialised from the text
prototypes and anchored to them ("zs_linear_probe", CLAP-style), and the
training-free Tip-Adapter cache ("tip_adapter"); and, for the study, the
image tower with a linear head fine-tuned by cross-entropy
("supervised_ce").
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


def embed_fns(ctx):
  """The jitted (image_fn, text_fn) of train.make_embed_fns, made once per
  context: a study evaluates hundreds of times and should not re-trace."""
  if "embed_fns" not in ctx.step_cache:
    ctx.step_cache["embed_fns"] = train_lib.make_embed_fns(ctx.model,
                                                           ctx.mesh)
  return ctx.step_cache["embed_fns"]


def logit_scale(ctx, params):
  return float(ctx.model.apply(params, method=ctx.model.get_logit_scale))


def text_prototypes(ctx, params, tables=None, batch_size=64):
  """f[K, d] normalised class prototypes from the descriptors of `tables`."""
  tables = tables or ctx.tables
  _, text_fn = embed_fns(ctx)
  d = train_lib.batched_apply(text_fn, params,
                              [tables.desc_ids, tables.desc_mask], batch_size,
                              ctx.mesh)
  return np.asarray(losses.category_prototypes(
      jnp.asarray(d), jnp.asarray(tables.desc_category), tables.num_classes))


def embed_for_prototypes(ctx, params, images, tables=None, batch_size=64):
  """(image_emb f[N,d], prototypes f[K,d], logit scale), all normalised."""
  image_fn, _ = embed_fns(ctx)
  g, _ = train_lib.batched_apply(image_fn, params, [images], batch_size,
                                 ctx.mesh)
  return g, text_prototypes(ctx, params, tables, batch_size), logit_scale(
      ctx, params)


def probs_from_embeddings(image_emb, prototypes, scale):
  """f[N, K] = softmax_k(s * g . c_k) of normalised embeddings."""
  return np.asarray(jax.nn.softmax(
      jnp.asarray(scale * image_emb @ prototypes.T), -1))


def prototype_probs(ctx, params, images, tables=None, batch_size=64):
  """f[N, K] zero-shot class probabilities from text prototypes."""
  return probs_from_embeddings(*embed_for_prototypes(ctx, params, images,
                                                     tables, batch_size))


def image_features(ctx, params, images, batch_size=64):
  image_fn, _ = embed_fns(ctx)
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


# Heads on the frozen (stage-1) model, fitted on a support set.
FROZEN_HEADS = ("linear_probe", "zs_linear_probe", "tip_adapter")


def frozen_embeddings(ctx, params, images, batch_size=64):
  """What the frozen-model heads need of `images` f[N,H,W,3]: pooled
  features `feats` f[N,w], normalised embeddings `emb` f[N,d], the text
  `prototypes` f[K,d] and the logit `scale`."""
  image_fn, _ = embed_fns(ctx)
  emb, feats = train_lib.batched_apply(image_fn, params, [images],
                                       batch_size, ctx.mesh)
  return {"feats": feats, "emb": emb,
          "prototypes": text_prototypes(ctx, params, batch_size=batch_size),
          "scale": logit_scale(ctx, params)}


def support_arrays(ctx, indices):
  """Preprocessed support records of the train split (no augmentation)."""
  return pipeline.eval_arrays(ctx.data.source("train"), indices,
                              ctx.preprocessor(train=False), desc="support")


def frozen_head_probs(ctx, params, support, test, methods=FROZEN_HEADS):
  """{method: f[N,K] test probabilities} of heads fitted on the support set.

  support: support_arrays(...); test: frozen_embeddings(...) of the test
  images, both from the same frozen `params`.
  """
  num_classes = ctx.tables.num_classes
  sup = frozen_embeddings(ctx, params, support["image"])
  labels = support["label"]
  heads = {
      "linear_probe": lambda: linear_probe_probs(
          sup["feats"], labels, test["feats"], num_classes),
      "zs_linear_probe": lambda: zs_linear_probe_probs(
          sup["emb"], labels, test["emb"], test["prototypes"], test["scale"]),
      "tip_adapter": lambda: tip_adapter_probs(
          test["emb"], sup["emb"], labels, test["prototypes"], test["scale"],
          num_classes),
  }
  return {m: heads[m]() for m in methods}


def supervised_ce_probs(ctx, init_params, indices, steps, seed, images,
                        batch_size=64):
  """f[N,K]: the image tower and a linear head fine-tuned with cross-entropy
  on the support records (train.run_supervised_ce), applied to `images`."""
  result = train_lib.run_supervised_ce(
      ctx, init_params, indices, steps, seed,
      desc=f"supervised_ce n={len(indices)} seed={seed}")
  if "supervised_probs" not in ctx.step_cache:
    ctx.step_cache["supervised_probs"] = jax.jit(lambda p, x: jax.nn.softmax(
        train_lib.supervised_logits(ctx.model, p, x), -1))
  return train_lib.batched_apply(ctx.step_cache["supervised_probs"],
                                 result.state.params, [images], batch_size,
                                 ctx.mesh)


def fewshot_steps(shots, eval_config, cap=None):
  """Stage-2 steps of a few-shot run on a K-shot support set.

  steps_per_shot * K within [min_steps, cap or eval.fewshot_steps]: about the
  same number of passes over every support set, so K=1 (one example per
  class) is not trained as long as K=16 (synthetic busi K=16 from scratch:
  0.53 balanced accuracy at 150 steps, 0.60 at 300).
  """
  cap = eval_config.fewshot_steps if cap is None else cap
  per_shot = eval_config.get("fewshot_steps_per_shot", 0)
  if not per_shot:
    return int(cap)
  return int(min(cap, max(eval_config.get("fewshot_min_steps", 1),
                          per_shot * shots)))


def few_shot(ctx, init_params, test, shots, num_seeds, eval_config):
  """few_shot[K][method][metric] = {"mean", "std", ...}, "n_seeds"."""
  tables = ctx.tables
  frozen = frozen_embeddings(ctx, init_params, test["image"])
  out = {}
  for k in shots:
    per_method = {m: [] for m in ("hica",) + FROZEN_HEADS}
    for seed in range(num_seeds):
      support = train_lib.stage2_indices(ctx, k, seed)
      result = train_lib.run_stage2_on(
          ctx, init_params, support, fewshot_steps(k, eval_config), seed,
          desc=f"few-shot K={k} seed={seed}")
      probs = {"hica": prototype_probs(ctx, result.state.params,
                                       test["image"])}
      probs.update(frozen_head_probs(ctx, init_params,
                                     support_arrays(ctx, support), frozen))
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
