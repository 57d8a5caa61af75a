"""HiCA losses (stage 1 and stage 2), k-means and MLM masking.

Every function is pure and runs under `jax.jit`; functions that take
`axis_name` also run inside `jax.shard_map` / `jax.pmap`, where their array
arguments are the per-device rows of the global batch.

Distributed form: embeddings are all-gathered over `axis_name` (tiled, in
device order), each device computes the loss rows of its own examples against
every column (memory O(B_local x B), or O(B_local x chunk_size) with
`chunk_size`) and the per-row sums are `psum`-reduced, so the returned value is
the loss of the global batch, identical on every device.

Gradients follow JAX's transpose of `psum`:
- `jax.grad` taken outside `shard_map`, or inside `shard_map(check_vma=True)`:
  exactly the gradient of the global-batch loss.
- `jax.grad` taken inside `pmap` or `shard_map(check_vma=False)`: per-device
  gradients are `axis_size` times this device's share, so `lax.pmean` of the
  parameter gradients (the usual data-parallel step) gives the exact gradient.

Logit scales are multipliers s (already exp'd and clipped), not log-scales.
All embeddings are L2-normalised inside the losses (idempotent).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf: exp underflows to exactly 0 in float32, and
# fully-masked rows stay finite, so `where` never routes a NaN into gradients.
_NEG = -1e9
_TARGETS = ("multi_positive", "soft")


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / ||x|| along `axis`; zero vectors stay zero (finite gradient)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True),
                                       eps))


def _gather(x, axis_name):
  """[B_local, ...] -> [B, ...] in device order; differentiable."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name,
                                                        tiled=True)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _row_offset(n_local, axis_name):
  """Global index of this device's first row."""
  if axis_name is None:
    return 0
  return jax.lax.axis_index(axis_name) * n_local


def _check_targets(targets):
  if targets not in _TARGETS:
    raise ValueError(f"targets must be one of {_TARGETS}, got {targets!r}")


# ----------------------------------------------------------------------------
# Row-wise InfoNCE with positive sets, plain or streamed over column chunks.
# ----------------------------------------------------------------------------


def _chunk_stats(logits, pos, col_valid, targets):
  """Per-row statistics of one column block.

  logits f32[R, C]; pos bool[R, C] (subset of valid columns);
  col_valid bool[C]. Returns (lse_all, tgt, npos), each f32[R]: logsumexp over
  valid columns, the target term (logsumexp over positives for
  'multi_positive', sum of positive logits for 'soft') and #positives.
  """
  lse_all = jax.nn.logsumexp(jnp.where(col_valid[None], logits, _NEG), axis=1)
  npos = jnp.sum(pos, axis=1).astype(jnp.float32)
  if targets == "multi_positive":
    tgt = jax.nn.logsumexp(jnp.where(pos, logits, _NEG), axis=1)
  else:
    tgt = jnp.sum(jnp.where(pos, logits, 0.0), axis=1)
  return lse_all, tgt, npos


def _row_losses(lse_all, tgt, npos, targets):
  """Cross-entropy per row from the statistics of `_chunk_stats`."""
  if targets == "multi_positive":
    loss = lse_all - tgt  # -log sum_{j in pos} softmax_j
  else:
    loss = lse_all - tgt / jnp.maximum(npos, 1.0)  # CE against uniform Q
  return jnp.where(npos > 0, loss, 0.0)


def _positives(row_gidx, row_key, col_gidx, col_key, col_valid):
  """Positive pairs: the example itself, or equal keys (keys < 0: none)."""
  same_key = (row_key[:, None] == col_key[None]) & (row_key[:, None] >= 0)
  return ((row_gidx[:, None] == col_gidx[None]) | same_key) & col_valid[None]


