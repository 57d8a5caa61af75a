"""Class-balanced K-shot support sets."""
import warnings

import numpy as np


def sample_support(labels, k, seed, classes=None, exclude_indices=None,
                   on_short="error"):
  """Indices of a K-shot support set: k examples of every class.

  labels: int[N] class of every example of the pool (e.g. the train split).
  k: shots per class (>= 1). seed: the support-set seed.
  classes: class ids to sample (default: every label present in the pool).
  exclude_indices: indices never drawn (e.g. the test examples when the pool
    is a whole data set).
  on_short: a class with fewer than k examples raises ("error") or gives all
    its examples with a warning ("all").
  Returns int64[sum of shots], sorted. The draw of a class depends only on
  (seed, class), and its K-shot set is a prefix of one seeded permutation, so
  sets are nested across K (the 1-shot set is inside the 2-shot set).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k (shots per class) must be an integer >= 1, got {k!r}")
  if on_short not in ("error", "all"):
    raise ValueError(f"on_short={on_short!r}: use 'error' or 'all'")
  available = np.ones(len(labels), bool)
  if exclude_indices is not None:
    exclude = np.asarray(exclude_indices, np.int64).reshape(-1)
    if exclude.size and (exclude.min() < 0 or exclude.max() >= len(labels)):
      raise ValueError(f"exclude_indices out of range [0, {len(labels)})")
    available[exclude] = False
  if classes is None:
    classes = np.unique(labels[available])
  picks = []
  for c in classes:
    pool = np.flatnonzero(available & (labels == c))
    if len(pool) == 0:
      raise ValueError(f"class {c} has no examples to sample a support set "
                       f"from ({int((labels == c).sum())} in labels, all "
                       "excluded)" if (labels == c).any() else
                       f"class {c} has no examples in labels")
    if len(pool) < k:
      message = (f"class {c} has {len(pool)} available examples, fewer than "
                 f"k={k} shots")
      if on_short == "error":
        raise ValueError(message + "; lower k or pass on_short='all' to take "
                         "the whole class.")
      warnings.warn(message + "; taking all of them.", stacklevel=2)
    order = np.random.default_rng([int(seed), int(c)]).permutation(len(pool))
    picks.append(pool[order[:k]])
  return np.sort(np.concatenate(picks)).astype(np.int64) if picks else (
      np.zeros(0, np.int64))
