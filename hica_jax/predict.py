"""Prediction functions: the towers' embeddings in global batches, text
prototypes, and prototype-classifier probabilities. Evaluators, stage 1's
reclustering and interpretability read the models through these.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import losses
from hica_jax import sharding


def l2(x):
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def crop_boxes(size, crop_views):
  """[(top, left, side)] in pixels of an image `size` px square: for each
  side fraction f of `crop_views`, its four corners and its centre as
  squares of round(f * size) px."""
  boxes = []
  for frac in crop_views:
    side = max(1, int(round(float(frac) * size)))
    far, mid = size - side, (size - side) // 2
    boxes += [(0, 0, side), (0, far, side), (far, 0, side), (far, far, side),
              (mid, mid, side)]
  return boxes


def view_stack(images, crop_views):
  """Test-time views: f[B,S,S,C] -> f[V,B,S,S,C], V = 1 + 5 len(crop_views):
  the images themselves, then each crop_boxes square resized back to S px
  (bilinear). Each view keeps the normalisation its image had."""
  b, s, w, c = images.shape
  if s != w:
    raise ValueError(f"test-time crops need square images, got {s}x{w}")
  views = [images] + [
      jax.image.resize(images[:, t:t + side, l:l + side], (b, s, s, c),
                       "bilinear") for t, l, side in crop_boxes(s, crop_views)]
  return jnp.stack(views)


@functools.lru_cache(maxsize=None)
def embed_fns(model, crop_views=()):
  """Jitted (image_fn, text_fn), made once per model and crop_views.

  image_fn(params, images f[B,H,W,3]) -> (normalised embedding f[B,d],
  pooled features f[B,w]); text_fn(params, ids i[B,L], mask) -> f[B,d].
  With crop_views (side fractions, e.g. config.eval.probe_crops), the image's
  embedding before normalisation and its features are each the mean over
  view_stack's views: the full image and five crops per fraction.
  """

  def image_fn(params, images):
    views = view_stack(images, crop_views) if crop_views else images[None]
    flat = views.reshape((-1,) + images.shape[1:])
    g, _ = model.apply(params, flat, method=model.encode_image)
    feats = model.apply(params, flat, method=model.image_features)
    if not crop_views:
      return l2(g), feats
    v = views.shape[0]
    g = g.reshape((v, -1) + g.shape[1:]).mean(0)
    return l2(g), feats.reshape((v, -1) + feats.shape[1:]).mean(0)

  def text_fn(params, ids, mask):
    u, _ = model.apply(params, ids, mask, method=model.encode_text)
    return l2(u)

  return jax.jit(image_fn), jax.jit(text_fn)


def batched_apply(fn, params, arrays, batch_size, mesh):
  """Applies fn(params, *arrays) in global batches (last one padded).

  Every process holds all of `arrays` and feeds only its rows of each global
  batch; outputs are gathered back to every process, so the result (numpy)
  is the same on one process and on many.
  """
  n = len(arrays[0])
  unit = sharding.data_size(mesh)
  batch_size = max(unit, batch_size - batch_size % unit)
  nproc, pid = jax.process_count(), jax.process_index()
  outs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    m = len(chunk[0])
    pad = (-m) % unit
    if pad:
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
    rows = len(chunk[0]) // nproc
    local = [c[pid * rows:(pid + 1) * rows] for c in chunk]
    res = fn(params, *sharding.shard_batch(local, mesh))
    outs.append(jax.tree.map(lambda r: sharding.to_host(r)[:m], res))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def logit_scale(model, params):
  return float(model.apply(params, method=model.get_logit_scale))


def text_prototypes(model, params, tables, mesh, batch_size=64):
  """f[K, d] normalised class prototypes from the descriptors of `tables`."""
  _, text_fn = embed_fns(model)
  d = batched_apply(text_fn, params, [tables.desc_ids, tables.desc_mask],
                    batch_size, mesh)
  return np.asarray(losses.category_prototypes(
      jnp.asarray(d), jnp.asarray(tables.desc_category), tables.num_classes))


def embed_images(model, params, images, mesh, batch_size=64, crop_views=()):
  """(normalised embeddings f[N,d], pooled features f[N,w]) of images,
  averaged over test-time crops when crop_views is set (embed_fns)."""
  image_fn, _ = embed_fns(model, tuple(crop_views))
  return batched_apply(image_fn, params, [images], batch_size, mesh)


def probs_from_embeddings(image_emb, prototypes, scale):
  """f[N, K] = softmax_k(s * g . c_k) of normalised embeddings."""
  return np.asarray(jax.nn.softmax(
      jnp.asarray(scale * image_emb @ prototypes.T), -1))


def prototype_probs(model, params, images, tables, mesh, batch_size=64):
  """f[N, K] zero-shot class probabilities from text prototypes."""
  g, _ = embed_images(model, params, images, mesh, batch_size)
  return probs_from_embeddings(
      g, text_prototypes(model, params, tables, mesh, batch_size),
      logit_scale(model, params))
