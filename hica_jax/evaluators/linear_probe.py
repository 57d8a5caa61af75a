"""Linear probe: multinomial logistic regression on the frozen stage-1
model's pooled image features of the support set, each feature standardised
by its mean and std over the unlabelled train pool (env.pool_feature_stats).

Why standardise: a tower's pooled features share a few large common
directions (a random ViT's most of all); L2-normalised as they are, the
probe at C=1 sees mostly those and underfits (docs/stage1_experiments.md).
"""
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.model_selection import StratifiedKFold

# Inverse regularisation strengths the all-label references choose from.
ALL_LABELS_C = (0.01, 0.1, 1.0, 10.0, 100.0)


def probe_inputs(feats, stats=None):
  """f[N, w] features standardised by `stats` = (mean f[w], std f[w]) when
  given, then L2-normalised: what the probe is fitted on."""
  if stats is not None:
    feats = (feats - stats[0]) / stats[1]
  return feats / (np.linalg.norm(feats, axis=-1, keepdims=True) + 1e-6)


def cv_folds(labels, seed=0):
  """Stratified folds for cross_validated_c: 5, or as many as the rarest
  class has examples; None when it has fewer than 2."""
  present = np.bincount(labels)
  folds = min(5, int(present[present > 0].min())) if len(labels) else 0
  return (StratifiedKFold(folds, shuffle=True, random_state=seed)
          if folds >= 2 else None)


def cross_validated_c(x, labels, seed=0):
  """The C of ALL_LABELS_C with the best balanced accuracy over stratified
  folds (cv_folds) of (x f[N, w], labels i[N]); 1.0 where the rarest class
  is too small to fold. With every label there is data to choose the
  regularisation; at K shots per class there is not, and the probes keep
  C=1. The folds' fits run on every core (n_jobs=-1): each is
  deterministic, so the chosen C does not depend on the core count, and
  on 3940 X-rays the search was most of the evaluation's growth."""
  folds = cv_folds(labels, seed)
  if folds is None:
    return 1.0
  search = GridSearchCV(LogisticRegression(max_iter=2000),
                        {"C": list(ALL_LABELS_C)},
                        scoring="balanced_accuracy", cv=folds, n_jobs=-1)
  return float(search.fit(x, labels).best_params_["C"])


def linear_probe_probs(train_feats, train_labels, test_feats, num_classes,
                       c=1.0, stats=None, fit_intercept=True):
  """f[N_test, K] probabilities of logistic regression fitted on features
  f[N_train, w] with labels i[N_train], both as probe_inputs gives them.
  fit_intercept=False: a classifier through the origin, as HiCA's
  prototype classifier on its bias-free projection is."""
  clf = LogisticRegression(C=c, max_iter=2000, fit_intercept=fit_intercept)
  clf.fit(probe_inputs(train_feats, stats), train_labels)
  probs = np.zeros((len(test_feats), num_classes))
  probs[:, clf.classes_] = clf.predict_proba(probe_inputs(test_feats, stats))
  return probs


def cell(env, k, seed):
  support = env.support(k, seed)
  sup = env.frozen_embeddings(env.stage1, support["image"])
  probs = linear_probe_probs(sup["feats"], support["label"],
                             env.frozen["feats"], env.num_classes,
                             stats=env.pool_feature_stats)
  return {"metrics": env.seen_metrics(probs)}


def all_labels_cell(env):
  """The probe fitted on the labels of the whole train pool (a seeded
  sample of at most POOL_STATS_MAX images, evaluators/env.py), its C
  cross-validated on them: what a linear classifier on the frozen stage-1
  features reaches with every label."""
  pool, stats = env.pool_features, env.pool_feature_stats
  c = cross_validated_c(probe_inputs(pool["feats"], stats), pool["label"])
  probs = linear_probe_probs(pool["feats"], pool["label"],
                             env.frozen["feats"], env.num_classes, c=c,
                             stats=stats)
  return {"metrics": env.seen_metrics(probs), "c": c,
          "n_train": int(len(pool["label"]))}
