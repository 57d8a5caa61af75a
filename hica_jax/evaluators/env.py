"""What every evaluator is given: the test arrays, the support sets, the
stage-1 (and stage-2) params, and the prediction functions over them.

One EvalEnv serves a whole evaluation (the eval stage or the study); its
inputs are built on first use and shared by every cell. Labels of `test`
index `categories` (every category, seen and unseen); the few-shot task is
the seen classes, in the order of ctx.tables.classes.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import context as context_lib
from hica_jax import metrics as metrics_lib
from hica_jax import predict
from hica_jax.data import pipeline
from hica_jax.data import text_tables
from hica_jax.models import hica_model


# Train-pool images embedded for pool_feature_stats.
POOL_STATS_MAX = 4096


def fewshot_steps(shots, eval_config):
  """Stage-2 (and supervised) steps of a few-shot run on a K-shot support set.

  fewshot_steps_per_shot * K within [fewshot_min_steps, fewshot_steps]:
  about the same number of passes over every support set, so K=1 is not
  trained as long as K=16 (synthetic busi K=16 from scratch: 0.53 balanced
  accuracy at 150 steps, 0.60 at 300). The one step rule of every few-shot
  number the project reports.
  """
  cap = int(eval_config.fewshot_steps)
  per_shot = eval_config.get("fewshot_steps_per_shot", 0)
  if not per_shot:
    return cap
  return int(min(cap, max(eval_config.get("fewshot_min_steps", 1),
                          per_shot * shots)))


def summarize_runs(runs):
  """List of metric dicts (one per seed) -> {metric: summary, "n_seeds": n}."""
  out = {name: metrics_lib.summarize([r[name] for r in runs])
         for name in runs[0]}
  out["n_seeds"] = len(runs)
  return out


class EvalEnv:
  """Inputs and prediction functions shared by the cells of an evaluation."""

  def __init__(self, ctx, stage1_params, stage2_params=None):
    self.ctx, self.config = ctx, ctx.config
    self.model, self.mesh = ctx.model, ctx.mesh
    self.stage1, self.stage2 = stage1_params, stage2_params
    self.categories = list(ctx.data.categories)
    # Index in `categories` of every class of the few-shot task, in order.
    self.seen_ids = np.asarray(ctx.class_ids(ctx.tables.classes))
    self.unseen_ids = ctx.class_ids(ctx.data.unseen)
    self.num_classes = ctx.tables.num_classes
    # Images (and descriptors) per forward pass when embedding.
    self.batch_size = int(ctx.config.eval.batch_size)
    # Test-time crops the frozen-feature readouts average over.
    self.probe_crops = tuple(float(f) for f in
                             ctx.config.eval.get("probe_crops", ()))
    self._pool_features = {}

  # -- text tables ------------------------------------------------------------

  def tables(self, bank, classes):
    ctx = self.ctx
    return text_tables.build_text_tables(bank, classes, ctx.tokenizer,
                                         ctx.model_config.text.max_len,
                                         ctx.config.data.max_phrase_len)

  @functools.cached_property
  def all_tables(self):
    """Descriptors of every category, seen and unseen, in data-set order."""
    return self.tables(self.ctx.data.bank, self.categories)

  # -- test and support arrays -------------------------------------------------

  @functools.cached_property
  def test(self):
    """Preprocessed test arrays of every category (no augmentation)."""
    ctx, tables = self.ctx, self.all_tables
    source = ctx.data.source("test")
    idx = source.indices_of(ctx.class_ids(tables.classes))
    return pipeline.eval_arrays(source, idx,
                                ctx.preprocessor(tables, train=False),
                                desc="loading test")

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
  def seen_images(self):
    return self.test["image"][self.seen_rows]

  def support_indices(self, k, seed):
    """The (K, seed) class-balanced support set: train-split records."""
    return self.ctx.support_indices(k, seed)

  def support(self, k, seed):
    """Preprocessed support arrays (no augmentation); labels are task labels."""
    return pipeline.eval_arrays(self.ctx.data.source("train"),
                                self.support_indices(k, seed),
                                self.ctx.preprocessor(train=False),
                                desc="support")

  def steps(self, k):
    return fewshot_steps(k, self.config.eval)

  # -- models -------------------------------------------------------------------

  @functools.cached_property
  def random_init(self):
    """The params stage 1 starts from: the no-stage-1 ablation's init."""
    return context_lib.init_params(self.ctx,
                                   jax.random.PRNGKey(self.config.seed))

  @functools.cached_property
  def frozen(self):
    """Frozen stage-1 model on the seen test images, as the readouts
    fitted on frozen features (the probes, Tip-Adapter) see them
    (frozen_embeddings, over eval.probe_crops): pooled features `feats`
    f[N,w], normalised embeddings `emb` f[N,d], text `prototypes` f[K,d]
    of the task's classes and the logit `scale`."""
    return self.frozen_embeddings(self.stage1, self.seen_images)

  def pool_arrays(self):
    """The train pool of the task's classes, preprocessed for evaluation: a
    seeded sample of at most POOL_STATS_MAX records, `image` f[N,H,W,C]
    and task `label` i[N]. Only the all-label references read the labels;
    to everything else it is the unlabelled pool."""
    ctx = self.ctx
    source = ctx.data.source("train")
    idx = source.indices_of(self.seen_ids)
    if len(idx) > POOL_STATS_MAX:
      idx = np.sort(np.random.default_rng(0).choice(idx, POOL_STATS_MAX,
                                                    replace=False))
    out = pipeline.eval_arrays(source, idx, ctx.preprocessor(train=False),
                               desc="embedding the train pool")
    return {"image": out["image"], "label": out["label"]}

  def pool_images(self):
    """f[N, H, W, C]: pool_arrays()' images (its labels unused)."""
    return self.pool_arrays()["image"]

  def pool_features_over(self, crop_views):
    """The frozen stage-1 model's pooled features `feats` f[N, w] of
    pool_arrays()' images, each the mean over `crop_views`' test-time
    crops (predict.embed_images), and their task `label` i[N]."""
    if crop_views not in self._pool_features:
      pool = self.pool_arrays()
      feats = predict.embed_images(self.model, self.stage1, pool["image"],
                                   self.mesh, self.batch_size,
                                   crop_views)[1]
      self._pool_features[crop_views] = {"feats": feats,
                                         "label": pool["label"]}
    return self._pool_features[crop_views]

  @property
  def pool_features(self):
    """pool_features_over the probes' crops (eval.probe_crops): the
    readouts' unlabelled pool and their all-label training set."""
    return self.pool_features_over(self.probe_crops)

  @staticmethod
  def feature_stats(feats):
    """(mean, std) f[w] of features f[N, w], the std kept off zero."""
    return feats.mean(0), feats.std(0) + 1e-6

  @functools.cached_property
  def pool_feature_stats(self):
    """feature_stats of pool_features: the probes' standardisation."""
    return self.feature_stats(self.pool_features["feats"])

  @functools.cached_property
  def full_image_pool_feature_stats(self):
    """feature_stats of the pool's full-image features: what HiCA's
    options read (eval.hica_feature_norm, hica_proj_init); HiCA embeds
    its test images whole."""
    return self.feature_stats(self.pool_features_over(())["feats"])

  def with_feature_norm(self, params, norm):
    """params whose image tower (stage 1's) puts out its pooled features
    centred ('center') or standardised ('standardize') by
    full_image_pool_feature_stats; `params` itself for 'none' or None."""
    if norm in (None, "none"):
      return params
    mean, std = self.full_image_pool_feature_stats
    return hica_model.fold_feature_norm(
        params, mean, std if norm == "standardize" else None)

  def with_proj_init(self, params, init, norm=None):
    """params whose image_proj kernel starts at the pool features' top
    principal directions (hica_model.principal_directions of the pool's
    full-image features, as `norm` leaves them: see with_feature_norm) for
    'pool_pca'; `params` itself for 'random' or None."""
    if init in (None, "random"):
      return params
    feats = self.pool_features_over(())["feats"]
    if norm not in (None, "none"):
      mean, std = self.full_image_pool_feature_stats
      feats = (feats - mean) / (std if norm == "standardize" else 1.0)
    proj = params["params"]["image_proj"]
    if "kernel" not in proj:
      raise ValueError("eval.hica_proj_init='pool_pca' sets a linear "
                       "image_proj's kernel; model.image_proj.kind is not "
                       "'linear'")
    kernel = hica_model.principal_directions(feats, proj["kernel"].shape[1])
    chex.assert_equal_shape([kernel, proj["kernel"]])
    proj = dict(proj, kernel=jnp.asarray(kernel, proj["kernel"].dtype))
    return dict(params, params=dict(params["params"], image_proj=proj))

  def frozen_embeddings(self, params, images):
    """What the frozen-feature readouts fit and score: images' features and
    embeddings under `params`, averaged over eval.probe_crops' crops."""
    emb, feats = predict.embed_images(self.model, params, images, self.mesh,
                                      self.batch_size, self.probe_crops)
    return {"feats": feats, "emb": emb,
            "prototypes": predict.text_prototypes(
                self.model, params, self.ctx.tables, self.mesh,
                self.batch_size),
            "scale": predict.logit_scale(self.model, params)}

  def prototype_probs(self, params, images, tables=None):
    return predict.prototype_probs(self.model, params, images,
                                   tables or self.all_tables, self.mesh,
                                   self.batch_size)

  # -- scoring --------------------------------------------------------------------

  def seen_metrics(self, probs):
    """classification_metrics of the task from f[N_seen, K] probabilities of
    the seen test rows."""
    return metrics_lib.classification_metrics(probs, self.seen_labels,
                                              self.num_classes)

  def score_all(self, probs_all):
    """Probabilities over all categories of every test image -> the task's
    metrics (unseen columns and rows dropped: the renormalised softmax over
    seen prototypes) and, with unseen categories, the generalised zero-shot
    metrics."""
    p = probs_all[self.seen_rows][:, self.seen_ids]
    out = {"metrics": self.seen_metrics(p / p.sum(-1, keepdims=True))}
    if self.unseen_ids:
      out["unseen"] = metrics_lib.generalised_zero_shot_metrics(
          probs_all, self.test["label"], self.unseen_ids)
    return out

  def evaluate_prototypes(self, params, tables=None):
    """score_all of the prototype classifier of `params`."""
    return self.score_all(self.prototype_probs(params, self.test["image"],
                                               tables))