def _streamed_row_losses(logit_fn, row_gidx, row_key, cols, chunk_size,
                         targets):
  """CE of each row against all columns, optionally streamed over chunks.

  logit_fn: col_emb [c, ...] -> f32[R, c]. cols: dict with 'emb' [C, ...],
  'gidx' i32[C], 'key' i32[C], 'valid' bool[C]. With `chunk_size`, columns are
  processed in blocks under `jax.checkpoint`, so forward and backward keep
  O(R x chunk_size) logits alive. Returns f32[R].
  """
  def stats(c):
    pos = _positives(row_gidx, row_key, c["gidx"], c["key"], c["valid"])
    return _chunk_stats(logit_fn(c["emb"]), pos, c["valid"], targets)

  num_cols = cols["gidx"].shape[0]
  if chunk_size is None or chunk_size >= num_cols:
    return _row_losses(*stats(cols), targets)
  num_chunks = -(-num_cols // chunk_size)
  pad = num_chunks * chunk_size - num_cols
  fill = {"emb": 0, "gidx": -1, "key": -1, "valid": False}
  blocks = {
      k: jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1),
                 constant_values=fill[k]).reshape(
                     (num_chunks, chunk_size) + v.shape[1:])
      for k, v in cols.items()}
  lse, tgt, npos = jax.lax.map(jax.checkpoint(stats), blocks)  # [n, R] each
  lse_all = jax.nn.logsumexp(lse, axis=0)
  if targets == "multi_positive":
    tgt = jax.nn.logsumexp(tgt, axis=0)
  else:
    tgt = jnp.sum(tgt, axis=0)
  return _row_losses(lse_all, tgt, jnp.sum(npos, axis=0), targets)


def _symmetric_infonce(a, b, logit_scale, keys, valid, axis_name, chunk_size,
                       targets):
  """Symmetric InfoNCE between paired rows a_i <-> b_i.

  a, b f32[B_local, d] (normalised here); keys i32[B_local] (equal keys >= 0
  are positives, the pair itself always is); valid bool[B_local] (invalid
  examples are neither rows nor columns). Returns (sum over this device's
  valid rows of (CE_a + CE_b) / 2, global number of valid rows).
  """
  a, b = l2_normalize(a), l2_normalize(b)
  n_local = a.shape[0]
  row_gidx = _row_offset(n_local, axis_name) + jnp.arange(n_local)
  cols = {"gidx": _gather(row_gidx, axis_name), "key": _gather(keys, axis_name),
          "valid": _gather(valid, axis_name)}
  ce_a = _streamed_row_losses(
      lambda e: logit_scale * a @ e.T, row_gidx, keys,
      dict(cols, emb=_gather(b, axis_name)), chunk_size, targets)
  ce_b = _streamed_row_losses(
      lambda e: logit_scale * b @ e.T, row_gidx, keys,
      dict(cols, emb=_gather(a, axis_name)), chunk_size, targets)
  local_sum = jnp.sum(jnp.where(valid, 0.5 * (ce_a + ce_b), 0.0))
  return local_sum, _psum(jnp.sum(valid.astype(jnp.float32)), axis_name)


def contrastive_loss_from_logits(logits, labels=None, valid=None,
                                 targets="multi_positive"):
  """Symmetric InfoNCE on a full similarity matrix (single device).

  The same function as `global_contrastive_loss` with S = s * G U^T given
  directly, for other similarities (e.g. attention scores) and for analysis.

  Args:
    logits: f32[B, B], S_ij = similarity of image i and text j.
    labels: i32[B] or None (diagonal positives only).
    valid: bool[B] or None; invalid examples are neither rows nor columns.
    targets: 'multi_positive' or 'soft'.
  Returns:
    f32[]: mean over valid rows of (CE(S) + CE(S^T)) / 2.
  """
  chex.assert_rank(logits, 2)
  _check_targets(targets)
  n = logits.shape[0]
  chex.assert_shape(logits, (n, n))
  keys = (jnp.full((n,), -1, jnp.int32) if labels is None
          else labels.astype(jnp.int32))
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  idx = jnp.arange(n)
  pos = _positives(idx, keys, idx, keys, valid)
  ce = [_row_losses(*_chunk_stats(m, pos, valid, targets), targets)
        for m in (logits, logits.T)]
  total = jnp.sum(jnp.where(valid, 0.5 * (ce[0] + ce[1]), 0.0))
  return total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def _mean_over_axis(local_sum, count, axis_name):
  return _psum(local_sum, axis_name) / jnp.maximum(count, 1.0)


# ----------------------------------------------------------------------------
# Stage 2: global, local, cross-category.
# ----------------------------------------------------------------------------


