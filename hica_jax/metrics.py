"""The one metrics module: classification metrics and the metric writer.

Classification metrics come from scikit-learn where it has them; expected
calibration error (not in scikit-learn) is computed here.
"""
import json
import os
import time

import jax
import numpy as np
from sklearn import metrics as skm


def expected_calibration_error(probs, labels, num_bins=15):
  """ECE with equal-width confidence bins. probs f[N,K], labels i[N]."""
  probs = np.asarray(probs, np.float64)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    sel = bins == b
    if sel.any():
      ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
  return float(ece)


def classification_metrics(probs, labels, num_classes=None):
  """Accuracy, balanced accuracy, macro-F1, one-vs-rest AUC and ECE.

  Args:
    probs: f[N, K] class probabilities (rows sum to 1).
    labels: i[N] true classes in [0, K).
  Returns:
    dict of python floats. AUC is macro one-vs-rest (binary AUC for K = 2) and
    NaN when a class is absent from `labels`.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  num_classes = num_classes or probs.shape[1]
  pred = probs.argmax(-1)
  out = {
      "accuracy": float(skm.accuracy_score(labels, pred)),
      "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)),
      "macro_f1": float(skm.f1_score(labels, pred, average="macro",
                                     labels=np.arange(num_classes),
                                     zero_division=0)),
      "ece": expected_calibration_error(probs, labels),
  }
  try:
    if num_classes == 2:
      out["auc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
    else:
      p = probs / probs.sum(-1, keepdims=True)
      out["auc"] = float(skm.roc_auc_score(labels, p, multi_class="ovr",
                                           labels=np.arange(num_classes)))
  except ValueError:
    out["auc"] = float("nan")
  return out


def generalised_zero_shot_metrics(probs, labels, unseen):
  """Generalised zero-shot scores: seen and unseen classes compete.

  Args:
    probs: f[N, C] probabilities over every category (seen and unseen).
    labels: i[N] true categories in [0, C).
    unseen: category ids held out of training.
  Returns:
    dict of floats: `recall` (list, per category; NaN for a category absent
    from `labels`), `seen_accuracy` / `unseen_accuracy` (accuracy on the
    images of seen / unseen categories, every category a possible answer),
    their `harmonic_mean`, and `balanced_accuracy` over all categories.
  """
  probs, labels = np.asarray(probs), np.asarray(labels)
  num = probs.shape[1]
  pred = probs.argmax(-1)
  recall = skm.recall_score(labels, pred, labels=np.arange(num), average=None,
                            zero_division=np.nan)
  present = np.isin(np.arange(num), labels)
  is_unseen = np.isin(labels, unseen)
  correct = pred == labels

  def acc(rows):
    return float(correct[rows].mean()) if rows.any() else float("nan")
  s, u = acc(~is_unseen), acc(is_unseen)
  recall = np.where(present, recall, np.nan)
  return {"recall": [float(r) for r in recall],
          "seen_accuracy": s, "unseen_accuracy": u,
          "harmonic_mean": (float(2 * s * u / (s + u)) if s + u > 0 else
                            0.0 if s + u == 0 else float("nan")),
          # Mean recall over the categories present (sklearn's balanced
          # accuracy, without its warning about predicted absent classes).
          "balanced_accuracy": float(np.mean(recall[present]))}


def summarize(values):
  """mean, std, 95% interval (t-based) and n of a list of floats."""
  v = np.asarray(values, np.float64)
  n = len(v)
  mean = float(v.mean()) if n else float("nan")
  std = float(v.std(ddof=1)) if n > 1 else 0.0
  if n > 1:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n))
  else:
    half = 0.0
  return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


class MetricWriter:
  """Writes scalars as JSON lines (and TensorBoard) from process 0 only."""

  def __init__(self, workdir, name, tensorboard=True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics", f"{name}.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
          self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", name))
        except ImportError:
          self._tb = None

  def discard_after(self, step):
    """Drops records of steps > `step`: a run resumed from the checkpoint
    of `step` redoes those steps, and each step keeps one record."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = [l for l in lines if l.strip() and json.loads(l)["step"] <= step]
    if len(kept) != len(lines):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)

  def write(self, step, scalars):
    if not self.active:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()
