"""Linear probe: multinomial logistic regression on the frozen stage-1
model's pooled image features of the support set."""
import numpy as np
from sklearn.linear_model import LogisticRegression


def linear_probe_probs(train_feats, train_labels, test_feats, num_classes,
                       c=1.0):
  """f[N_test, K] probabilities of logistic regression fitted on
  L2-normalised features f[N_train, w] with labels i[N_train]."""
  def norm(f):
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
                             env.frozen["feats"], env.num_classes)
  return {"metrics": env.seen_metrics(probs)}