def global_contrastive_loss(image_emb, text_emb, logit_scale, labels=None,
                            axis_name=None, chunk_size=None,
                            targets="multi_positive"):
  """Label-aware symmetric InfoNCE on S = s * G U^T.

  Args:
    image_emb: f32[B_local, d] image embeddings G (normalised here).
    text_emb: f32[B_local, d] paired text embeddings U (normalised here).
    logit_scale: f32[] multiplier s.
    labels: i32[B_local] or None. With labels, pairs of one class are
      positives; without, only the diagonal (plain CLIP loss).
    axis_name: mesh/pmap axis the batch is split over, or None.
    chunk_size: None, or the column block size for the streamed form.
    targets: 'multi_positive' (-log of the softmax mass on the positives;
      its gradient never lowers a positive logit) or 'soft' (cross-entropy
      against Q_ij = 1[y_i = y_j] / n_{y_i}). Identical without labels.
  Returns:
    f32[]: the global-batch loss (CE(S) + CE(S^T)) / 2, averaged over rows.
  """
  chex.assert_rank([image_emb, text_emb], 2)
  chex.assert_equal_shape([image_emb, text_emb])
  _check_targets(targets)
  n = image_emb.shape[0]
  if labels is None:
    keys = jnp.full((n,), -1, jnp.int32)
  else:
    chex.assert_shape(labels, (n,))
    keys = labels.astype(jnp.int32)
  local_sum, count = _symmetric_infonce(
      image_emb, text_emb, logit_scale, keys, jnp.ones((n,), bool), axis_name,
      chunk_size, targets)
  return _mean_over_axis(local_sum, count, axis_name)


def _sigmoid_row_sums(a, row_gidx, row_key, cols, logit_scale, logit_bias,
                      chunk_size):
  """sum_j -log sigmoid(z_ij (s a_i.e_j + b)) per row, optionally streamed.

  a f32[R, d] (normalised); cols as in `_streamed_row_losses` ('emb' [C, d]
  normalised). z_ij = +1 for positives (`_positives`), -1 otherwise; invalid
  columns add nothing. With `chunk_size`, column blocks run under
  `jax.checkpoint` (O(R x chunk_size) logits alive). Returns f32[R].
  """
  def block(c):
    logits = logit_scale * a @ c["emb"].T + logit_bias
    pos = _positives(row_gidx, row_key, c["gidx"], c["key"], c["valid"])
    nll = -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))
    return jnp.sum(jnp.where(c["valid"][None], nll, 0.0), axis=1)

  num_cols = cols["gidx"].shape[0]
  if chunk_size is None or chunk_size >= num_cols:
    return block(cols)
  num_chunks = -(-num_cols // chunk_size)
  pad = num_chunks * chunk_size - num_cols
  fill = {"emb": 0, "gidx": -1, "key": -1, "valid": False}
  blocks = {
      k: jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1),
                 constant_values=fill[k]).reshape(
                     (num_chunks, chunk_size) + v.shape[1:])
      for k, v in cols.items()}
  return jnp.sum(jax.lax.map(jax.checkpoint(block), blocks), axis=0)


def global_sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias,
                        labels=None, axis_name=None, chunk_size=None):
  """SigLIP's pairwise sigmoid loss on S = s * G U^T + b, label-aware.

  L = -1/B sum_ij log sigmoid(z_ij S_ij), z_ij = +1 when image i and text j
  are positives (i = j, or equal labels when `labels` is given), else -1;
  B is the global batch (SigLIP's normalisation).

  Args:
    image_emb, text_emb: f32[B_local, d] (normalised here).
    logit_scale: f32[] multiplier s; logit_bias: f32[] bias b.
    labels: i32[B_local] or None (diagonal positives only).
    axis_name: the data axis, or None. Each device scores its images against
      every text (all-gathered), so the result is the global-batch loss.
    chunk_size: None, or the column block size for the streamed form.
  Returns:
    f32[].
  """
  chex.assert_rank([image_emb, text_emb], 2)
  chex.assert_equal_shape([image_emb, text_emb])
  n = image_emb.shape[0]
  if labels is None:
    keys = jnp.full((n,), -1, jnp.int32)
  else:
    chex.assert_shape(labels, (n,))
    keys = labels.astype(jnp.int32)
  a, b = l2_normalize(image_emb), l2_normalize(text_emb)
  row_gidx = _row_offset(n, axis_name) + jnp.arange(n)
  cols = {"emb": _gather(b, axis_name), "gidx": _gather(row_gidx, axis_name),
          "key": _gather(keys, axis_name),
          "valid": _gather(jnp.ones((n,), bool), axis_name)}
  rows = _sigmoid_row_sums(a, row_gidx, keys, cols, logit_scale, logit_bias,
                           chunk_size)
  count = _psum(jnp.float32(n), axis_name)
  return _mean_over_axis(jnp.sum(rows), count, axis_name)


def patch_grid(num_patches, grid=None):
  """(gh, gw) of a patch sequence: `grid` if given, else a square grid."""
  if grid is not None:
    gh, gw = grid
    if gh * gw != num_patches:
      raise ValueError(f"grid {grid} does not match {num_patches} patches")
    return int(gh), int(gw)
  side = int(round(np.sqrt(num_patches)))
  if side * side != num_patches:
    raise ValueError(
        f"{num_patches} patches is not a square grid; pass grid=(gh, gw)")
  return side, side


