"""Stage-1 objectives: k-means pseudo-labels, cluster classification and
language modelling (masked and causal LM losses, BERT-style MLM token masking).

Pure and jit-able; functions that take `axis_name` follow the distributed form
described in hica_jax/contrastive.py (per-device rows in, global-batch result
out, identical on every device).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from hica_jax.contrastive import gather, psum, row_offset


def _sq_dists(x, c):
  """||x_i - c_j||^2, f32[N, k] (clamped at 0)."""
  d2 = (jnp.sum(x * x, 1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, 1)[None])
  return jnp.maximum(d2, 0.0)


def _take_global_rows(x, gidx, axis_name):
  """Rows `gidx` (i32[m]) of the global (sharded) array x, on every device."""
  n = x.shape[0]
  local = gidx - row_offset(n, axis_name)
  own = (local >= 0) & (local < n)
  rows = jnp.where(own[:, None], x[jnp.clip(local, 0, n - 1)], 0.0)
  return psum(rows, axis_name)


def _kmeans_pp_init(x, k, key, axis_name):
  """Greedy k-means++ seeding (as in scikit-learn) over the global set.

  Each step samples 2 + log(k) candidates from the all-gathered D^2 weights
  (the same key on every device, so the same draw as on one device) and keeps
  the one that lowers the global potential most; plain k-means++ too often
  seeds two centres in one planted cluster.
  """
  trials = 2 + int(np.log(k))
  keys = jax.random.split(key, k)
  num = gather(jnp.zeros((x.shape[0],)), axis_name).shape[0]
  first = jax.random.randint(keys[0], (1,), 0, num)
  c0 = _take_global_rows(x, first, axis_name)
  cents = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(c0[0])
  d2 = _sq_dists(x, c0)[:, 0]

  def body(j, carry):
    cents, d2 = carry
    w = gather(d2, axis_name)
    # All points on existing centres: fall back to uniform sampling.
    logits = jnp.where(jnp.sum(w) > 0, jnp.log(jnp.maximum(w, 0.0)), 0.0)
    idx = jax.random.categorical(keys[j], logits, shape=(trials,))
    cand = _take_global_rows(x, idx, axis_name)  # [trials, d]
    new_d2 = jnp.minimum(d2[:, None], _sq_dists(x, cand))  # [n, trials]
    best = jnp.argmin(psum(jnp.sum(new_d2, axis=0), axis_name))
    return cents.at[j].set(cand[best]), new_d2[:, best]

  cents, _ = jax.lax.fori_loop(1, k, body, (cents, d2))
  return cents


def _reseed_empty(cents, counts, sq, key):
  """Split the largest cluster into every empty one (one at a time).

  The empty centre becomes c_j + eps*u and c_j becomes c_j - eps*u for a
  random unit u and eps a tenth of cluster j's RMS radius, so the next
  assignment step divides cluster j by a hyperplane through its centre.
  """
  k, d = cents.shape

  def body(e, carry):
    cents, counts, sq = carry
    j = jnp.argmax(counts)
    u = jax.random.normal(jax.random.fold_in(key, e), (d,))
    u = u / jnp.linalg.norm(u)
    eps = 0.1 * jnp.sqrt(sq[j] / jnp.maximum(counts[j], 1.0)) + 1e-6
    empty = counts[e] == 0
    new = jnp.where(empty, cents.at[e].set(cents[j] + eps * u)
                    .at[j].set(cents[j] - eps * u), cents)
    half_n, half_sq = counts[j] / 2, sq[j] / 2
    counts = jnp.where(empty, counts.at[e].set(half_n).at[j].set(half_n),
                       counts)
    sq = jnp.where(empty, sq.at[e].set(half_sq).at[j].set(half_sq), sq)
    return new, counts, sq

  return jax.lax.fori_loop(0, k, body, (cents, counts, sq))[0]


def kmeans(features, k, key, iters=20, axis_name=None, init_centroids=None):
  """Lloyd's k-means with k-means++ seeding and empty-cluster re-seeding.

  Args:
    features: f32[N_local, d] (the caller normalises/whitens if wanted).
    k: number of clusters (static).
    key: PRNG key, the same on every device.
    iters: Lloyd iterations (an int, or traced to reuse one compilation).
    axis_name: with it, features are this device's rows; sums and counts are
      psum-reduced, so centroids and assignments equal the single-device ones.
    init_centroids: optional f32[k, d] replacing k-means++ seeding.
  Returns:
    (centroids f32[k, d] replicated, assignments i32[N_local]).
  """
  chex.assert_rank(features, 2)
  x = features.astype(jnp.float32)
  key_init, key_reseed = jax.random.split(key)
  if init_centroids is None:
    cents = _kmeans_pp_init(x, k, key_init, axis_name)
  else:
    chex.assert_shape(init_centroids, (k, x.shape[1]))
    cents = jnp.asarray(init_centroids, jnp.float32)

  def step(i, cents):
    d2 = _sq_dists(x, cents)
    assign = jnp.argmin(d2, axis=1)
    sums = psum(jax.ops.segment_sum(x, assign, k), axis_name)
    counts = psum(jax.ops.segment_sum(jnp.ones_like(assign, jnp.float32),
                                      assign, k), axis_name)
    sq = psum(jax.ops.segment_sum(jnp.min(d2, axis=1), assign, k), axis_name)
    cents = jnp.where(counts[:, None] > 0,
                      sums / jnp.maximum(counts, 1.0)[:, None], cents)
    return _reseed_empty(cents, counts, sq, jax.random.fold_in(key_reseed, i))

  cents = jax.lax.fori_loop(0, iters, step, cents)
  assign = jnp.argmin(_sq_dists(x, cents), axis=1).astype(jnp.int32)
  return cents, assign


def cluster_sizes(assignments, k, axis_name=None):
  """Global number of points per cluster, f32[k]."""
  return psum(jax.ops.segment_sum(jnp.ones(assignments.shape, jnp.float32),
                                  assignments, k), axis_name)


def cluster_classification_loss(logits, pseudo_labels, num_clusters,
                                sizes=None, axis_name=None):
  """Cross-entropy on pseudo-labels weighted by inverse cluster size.

  Args:
    logits: f32[B_local, num_clusters]; pseudo_labels: i32[B_local].
    sizes: optional f32[num_clusters] sizes over the whole pool (from
      `cluster_sizes`); default: sizes in the global batch.
  Returns:
    f32[]: sum_i w_i CE_i / sum_i w_i with w_i = 1 / size[y_i].
  """
  chex.assert_rank([logits, pseudo_labels], [2, 1])
  chex.assert_axis_dimension(logits, 1, num_clusters)
  chex.assert_equal_shape_prefix([logits, pseudo_labels], 1)
  if sizes is None:
    sizes = cluster_sizes(pseudo_labels, num_clusters, axis_name)
  wts = 1.0 / jnp.maximum(sizes[pseudo_labels], 1.0)
  ce = (jax.nn.logsumexp(logits, axis=1)
        - jnp.take_along_axis(logits, pseudo_labels[:, None], 1)[:, 0])
  return psum(jnp.sum(wts * ce), axis_name) / jnp.maximum(
      psum(jnp.sum(wts), axis_name), 1e-12)


def _token_ce(logits, targets, weights, axis_name):
  """Weighted mean token cross-entropy over the global batch."""
  ce = (jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        - jnp.take_along_axis(logits.astype(jnp.float32), targets[..., None],
                              -1)[..., 0])
  w = weights.astype(jnp.float32)
  return psum(jnp.sum(jnp.where(w > 0, w * ce, 0.0)), axis_name) / (
      jnp.maximum(psum(jnp.sum(w), axis_name), 1.0))


def masked_lm_loss(logits, target_ids, mlm_mask, axis_name=None):
  """Mean CE over masked positions only.

  Args:
    logits: f32[B, L, V]; target_ids: i32[B, L] original tokens;
    mlm_mask: [B, L] 1 where a token was selected for prediction (never
      padding, see `mask_tokens_for_mlm`).
  Returns:
    f32[]; 0 when nothing is masked.
  """
  chex.assert_rank([logits, target_ids, mlm_mask], [3, 2, 2])
  chex.assert_equal_shape([target_ids, mlm_mask])
  chex.assert_equal_shape_prefix([logits, target_ids], 2)
  return _token_ce(logits, target_ids, mlm_mask, axis_name)


def causal_lm_loss(logits, ids, valid_mask, axis_name=None):
  """Next-token CE: logits at t predict ids at t + 1 (both positions valid).

  Args:
    logits: f32[B, L, V]; ids: i32[B, L]; valid_mask: [B, L] 1 for tokens.
  Returns:
    f32[].
  """
  chex.assert_rank([logits, ids, valid_mask], [3, 2, 2])
  chex.assert_equal_shape([ids, valid_mask])
  chex.assert_equal_shape_prefix([logits, ids], 2)
  v = valid_mask > 0
  return _token_ce(logits[:, :-1], ids[:, 1:], v[:, 1:] & v[:, :-1],
                   axis_name)


def mask_tokens_for_mlm(key, ids, valid_mask, mask_token_id, vocab_size,
                        special_token_ids=(), rate=0.15):
  """BERT masking: select `rate` of the maskable tokens; 80% -> mask token,
  10% -> a random non-special token, 10% unchanged.

  Args:
    key: PRNG key; ids: i32[B, L]; valid_mask: [B, L] (0 = padding).
    mask_token_id, vocab_size: ints; special_token_ids: ids never selected and
      never drawn as random replacements (e.g. CLS, SEP, PAD).
  Returns:
    (input_ids i32[B, L], mlm_mask i32[B, L] 1 where the loss applies).
  """
  chex.assert_rank([ids, valid_mask], 2)
  chex.assert_equal_shape([ids, valid_mask])
  special = sorted({int(t) for t in special_token_ids}
                   | {int(mask_token_id)})
  special = [t for t in special if 0 <= t < vocab_size]
  if len(special) >= vocab_size:
    raise ValueError("mask_tokens_for_mlm: every vocabulary id is special")
  k_sel, k_kind, k_rand = jax.random.split(key, 3)
  maskable = (valid_mask > 0) & ~jnp.isin(
      ids, jnp.asarray(sorted({int(t) for t in special_token_ids}) or [-1]))
  selected = maskable & (jax.random.uniform(k_sel, ids.shape) < rate)
  kind = jax.random.uniform(k_kind, ids.shape)
  # Draw from [0, V - #special) and step over the special ids in order.
  rand = jax.random.randint(k_rand, ids.shape, 0, vocab_size - len(special))
  for t in special:
    rand = rand + (rand >= t)
  out = jnp.where(selected & (kind < 0.8), mask_token_id, ids)
  out = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), rand, out)
  return out.astype(ids.dtype), selected.astype(jnp.int32)
