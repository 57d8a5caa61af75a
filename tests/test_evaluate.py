"""Few-shot heads and metrics: known answers and limiting cases."""
import numpy as np
import pytest

from hica_jax.evaluators.linear_probe import linear_probe_probs
from hica_jax.evaluators.tip_adapter import tip_adapter_probs
from hica_jax.evaluators.zs_linear_probe import zs_linear_probe_probs
from hica_jax import metrics as metrics_lib


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(seed=0, k=3, d=8, n=12):
  rng = np.random.default_rng(seed)
  protos = _unit(rng.normal(size=(k, d)))
  labels = np.arange(n) % k
  emb = _unit(protos[labels] + 0.3 * rng.normal(size=(n, d)))
  return protos, emb, labels


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_tip_adapter_without_cache_is_zero_shot():
  protos, emb, labels = _problem()
  probs = tip_adapter_probs(emb, emb[:3], labels[:3], protos, 10.0,
                                     3, alpha=0.0)
  np.testing.assert_allclose(probs, _softmax(10.0 * emb @ protos.T),
                             atol=1e-5)


def test_tip_adapter_cache_recovers_support_labels():
  # Prototypes that are useless (all equal): only the cache can classify.
  _, emb, labels = _problem()
  flat = np.ones((3, emb.shape[1])) / np.sqrt(emb.shape[1])
  probs = tip_adapter_probs(emb, emb, labels, flat, 10.0, 3,
                                     alpha=1.0, beta=50.0)
  assert (probs.argmax(-1) == labels).all()


def test_zs_linear_probe_limits():
  protos, emb, labels = _problem(seed=1)
  zero_shot = _softmax(10.0 * emb @ protos.T)
  anchored = zs_linear_probe_probs(emb, labels, emb, protos, 10.0,
                                            anchor=1e4)
  np.testing.assert_allclose(anchored, zero_shot, atol=1e-3)
  # Wrong prototypes (rolled) and no anchor: the probe learns the support.
  free = zs_linear_probe_probs(emb, labels, emb,
                                        np.roll(protos, 1, 0), 10.0,
                                        anchor=0.0, steps=500)
  assert (free.argmax(-1) == labels).mean() == 1.0


def test_linear_probe_separable():
  protos, emb, labels = _problem(seed=2)
  probs = linear_probe_probs(emb, labels, emb, 3, c=100.0)
  assert (probs.argmax(-1) == labels).all()
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_linear_probe_pool_standardisation():
  # Features as a random tower gives them: one large common direction
  # (feature 0), label-free features of large spread (2-7) and the class
  # signal small (feature 1). Raw, the C=1 probe on 8 images fits the large
  # features and is at chance; standardised by the pool's mean and std,
  # every feature counts the same and the signal carries it.
  rng = np.random.default_rng(0)
  labels = np.arange(200) % 2
  feats = np.concatenate([
      100.0 + rng.normal(size=(200, 1)),
      0.5 * (2 * labels[:, None] - 1) + 0.05 * rng.normal(size=(200, 1)),
      3.0 * rng.normal(size=(200, 6))], axis=1)
  raw = linear_probe_probs(feats[:8], labels[:8], feats, 2)
  assert (raw.argmax(-1) == labels).mean() < 0.6
  stats = (feats.mean(0), feats.std(0))
  std = linear_probe_probs(feats[:8], labels[:8], feats, 2, stats=stats)
  assert (std.argmax(-1) == labels).mean() > 0.9


def test_linear_probe_without_intercept_cannot_cut_out_an_arc():
  # probe_inputs L2-normalises, so the features lie on the unit circle:
  # class 1 at 20 degrees between class 0 at 0 and 40. A classifier
  # through the origin takes a half circle and cannot hold 20 without 0 or
  # 40; with an intercept the chord cuts the arc out.
  rng = np.random.default_rng(0)
  labels = np.arange(90) % 3 == 1
  angles = np.radians(20.0 * (np.arange(90) % 3) + rng.uniform(-2, 2, 90))
  feats = np.stack([np.cos(angles), np.sin(angles)], -1)
  labels = labels.astype(int)
  with_b = linear_probe_probs(feats, labels, feats, 2, c=1e4)
  assert (with_b.argmax(-1) == labels).all()
  through_origin = linear_probe_probs(feats, labels, feats, 2, c=1e4,
                                      fit_intercept=False)
  assert (through_origin.argmax(-1) == labels).mean() < 0.7


def test_classification_metrics_known_answers():
  labels = np.array([0, 0, 0, 1])
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
  m = metrics_lib.classification_metrics(probs, labels)
  assert m["accuracy"] == pytest.approx(0.75)
  # Recall: class 0 2/3, class 1 1/1.
  assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
  # Scores of the positive (0.7) above all three negatives (0.1, 0.2, 0.6).
  assert m["auc"] == pytest.approx(1.0)
  # Bins: conf 0.9 right, 0.8 right, 0.6 wrong, 0.7 right.
  expected_ece = (abs(1 - 0.9) + abs(1 - 0.8) + abs(0 - 0.6) + abs(1 - 0.7)) / 4
  assert m["ece"] == pytest.approx(expected_ece)


def test_summarize_interval():
  s = metrics_lib.summarize([0.5, 0.7, 0.6])
  assert s["mean"] == pytest.approx(0.6)
  assert s["std"] == pytest.approx(0.1)
  # t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3).
  assert s["ci95"][1] - s["mean"] == pytest.approx(4.3027 * 0.1 / np.sqrt(3),
                                                   rel=1e-3)
  assert metrics_lib.summarize([0.4])["std"] == 0.0


def test_pixel_features_box_downsample_and_per_image_standardisation():
  from hica_jax.evaluators.pixel_probe import pixel_features  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  feats = pixel_features(images, 4)
  # Known answer: channel mean, 2x2 box means, then zero mean / unit std.
  box = images.mean(-1).reshape(3, 4, 2, 4, 2).mean((2, 4)).reshape(3, -1)
  want = (box - box.mean(-1, keepdims=True)) / box.std(-1, keepdims=True)
  np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
  # Invariant to each image's exposure and contrast (a x + b per image).
  scaled = images * np.array([2.0, 0.5, 3.0])[:, None, None, None] + 7.0
  np.testing.assert_allclose(pixel_features(scaled, 4), feats, atol=1e-4)
  # A size that does not divide the image still gives size x size pixels.
  assert pixel_features(rng.normal(size=(2, 10, 9, 3)), 4).shape == (2, 16)


def test_pixel_probe_learns_where_the_bright_half_is():
  from hica_jax.evaluators.pixel_probe import pixel_probe_probs  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)

  def images(n, label):
    x = rng.normal(scale=0.3, size=(n, 16, 16, 3))
    x[:, :, :8] += 1.0 if label == 0 else 0.0
    x[:, :, 8:] += 1.0 if label == 1 else 0.0
    return x
  support = np.concatenate([images(4, 0), images(4, 1)])
  test = np.concatenate([images(20, 0), images(20, 1)])
  probs = pixel_probe_probs(support, np.repeat([0, 1], 4), test, 2, size=8)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  assert (probs.argmax(-1) == np.repeat([0, 1], 20)).mean() == 1.0