def roi_patch_weights(roi_mask, grid):
  """Fraction of each patch covered by the ROI.

  Args:
    roi_mask: f32[B, H, W] in [0, 1] at image resolution (H = gh * ph,
      W = gw * pw) or already at patch resolution [B, gh, gw].
    grid: (gh, gw).
  Returns:
    f32[B, gh * gw]: the mask average-pooled over each patch, row-major.
  """
  chex.assert_rank(roi_mask, 3)
  b, h, w = roi_mask.shape
  gh, gw = grid
  if h % gh or w % gw:
    raise ValueError(
        f"roi_mask of size {h}x{w} cannot be pooled onto a {gh}x{gw} patch "
        "grid; resize masks with the images to a multiple of the patch size")
  m = roi_mask.astype(jnp.float32).reshape(b, gh, h // gh, gw, w // gw)
  return m.mean(axis=(2, 4)).reshape(b, gh * gw)


def roi_pool(patch_emb, roi_mask, grid=None):
  """ROI embedding r_i = normalise(sum_n m_in P_in / sum_n m_in).

  Args:
    patch_emb: f32[B, N, d] patch embeddings.
    roi_mask: f32[B, H, W] (image resolution) or f32[B, gh, gw].
    grid: (gh, gw) or None for a square grid.
  Returns:
    (roi_emb f32[B, d] normalised (zero where the mask is empty),
     mass f32[B] = sum_n m_in, the ROI area in patches).
  """
  chex.assert_rank(patch_emb, 3)
  b, n, _ = patch_emb.shape
  chex.assert_axis_dimension(roi_mask, 0, b)
  m = roi_patch_weights(roi_mask, patch_grid(n, grid))
  mass = m.sum(axis=1)
  pooled = jnp.einsum("bn,bnd->bd", m, patch_emb.astype(jnp.float32))
  return l2_normalize(pooled / jnp.maximum(mass, 1e-6)[:, None]), mass


def attention_scores(patch_emb, phrase_tokens, phrase_mask, attn_scale=4.0,
                     gamma=5.0):
  """Word-to-patch attention scores (GLoRIA / MGCA), every image x phrase.

  Each phrase token w_t attends over an image's patches,
  c_t = softmax(attn_scale * w_t . P) P, and the score is
  (1 / gamma) log sum_t exp(gamma cos(w_t, c_t)) over valid tokens.

  Args:
    patch_emb: f32[Bi, N, d]; phrase_tokens: f32[Bp, Lp, d];
    phrase_mask: [Bp, Lp] (nonzero = token).
  Returns:
    f32[Bi, Bp].
  """
  chex.assert_rank([patch_emb, phrase_tokens, phrase_mask], [3, 3, 2])
  p = l2_normalize(patch_emb)
  w = l2_normalize(phrase_tokens)
  # cos(w_t, c_t) = (attn . (P w_t)) / sqrt(attn^T (P P^T) attn): the context
  # vectors c_t [Bi, Bp, Lp, d] are never materialised, only [.., N] tensors.
  sim = jnp.einsum("jtd,ind->ijtn", w, p)
  attn = jax.nn.softmax(attn_scale * sim, axis=-1)
  gram = jnp.einsum("ind,imd->inm", p, p)
  dot = jnp.sum(attn * sim, axis=-1)
  sq_norm = jnp.einsum("ijtn,inm,ijtm->ijt", attn, gram, attn)
  cos = dot * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-12))
  tok = (phrase_mask > 0)[None]
  return jax.nn.logsumexp(jnp.where(tok, gamma * cos, _NEG), axis=-1) / gamma


