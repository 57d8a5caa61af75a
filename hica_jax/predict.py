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


@functools.lru_cache(maxsize=None)
def embed_fns(model):
  """Jitted (image_fn, text_fn), made once per model.

  image_fn(params, images f[B,H,W,3]) -> (normalised embedding f[B,d],
  pooled features f[B,w]); text_fn(params, ids i[B,L], mask) -> f[B,d].
  """

  def image_fn(params, images):
    g, _ = model.apply(params, images, method=model.encode_image)
    feats = model.apply(params, images, method=model.image_features)
    return l2(g), feats

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


def embed_images(model, params, images, mesh, batch_size=64):
  """(normalised embeddings f[N,d], pooled features f[N,w]) of images."""
  image_fn, _ = embed_fns(model)
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
