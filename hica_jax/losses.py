"""HiCA stage-2 losses: the global term (label-aware softmax InfoNCE, or
SigLIP's pairwise sigmoid), the local ROI / phrase term, the cross-category
term with its prototypes, and their weighted sum `hica_loss` with the helpers
that decide which terms are active (`loss_weights`, `text_inputs_needed`).

Pure and jit-able; functions that take `axis_name` also run inside
`jax.shard_map` / `jax.pmap` on the per-device rows of the global batch, with
the distributed form, gradient semantics and conventions (logit scales are
multipliers; embeddings are L2-normalised inside) of hica_jax/contrastive.py.
Stage-1 objectives are in hica_jax/pretrain_losses.py.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from hica_jax.contrastive import (NEG, check_targets, chunk_stats,
                                  column_blocks, gather, l2_normalize,
                                  mean_over_axis, positives, psum, row_losses,
                                  row_offset, symmetric_infonce)


# ----------------------------------------------------------------------------
# Stage 2: global, local, cross-category.
# ----------------------------------------------------------------------------


def _pair_keys(labels, n):
  """i32[n]: the labels that make same-class pairs positives, or -1 (only
  the diagonal) without labels."""
  if labels is None:
    return jnp.full((n,), -1, jnp.int32)
  chex.assert_shape(labels, (n,))
  return labels.astype(jnp.int32)


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
  check_targets(targets)
  n = image_emb.shape[0]
  keys = _pair_keys(labels, n)
  local_sum, count = symmetric_infonce(
      image_emb, text_emb, logit_scale, keys, jnp.ones((n,), bool), axis_name,
      chunk_size, targets)
  return mean_over_axis(local_sum, count, axis_name)


def _sigmoid_row_sums(a, row_gidx, row_key, cols, logit_scale, logit_bias,
                      chunk_size):
  """sum_j -log sigmoid(z_ij (s a_i.e_j + b)) per row, optionally streamed.

  a f32[R, d] (normalised); cols as in `_streamed_row_losses` ('emb' [C, d]
  normalised). z_ij = +1 for positives (`positives`), -1 otherwise; invalid
  columns add nothing. With `chunk_size`, column blocks run under
  `jax.checkpoint` (O(R x chunk_size) logits alive). Returns f32[R].
  """
  def block(c):
    logits = logit_scale * a @ c["emb"].T + logit_bias
    pos = positives(row_gidx, row_key, c["gidx"], c["key"], c["valid"])
    nll = -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))
    return jnp.sum(jnp.where(c["valid"][None], nll, 0.0), axis=1)

  num_cols = cols["gidx"].shape[0]
  if chunk_size is None or chunk_size >= num_cols:
    return block(cols)
  blocks = column_blocks(cols, chunk_size)
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
  keys = _pair_keys(labels, n)
  a, b = l2_normalize(image_emb), l2_normalize(text_emb)
  row_gidx = row_offset(n, axis_name) + jnp.arange(n)
  cols = {"emb": gather(b, axis_name), "gidx": gather(row_gidx, axis_name),
          "key": gather(keys, axis_name),
          "valid": gather(jnp.ones((n,), bool), axis_name)}
  rows = _sigmoid_row_sums(a, row_gidx, keys, cols, logit_scale, logit_bias,
                           chunk_size)
  count = psum(jnp.float32(n), axis_name)
  return mean_over_axis(jnp.sum(rows), count, axis_name)


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
  return jax.nn.logsumexp(jnp.where(tok, gamma * cos, NEG), axis=-1) / gamma


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
  check_targets(targets)
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
    local_sum, count = symmetric_infonce(
        roi_emb, phrase_emb, logit_scale, keys, valid, axis_name, chunk_size,
        targets)
    return mean_over_axis(local_sum, count, axis_name), count
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
  row_gidx = row_offset(n, axis_name) + jnp.arange(n)
  col_gidx = gather(row_gidx, axis_name)
  col_key = gather(keys, axis_name)
  col_valid = gather(valid, axis_name)
  # Rows: this device's images vs every phrase. The phrase-side rows (every
  # image vs this device's phrases) are the same matrix transposed across
  # devices, so all_to_all moves them instead of gathering patch tensors.
  rows = _attention_row_logits(
      patch_emb, gather(phrase_tokens, axis_name),
      gather(phrase_mask, axis_name), logit_scale, attn_scale, gamma,
      chunk_size)
  cols = (rows.T if axis_name is None else
          jax.lax.all_to_all(rows, axis_name, 1, 0, tiled=True).T)
  pos = positives(row_gidx, keys, col_gidx, col_key, col_valid)
  ce_img = row_losses(*chunk_stats(rows, pos, col_valid, targets), targets)
  ce_txt = row_losses(*chunk_stats(cols, pos, col_valid, targets), targets)
  local_sum = jnp.sum(jnp.where(valid, 0.5 * (ce_img + ce_txt), 0.0))
  count = psum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  return mean_over_axis(local_sum, count, axis_name), count


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
  count = psum(jnp.float32(image_emb.shape[0]), axis_name)
  return (mean_over_axis(jnp.sum(ce), count, axis_name)
          + beta * prototype_separation_penalty(prototypes, margin))


_WEIGHT_KEYS = {"global", "local", "cross", "beta", "margin", "local_mode",
                "label_aware", "chunk_size"}
_OPTIONAL_WEIGHT_KEYS = {"targets": "multi_positive", "attn_scale": 4.0,
                         "phrases": "roi",
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
      "phrases": loss_config.get("phrases", "roi"),
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
      `global_form` ('softmax': InfoNCE; 'sigmoid': `global_sigmoid_loss`),
      `phrases` ('roi': local positives share a phrase; 'class': examples
      carry class phrases and local positives share a label).
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
    keys = batch["phrase_id"]
    if w["phrases"] == "class":
      _require(batch, ["label"], "batch", "class phrases")
      keys = jnp.where(keys >= 0, batch["label"], -1)
    loss_l, local_count = _local_terms(
        outputs["patch_emb"], s, w["local_mode"], batch.get("roi_mask"),
        outputs.get("phrase_emb"), outputs.get("phrase_tokens"),
        batch.get("phrase_mask"), keys, batch["has_roi"],
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