def _attention_row_logits(patch_local, tokens_all, mask_all, logit_scale,
                          attn_scale, gamma, chunk_size):
  """s * scores of local images vs all phrases, f32[B_local, B].

  With `chunk_size`, phrases are processed in blocks under `jax.checkpoint`,
  bounding the attention tensors to O(B_local x chunk x Lp x N).
  """
  def block(t, m):
    return logit_scale * attention_scores(patch_local, t, m, attn_scale, gamma)

  num = tokens_all.shape[0]
  if chunk_size is None or chunk_size >= num:
    return block(tokens_all, mask_all)
  nc = -(-num // chunk_size)
  pad = nc * chunk_size - num
  t = jnp.pad(tokens_all, ((0, pad), (0, 0), (0, 0)))
  m = jnp.pad(mask_all, ((0, pad), (0, 0)))
  t = t.reshape((nc, chunk_size) + t.shape[1:])
  m = m.reshape((nc, chunk_size) + m.shape[1:])
  out = jax.lax.map(jax.checkpoint(lambda tm: block(*tm)), (t, m))
  return jnp.moveaxis(out, 0, 1).reshape(patch_local.shape[0], -1)[:, :num]


def _local_terms(patch_emb, logit_scale, mode, roi_mask, phrase_emb,
                 phrase_tokens, phrase_mask, phrase_id, has_roi, grid,
                 attn_scale, gamma, targets, axis_name, chunk_size):
  """(loss, global count of contributing examples); see local_alignment_loss."""
  _check_targets(targets)
  chex.assert_rank(patch_emb, 3)
  n = patch_emb.shape[0]
  keys = (jnp.full((n,), -1, jnp.int32) if phrase_id is None
          else phrase_id.astype(jnp.int32))
  roi = (jnp.ones((n,), bool) if has_roi is None else has_roi > 0)
  if mode == "roi":
    if roi_mask is None or phrase_emb is None:
      raise ValueError("local_alignment_loss(mode='roi') needs roi_mask and "
                       "phrase_emb")
    chex.assert_shape(phrase_emb, (n, patch_emb.shape[-1]))
    roi_emb, mass = roi_pool(patch_emb, roi_mask, grid)
    valid = roi & (mass > 0)
    local_sum, count = _symmetric_infonce(
        roi_emb, phrase_emb, logit_scale, keys, valid, axis_name, chunk_size,
        targets)
    return _mean_over_axis(local_sum, count, axis_name), count
  if mode != "attention":
    raise ValueError(f"local mode must be 'roi' or 'attention', got {mode!r}")
  if phrase_tokens is None or phrase_mask is None:
    raise ValueError("local_alignment_loss(mode='attention') needs "
                     "phrase_tokens and phrase_mask")
  chex.assert_rank([phrase_tokens, phrase_mask], [3, 2])
  chex.assert_axis_dimension(phrase_tokens, 0, n)
  # Without masks an example takes part when it has a phrase: an ROI, or a
  # phrase from the bank (phrase_id >= 0), with at least one token.
  valid = (roi | (keys >= 0)) & jnp.any(phrase_mask > 0, axis=1)
  row_gidx = _row_offset(n, axis_name) + jnp.arange(n)
  col_gidx = _gather(row_gidx, axis_name)
  col_key = _gather(keys, axis_name)
  col_valid = _gather(valid, axis_name)
  # Rows: this device's images vs every phrase. The phrase-side rows (every
  # image vs this device's phrases) are the same matrix transposed across
  # devices, so all_to_all moves them instead of gathering patch tensors.
  rows = _attention_row_logits(
      patch_emb, _gather(phrase_tokens, axis_name),
      _gather(phrase_mask, axis_name), logit_scale, attn_scale, gamma,
      chunk_size)
  cols = (rows.T if axis_name is None else
          jax.lax.all_to_all(rows, axis_name, 1, 0, tiled=True).T)
  pos = _positives(row_gidx, keys, col_gidx, col_key, col_valid)
  ce_img = _row_losses(*_chunk_stats(rows, pos, col_valid, targets), targets)
  ce_txt = _row_losses(*_chunk_stats(cols, pos, col_valid, targets), targets)
  local_sum = jnp.sum(jnp.where(valid, 0.5 * (ce_img + ce_txt), 0.0))
  count = _psum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  return _mean_over_axis(local_sum, count, axis_name), count


def local_alignment_loss(patch_emb, logit_scale, mode="roi", *, roi_mask=None,
                         phrase_emb=None, phrase_tokens=None, phrase_mask=None,
                         phrase_id=None, has_roi=None, grid=None,
                         attn_scale=4.0, gamma=5.0, targets="multi_positive",
                         axis_name=None, chunk_size=None):
  """Local (ROI / phrase) alignment loss L_l, symmetric InfoNCE over the batch.

  Args:
    patch_emb: f32[B_local, N, d] patch embeddings.
    logit_scale: f32[] multiplier s.
    mode: 'roi' (pooled ROI vs phrase embedding) or 'attention'
      (word-to-patch attention, no masks).
    roi_mask: f32[B_local, H, W] or [B_local, gh, gw] ('roi').
    phrase_emb: f32[B_local, d] pooled phrase embeddings ('roi').
    phrase_tokens: f32[B_local, Lp, d], phrase_mask: [B_local, Lp]
      ('attention').
    phrase_id: i32[B_local] index in the phrase list, -1 for none; examples
      with the same id >= 0 are positives of each other.
    has_roi: [B_local] 1/0. 'roi': examples without ROI (or with an empty
      mask) carry weight 0. 'attention': examples take part if has_roi or
      phrase_id >= 0, and the phrase has a token.
    grid: (gh, gw) patch grid, None for square.
    attn_scale, gamma: attention sharpness and token aggregation ('attention').
    targets, axis_name, chunk_size: as in `global_contrastive_loss`.
  Returns:
    f32[]: mean over contributing examples of the global batch; 0 if none.
  """
  return _local_terms(patch_emb, logit_scale, mode, roi_mask, phrase_emb,
                      phrase_tokens, phrase_mask, phrase_id, has_roi, grid,
                      attn_scale, gamma, targets, axis_name, chunk_size)[0]


def category_prototypes(descriptor_emb, descriptor_category, num_categories):
  """c_k = normalise(mean over the bank D_k of normalised f_t).

  Args:
    descriptor_emb: f32[D, d] text embeddings of the descriptor bank.
    descriptor_category: i32[D] category of each descriptor.
    num_categories: K (static).
  Returns:
    f32[K, d]; a category without descriptors gets a zero vector.
  """
  chex.assert_rank([descriptor_emb, descriptor_category], [2, 1])
  chex.assert_equal_shape_prefix([descriptor_emb, descriptor_category], 1)
  sums = jax.ops.segment_sum(l2_normalize(descriptor_emb),
                             descriptor_category, num_categories)
  return l2_normalize(sums)


def prototype_separation_penalty(prototypes, margin):
  """mean_{j != k} max(0, cos(c_j, c_k) - margin)^2 over categories; f32[]."""
  chex.assert_rank(prototypes, 2)
  k = prototypes.shape[0]
  if k < 2:
    return jnp.zeros((), jnp.float32)
  c = l2_normalize(prototypes)
  cos = c @ c.T
  off = ~jnp.eye(k, dtype=bool)
  return jnp.sum(jnp.where(off, jax.nn.relu(cos - margin) ** 2, 0.0)) / (
      k * (k - 1))


def cross_category_loss(image_emb, labels, prototypes, logit_scale, beta=0.1,
                        margin=0.2, axis_name=None):
  """L_c = CE(s * G C^T, y) + beta * prototype separation penalty.

  Args:
    image_emb: f32[B_local, d]; labels: i32[B_local] in [0, K).
    prototypes: f32[K, d] (replicated); logit_scale: f32[] multiplier s.
    beta, margin: weight and cosine margin of the separation penalty.
  Returns:
    f32[]: global-batch mean CE plus the penalty.
  """
  chex.assert_rank([image_emb, labels, prototypes], [2, 1, 2])
  chex.assert_equal_shape_prefix([image_emb, labels], 1)
  logits = logit_scale * l2_normalize(image_emb) @ l2_normalize(prototypes).T
  onehot = jax.nn.one_hot(labels, prototypes.shape[0])
  ce = jax.nn.logsumexp(logits, axis=1) - jnp.sum(onehot * logits, axis=1)
  count = _psum(jnp.float32(image_emb.shape[0]), axis_name)
  return (_mean_over_axis(jnp.sum(ce), count, axis_name)
          + beta * prototype_separation_penalty(prototypes, margin))


_WEIGHT_KEYS = {"global", "local", "cross", "beta", "margin", "local_mode",
                "label_aware", "chunk_size"}
_OPTIONAL_WEIGHT_KEYS = {"targets": "multi_positive", "attn_scale": 4.0,
                         "gamma": 5.0, "grid": None, "global_form": "softmax"}
GLOBAL_FORMS = ("softmax", "sigmoid")


def _require(d, keys, what, why):
  missing = [k for k in keys if k not in d]
  if missing:
    raise KeyError(f"hica_loss: {what} is missing {missing} ({why})")


def loss_weights(loss_config):
  """config.stage2.loss -> the static `weights` dict hica_loss takes.

  The one place that decides which terms are active: a term with weight 0
  is neither computed nor are its text inputs embedded (text_inputs_needed).
  """
  return {
      "global": float(loss_config.global_weight),
      "local": float(loss_config.local_weight),
      "cross": float(loss_config.cross_weight),
      "beta": float(loss_config.beta),
      "margin": float(loss_config.margin),
      "local_mode": loss_config.local_mode,
      "label_aware": bool(loss_config.label_aware),
      "targets": loss_config.get("targets", "multi_positive"),
      "chunk_size": loss_config.get("chunk_size"),
      "global_form": loss_config.get("global_form", "softmax"),
  }


def text_inputs_needed(weights):
  """Which text-tower inputs the nonzero terms of `weights` read:
  (texts for L_g, phrases for L_l, descriptor prototypes for L_c); None
  means all. Global-only training embeds B texts per step, as CLIP does,
  not 2B + D sequences."""
  if weights is None:
    return True, True, True
  return bool(weights["global"]), bool(weights["local"]), \
      bool(weights["cross"])


def hica_loss(outputs, batch, weights, axis_name=None):
  """L_HiCA = w_g L_g + w_l L_l + w_c L_c.

  Args:
    outputs: `image_emb` [B,d], `patch_emb` [B,N,d], `text_emb` [B,d],
      `phrase_emb` [B,d], `phrase_tokens` [B,Lp,d], `prototypes` [K,d],
      `logit_scale` [] (multiplier), `logit_bias` [] (global_form 'sigmoid').
      B is the per-device batch with axis_name.
    batch: `label` [B], `roi_mask` [B,H,W] or [B,gh,gw], `has_roi` [B],
      `phrase_id` [B], `phrase_mask` [B,Lp].
    weights: python values `global`, `local`, `cross`, `beta`, `margin`,
      `local_mode` ('roi'|'attention'), `label_aware` (bool), `chunk_size`
      (None|int); optional `targets`, `attn_scale`, `gamma`, `grid`,
      `global_form` ('softmax': InfoNCE; 'sigmoid': `global_sigmoid_loss`).
      A term whose weight is 0 is not computed (its metric is 0).
    axis_name: the data axis, or None.
  Returns:
    (loss f32[], metrics dict of f32[]: loss, loss_global, loss_local,
     loss_cross, local_count, prototype_penalty, logit_scale).
  """
  _require(weights, sorted(_WEIGHT_KEYS), "weights", "see docs/design.md")
  unknown = set(weights) - _WEIGHT_KEYS - set(_OPTIONAL_WEIGHT_KEYS)
  if unknown:
    raise KeyError(f"hica_loss: unknown weights {sorted(unknown)}; known: "
                   f"{sorted(_WEIGHT_KEYS | set(_OPTIONAL_WEIGHT_KEYS))}")
  w = dict(_OPTIONAL_WEIGHT_KEYS, **weights)
  s = outputs["logit_scale"]
  zero = jnp.zeros((), jnp.float32)
  loss_g = loss_l = loss_c = local_count = penalty = zero
  if w["global_form"] not in GLOBAL_FORMS:
    raise ValueError(f"stage2.loss.global_form={w['global_form']!r}: expected "
                     f"one of {GLOBAL_FORMS}")
  if w["global"] and w["global_form"] == "sigmoid":
    _require(outputs, ["image_emb", "text_emb", "logit_bias"], "outputs",
             "sigmoid global term")
    _require(batch, ["label"] if w["label_aware"] else [], "batch",
             "label_aware global term")
    loss_g = global_sigmoid_loss(
        outputs["image_emb"], outputs["text_emb"], s, outputs["logit_bias"],
        labels=batch["label"] if w["label_aware"] else None,
        axis_name=axis_name, chunk_size=w["chunk_size"])
  elif w["global"]:
    _require(outputs, ["image_emb", "text_emb"], "outputs", "global term")
    _require(batch, ["label"] if w["label_aware"] else [], "batch",
             "label_aware global term")
    loss_g = global_contrastive_loss(
        outputs["image_emb"], outputs["text_emb"], s,
        labels=batch["label"] if w["label_aware"] else None,
        axis_name=axis_name, chunk_size=w["chunk_size"], targets=w["targets"])
  if w["local"]:
    if w["local_mode"] == "roi":
      _require(outputs, ["patch_emb", "phrase_emb"], "outputs", "local roi")
      _require(batch, ["roi_mask", "has_roi", "phrase_id"], "batch",
               "local roi")
    else:
      _require(outputs, ["patch_emb", "phrase_tokens"], "outputs",
               "local attention")
      _require(batch, ["phrase_mask", "has_roi", "phrase_id"], "batch",
               "local attention")
    loss_l, local_count = _local_terms(
        outputs["patch_emb"], s, w["local_mode"], batch.get("roi_mask"),
        outputs.get("phrase_emb"), outputs.get("phrase_tokens"),
        batch.get("phrase_mask"), batch["phrase_id"], batch["has_roi"],
        w["grid"], w["attn_scale"], w["gamma"], w["targets"], axis_name,
        w["chunk_size"])
  if w["cross"]:
    _require(outputs, ["image_emb", "prototypes"], "outputs", "cross term")
    _require(batch, ["label"], "batch", "cross term")
    loss_c = cross_category_loss(outputs["image_emb"], batch["label"],
                                 outputs["prototypes"], s, w["beta"],
                                 w["margin"], axis_name)
    penalty = prototype_separation_penalty(outputs["prototypes"], w["margin"])
  loss = w["global"] * loss_g + w["local"] * loss_l + w["cross"] * loss_c
  metrics = {"loss": loss, "loss_global": loss_g, "loss_local": loss_l,
             "loss_cross": loss_c, "local_count": local_count,
             "prototype_penalty": penalty,
             "logit_scale": jnp.asarray(s, jnp.float32)}
  return loss, metrics


# ----------------------------------------------------------------------------
# Stage 1: k-means pseudo-labels, cluster classification, language modelling.
# ----------------------------------------------------------------------------


def _sq_dists(x, c):
  """||x_i - c_j||^2, f32[N, k] (clamped at 0)."""
  d2 = (jnp.sum(x * x, 1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, 1)[None])
  return jnp.maximum(d2, 0.0)


def _take_global_rows(x, gidx, axis_name):
  """Rows `gidx` (i32[m]) of the global (sharded) array x, on every device."""
  n = x.shape[0]
  local = gidx - _row_offset(n, axis_name)
  own = (local >= 0) & (local < n)
  rows = jnp.where(own[:, None], x[jnp.clip(local, 0, n - 1)], 0.0)
  return _psum(rows, axis_name)


def _kmeans_pp_init(x, k, key, axis_name):
  """Greedy k-means++ seeding (as in scikit-learn) over the global set.

  Each step samples 2 + log(k) candidates from the all-gathered D^2 weights
  (the same key on every device, so the same draw as on one device) and keeps
  the one that lowers the global potential most; plain k-means++ too often
  seeds two centres in one planted cluster.
  """
  trials = 2 + int(np.log(k))
  keys = jax.random.split(key, k)
  num = _gather(jnp.zeros((x.shape[0],)), axis_name).shape[0]
  first = jax.random.randint(keys[0], (1,), 0, num)
  c0 = _take_global_rows(x, first, axis_name)
  cents = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(c0[0])
  d2 = _sq_dists(x, c0)[:, 0]

  def body(j, carry):
    cents, d2 = carry
    w = _gather(d2, axis_name)
    # All points on existing centres: fall back to uniform sampling.
    logits = jnp.where(jnp.sum(w) > 0, jnp.log(jnp.maximum(w, 0.0)), 0.0)
    idx = jax.random.categorical(keys[j], logits, shape=(trials,))
    cand = _take_global_rows(x, idx, axis_name)  # [trials, d]
    new_d2 = jnp.minimum(d2[:, None], _sq_dists(x, cand))  # [n, trials]
    best = jnp.argmin(_psum(jnp.sum(new_d2, axis=0), axis_name))
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
    sums = _psum(jax.ops.segment_sum(x, assign, k), axis_name)
    counts = _psum(jax.ops.segment_sum(jnp.ones_like(assign, jnp.float32),
                                       assign, k), axis_name)
    sq = _psum(jax.ops.segment_sum(jnp.min(d2, axis=1), assign, k), axis_name)
    cents = jnp.where(counts[:, None] > 0,
                      sums / jnp.maximum(counts, 1.0)[:, None], cents)
    return _reseed_empty(cents, counts, sq, jax.random.fold_in(key_reseed, i))

  cents = jax.lax.fori_loop(0, iters, step, cents)
  assign = jnp.argmin(_sq_dists(x, cents), axis=1).astype(jnp.int32)
  return cents, assign


def cluster_sizes(assignments, k, axis_name=None):
  """Global number of points per cluster, f32[k]."""
  return _psum(jax.ops.segment_sum(jnp.ones(assignments.shape, jnp.float32),
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
  return _psum(jnp.sum(wts * ce), axis_name) / jnp.maximum(
      _psum(jnp.sum(wts), axis_name), 1e-12)


def _token_ce(logits, targets, weights, axis_name):
  """Weighted mean token cross-entropy over the global batch."""
  ce = (jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        - jnp.take_along_axis(logits.astype(jnp.float32), targets[..., None],
                              -1)[..., 0])
  w = weights.astype(jnp.float32)
  return _psum(jnp.sum(jnp.where(w > 0, w * ce, 0.0)), axis_name) / (
      jnp.maximum(_psum(jnp.sum(w), axis_name), 1.0))


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
