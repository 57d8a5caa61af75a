"""Interpretability scores and generalised zero-shot metrics: known answers."""
import numpy as np
import pytest

from hica_jax import interpret
from hica_jax import metrics as metrics_lib


def _quadrant_mask(size=16):
  """b[1, size, size]: the top-left quadrant (patch (0, 0) of a 2x2 grid)."""
  mask = np.zeros((1, size, size), bool)
  mask[0, :size // 2, :size // 2] = True
  return mask


def test_pointing_game_hit_and_miss():
  mask = _quadrant_mask()
  inside = np.array([[[1.0, 0.0], [0.0, 0.2]]])
  outside = np.array([[[0.0, 0.1], [0.3, 1.0]]])
  assert interpret.pointing_hits(inside, mask).tolist() == [True]
  assert interpret.pointing_hits(outside, mask).tolist() == [False]


def test_pointing_game_counts_a_patch_the_roi_only_touches():
  # One ROI pixel in patch (1, 1): its top patch overlaps the ROI.
  mask = np.zeros((1, 16, 16), bool)
  mask[0, 8, 8] = True
  peak = np.array([[[0.0, 0.0], [0.0, 1.0]]])
  assert interpret.pointing_hits(peak, mask).tolist() == [True]


def test_iou_known_values():
  mask = _quadrant_mask()
  exact = mask.astype(float)
  assert interpret.top_fraction_iou(exact, mask, 0.25)[0] == pytest.approx(1)
  assert interpret.top_fraction_iou(1.0 - exact, mask, 0.25)[0] == 0.0
  # The top half of the image: the quadrant (64 px) inside a 128-px region.
  rows = np.repeat(np.linspace(1, 0, 16)[:, None], 16, 1)[None]
  assert interpret.top_fraction_iou(rows, mask, 0.5)[0] == pytest.approx(0.5)


def test_roi_area_threshold_scores_a_perfect_map_one():
  mask = np.zeros((2, 16, 16), bool)
  mask[0, :4, :4] = True      # 1/16 of the image
  mask[1, 8:, :] = True       # 1/2 of the image
  fraction = interpret.threshold_fraction(mask, "roi_area", 0.2)
  np.testing.assert_allclose(fraction, [1 / 16, 1 / 2])
  iou = interpret.top_fraction_iou(mask.astype(float), mask, fraction)
  np.testing.assert_allclose(iou, [1.0, 1.0])
  # A fixed 20% caps the small ROI's IoU at its area / 20%.
  fixed = interpret.top_fraction_iou(mask.astype(float), mask, 0.2)
  assert fixed[0] <= (1 / 16) / 0.2 + 1e-6


def test_score_maps_on_the_patch_grid():
  mask = _quadrant_mask()
  good = interpret.score_maps(np.array([[[1.0, 0.0], [0.0, 0.0]]]), mask,
                              0.25)
  bad = interpret.score_maps(np.array([[[0.0, 0.0], [0.0, 1.0]]]), mask,
                             0.25)
  assert good["pointing_game"][0] == 1.0 and bad["pointing_game"][0] == 0.0
  # Bilinear upsampling blurs the peak: most of the top quarter is the
  # quadrant, none of it for the opposite peak.
  assert good["iou"][0] > 0.6
  assert bad["iou"][0] == 0.0


def test_random_maps_hit_at_chance():
  mask = _quadrant_mask()  # one patch of four
  chance = interpret.random_map_scores((2, 2), mask, 0.25, draws=400, seed=0)
  assert chance["pointing_game"][0] == pytest.approx(0.25, abs=0.06)
  everything = np.ones((1, 16, 16), bool)
  full = interpret.random_map_scores((2, 2), everything, 0.25, draws=5)
  assert full["pointing_game"][0] == 1.0
  assert full["iou"][0] == pytest.approx(0.25, abs=0.02)


def test_gallery_rows_cover_every_category():
  labels = np.array([2, 2, 2, 1, 1, 3])
  rows = interpret.gallery_rows(labels, 4)
  assert sorted(set(labels[rows[:3]])) == [1, 2, 3]
  assert len(rows) == 4 and len(set(rows)) == 4
  assert len(interpret.gallery_rows(labels, 10)) == 6


def test_generalised_zero_shot_metrics():
  labels = np.array([0, 0, 1, 1, 2, 2])    # category 2 unseen
  pred = np.array([0, 2, 1, 1, 2, 0])
  probs = np.eye(3)[pred]
  m = metrics_lib.generalised_zero_shot_metrics(probs, labels, [2])
  np.testing.assert_allclose(m["recall"], [0.5, 1.0, 0.5])
  assert m["seen_accuracy"] == pytest.approx(3 / 4)
  assert m["unseen_accuracy"] == pytest.approx(1 / 2)
  assert m["harmonic_mean"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
  assert m["balanced_accuracy"] == pytest.approx(2 / 3)
  # A category absent from the labels has no recall.
  m = metrics_lib.generalised_zero_shot_metrics(probs[:4], labels[:4], [2])
  assert np.isnan(m["recall"][2]) and np.isnan(m["unseen_accuracy"])
  assert np.isnan(m["harmonic_mean"])
