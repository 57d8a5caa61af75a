"""Interpretability: phrase-to-patch similarity maps scored against ROI masks.

A map is the cosine similarity between an image's projected patch embeddings
and the pooled embedding of a local phrase (the one that describes its ROI),
on the patch grid. Scores against the ROI mask:
- pointing game: the patch of highest similarity overlaps the mask (hit 1,
  else 0): the patch is the map's resolution, as the usual 15-pixel
  tolerance is about one patch of a 224-pixel ViT-B/16;
- IoU with the mask of the map upsampled bilinearly to the image and
  thresholded at its top `fraction` of pixels: a fixed fraction, or
  (threshold "roi_area") the ROI's own area, so that a perfect map scores 1
  whatever the lesion size (a fixed 20% caps the IoU of a lesion covering
  3% of the image at 0.15).
A random map (i.i.d. uniform patch scores, upsampled the same way) gives the
chance level of both scores for the same images.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import contrastive
from hica_jax import losses
from hica_jax import predict


@functools.lru_cache(maxsize=None)
def _map_fn(model):
  def map_fn(params, images, ids, mask):
    _, patches = model.apply(params, images, method=model.encode_image)
    phrase, _ = model.apply(params, ids, mask, method=model.encode_text)
    return jnp.einsum("bnd,bd->bn", contrastive.l2_normalize(patches),
                      contrastive.l2_normalize(phrase))
  return jax.jit(map_fn)


def phrase_patch_maps(model, params, images, phrase_ids, phrase_mask,
                      max_len, mesh, batch_size=64):
  """f[N, gh, gw]: cos(patch embedding, phrase embedding) of each example.

  images f[N,H,W,3] (preprocessed); phrase_ids/phrase_mask i[N, Lp];
  max_len: the text tower's length.
  """
  # Phrases are padded to the text length as in training (encode_examples);
  # padding is masked, so the phrase embedding is unchanged.
  pad = [(0, 0), (0, max_len - phrase_ids.shape[1])]
  ids, mask = np.pad(phrase_ids, pad), np.pad(phrase_mask, pad)
  maps = predict.batched_apply(_map_fn(model), params, [images, ids, mask],
                               batch_size, mesh)
  gh, gw = losses.patch_grid(maps.shape[1])
  return maps.reshape(-1, gh, gw)


def upsample(maps, size):
  """f[N, gh, gw] -> f[N, H, W] bilinear (patch centres keep their values)."""
  maps = jnp.asarray(maps, jnp.float32)
  return np.asarray(jax.image.resize(maps, (maps.shape[0],) + tuple(size),
                                     "bilinear"))


def pointing_hits(maps, masks):
  """bool[N]: does the top patch of each map f[N,gh,gw] overlap its mask
  b[N,H,W] (H, W multiples of gh, gw)?"""
  n = len(maps)
  cover = np.asarray(losses.roi_patch_weights(
      jnp.asarray(masks, jnp.float32), maps.shape[1:]))
  return cover[np.arange(n), maps.reshape(n, -1).argmax(-1)] > 0


def top_fraction_iou(maps, masks, fraction):
  """f[N]: IoU of each map f[N,H,W]'s top `fraction` (scalar or f[N]) of
  pixels with its mask b[N,H,W]."""
  n = len(maps)
  flat = maps.reshape(n, -1)
  q = 1.0 - np.broadcast_to(np.asarray(fraction, np.float64), (n,))
  thr = np.asarray([np.quantile(f, qi) for f, qi in zip(flat, q)])[:, None]
  pred, gt = flat >= thr, masks.reshape(n, -1).astype(bool)
  union = (pred | gt).sum(-1)
  return np.where(union > 0, (pred & gt).sum(-1) / np.maximum(union, 1), 0.0)


def threshold_fraction(masks, threshold, top_fraction):
  """Fraction of pixels kept per example: the ROI area or a constant."""
  if threshold == "roi_area":
    return masks.reshape(len(masks), -1).mean(-1)
  if threshold == "top_fraction":
    return float(top_fraction)
  raise ValueError(f"study.interpret.threshold={threshold!r}: use 'roi_area' "
                   "or 'top_fraction'")


def score_maps(maps, masks, fraction):
  """Patch-grid maps f[N,gh,gw] and masks b[N,H,W] -> per-example scores
  {"pointing_game": f[N] in {0,1}, "iou": f[N]}; `fraction` as in
  top_fraction_iou."""
  return {"pointing_game": pointing_hits(maps, masks).astype(np.float64),
          "iou": top_fraction_iou(upsample(maps, masks.shape[1:]), masks,
                                  fraction)}


def random_map_scores(grid, masks, fraction, draws, seed=0):
  """Chance level: mean scores of `draws` i.i.d. uniform maps per example."""
  rng = np.random.default_rng(seed)
  runs = [score_maps(rng.random((len(masks),) + tuple(grid)), masks, fraction)
          for _ in range(draws)]
  return {k: np.mean([r[k] for r in runs], 0) for k in runs[0]}


def summarize_scores(scores, labels, categories):
  """Per-example scores -> means overall and per category present."""
  out = {k: float(np.mean(v)) for k, v in scores.items()}
  out["per_category"] = {
      categories[c]: dict({k: float(np.mean(v[labels == c]))
                           for k, v in scores.items()},
                          n=int((labels == c).sum()))
      for c in np.unique(labels)}
  return out


def roi_examples(test):
  """Rows of test arrays that have an ROI mask and a known local phrase."""
  return np.flatnonzero((test["has_roi"] > 0) & (test["phrase_id"] >= 0) &
                        (test["roi_mask"].reshape(len(test["label"]), -1)
                         .max(-1) > 0))


def gallery_rows(labels, count):
  """Up to `count` rows, taken round-robin over the categories present so
  that every category with ROIs is shown. labels: i[N] of candidate rows."""
  per = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
  out = []
  while len(out) < count and any(per):
    for rows in per:
      if rows and len(out) < count:
        out.append(rows.pop(0))
  return np.asarray(out, np.int64)
