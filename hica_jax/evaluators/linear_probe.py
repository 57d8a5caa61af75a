"""Linear probe: multinomial logistic regression on the frozen stage-1
model's pooled image features of the support set, each feature standardised
by its mean and std over the unlabelled train pool (env.pool_feature_stats).

Why standardise: a tower's pooled features share a few large common
directions (a random ViT's most of all); L2-normalised as they are, the
probe at C=1 sees mostly those and underfits (docs/stage1_experiments.md).
"""
import numpy as np
from sklearn.linear_model import LogisticRegression


def linear_probe_probs(train_feats, train_labels, test_feats, num_classes,
                       c=1.0, stats=None):
  """f[N_test, K] probabilities of logistic regression fitted on features
  f[N_train, w] with labels i[N_train]; features are standardised by
  `stats` = (mean f[w], std f[w]) when given, then L2-normalised."""
  def norm(f):
    if stats is not None:
      f = (f - stats[0]) / stats[1]
    return f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
  clf = LogisticRegression(C=c, max_iter=2000)
  clf.fit(norm(train_feats), train_labels)
  probs = np.zeros((len(test_feats), num_classes))
  probs[:, clf.classes_] = clf.predict_proba(norm(test_feats))
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
  sample of at most POOL_STATS_MAX images, evaluators/env.py): what a
  linear classifier on the frozen stage-1 features reaches with every
  label."""
  pool = env.pool_features
  probs = linear_probe_probs(pool["feats"], pool["label"],
                             env.frozen["feats"], env.num_classes,
                             stats=env.pool_feature_stats)
  return {"metrics": env.seen_metrics(probs),
          "n_train": int(len(pool["label"]))}
