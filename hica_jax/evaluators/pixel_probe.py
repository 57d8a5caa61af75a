"""The raw-pixel floor: logistic regression on the preprocessed pixels of the
support set, downsampled to config.eval.pixel_size and standardised per
image. Every learned method is judged against it."""
import numpy as np
from sklearn.linear_model import LogisticRegression

from hica_jax.evaluators import linear_probe


def _box_grid(length, size):
  """Indices of a multiple of `size` rows (or columns) spread over length."""
  m = size * max(1, length // size)
  return (np.arange(m) * length) // m


def pixel_features(images, size):
  """f[N, H, W, C] -> f[N, size*size]: channel mean, box-downsampled to
  size x size (H and W multiples of size; else nearest rows/columns of the
  box grid), then zero mean and unit variance per image."""
  x = np.asarray(images, np.float32).mean(-1)
  x = x[:, _box_grid(x.shape[1], size)][:, :, _box_grid(x.shape[2], size)]
  n, h, w = x.shape
  x = x.reshape(n, size, h // size, size, w // size).mean((2, 4))
  x = x.reshape(n, -1)
  x = x - x.mean(-1, keepdims=True)
  return x / (x.std(-1, keepdims=True) + 1e-6)


def pixel_probe_probs(support_images, support_labels, test_images,
                      num_classes, size=32, c=1.0):
  """f[N_test, K] probabilities of logistic regression on pixel_features."""
  clf = LogisticRegression(C=c, max_iter=2000)
  clf.fit(pixel_features(support_images, size), support_labels)
  probs = np.zeros((len(test_images), num_classes))
  probs[:, clf.classes_] = clf.predict_proba(pixel_features(test_images,
                                                            size))
  return probs


def cell(env, k, seed):
  support = env.support(k, seed)
  probs = pixel_probe_probs(support["image"], support["label"],
                            env.seen_images, env.num_classes,
                            int(env.config.eval.pixel_size))
  return {"metrics": env.seen_metrics(probs)}


def all_labels_cell(env):
  """The pixel floor fitted on the labels of the whole train pool (a seeded
  sample of at most POOL_STATS_MAX images, evaluators/env.py), its C
  cross-validated on them (linear_probe.cross_validated_c)."""
  pool, size = env.pool_arrays(), int(env.config.eval.pixel_size)
  c = linear_probe.cross_validated_c(pixel_features(pool["image"], size),
                                     pool["label"])
  probs = pixel_probe_probs(pool["image"], pool["label"], env.seen_images,
                            env.num_classes, size, c=c)
  return {"metrics": env.seen_metrics(probs), "c": c,
          "n_train": int(len(pool["label"]))}
