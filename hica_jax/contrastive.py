"""Contrastive building blocks shared by the HiCA losses (losses.py) and the
stage-1 objectives (pretrain_losses.py): L2 normalisation, the data-axis
collectives, positive sets and row-wise InfoNCE (plain or streamed over column
chunks), and `contrastive_loss_from_logits` on a full similarity matrix.

Every function here and in the loss modules is pure and runs under `jax.jit`;
functions that take `axis_name` also run inside `jax.shard_map` / `jax.pmap`,
where their array arguments are the per-device rows of the global batch.

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

# Finite stand-in for -inf: exp underflows to exactly 0 in float32, and
# fully-masked rows stay finite, so `where` never routes a NaN into gradients.
NEG = -1e9
TARGETS = ("multi_positive", "soft")


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / ||x|| along `axis`; zero vectors stay zero (finite gradient)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True),
                                       eps))


def gather(x, axis_name):
  """[B_local, ...] -> [B, ...] in device order; differentiable."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name,
                                                        tiled=True)


def psum(x, axis_name):
  """Sum over the data axis; x itself when axis_name is None."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def row_offset(n_local, axis_name):
  """Global index of this device's first row."""
  if axis_name is None:
    return 0
  return jax.lax.axis_index(axis_name) * n_local


def check_targets(targets):
  """Raises unless `targets` is one of TARGETS."""
  if targets not in TARGETS:
    raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")


def mean_over_axis(local_sum, count, axis_name):
  """Global sum of the per-device `local_sum` over the global `count` (>= 1)."""
  return psum(local_sum, axis_name) / jnp.maximum(count, 1.0)


# ----------------------------------------------------------------------------
# Row-wise InfoNCE with positive sets, plain or streamed over column chunks.
# ----------------------------------------------------------------------------


def chunk_stats(logits, pos, col_valid, targets):
  """Per-row statistics of one column block.

  logits f32[R, C]; pos bool[R, C] (subset of valid columns);
  col_valid bool[C]. Returns (lse_all, tgt, npos), each f32[R]: logsumexp over
  valid columns, the target term (logsumexp over positives for
  'multi_positive', sum of positive logits for 'soft') and #positives.
  """
  lse_all = jax.nn.logsumexp(jnp.where(col_valid[None], logits, NEG), axis=1)
  npos = jnp.sum(pos, axis=1).astype(jnp.float32)
  if targets == "multi_positive":
    tgt = jax.nn.logsumexp(jnp.where(pos, logits, NEG), axis=1)
  else:
    tgt = jnp.sum(jnp.where(pos, logits, 0.0), axis=1)
  return lse_all, tgt, npos


def row_losses(lse_all, tgt, npos, targets):
  """Cross-entropy per row from the statistics of `chunk_stats`."""
  if targets == "multi_positive":
    loss = lse_all - tgt  # -log sum_{j in pos} softmax_j
  else:
    loss = lse_all - tgt / jnp.maximum(npos, 1.0)  # CE against uniform Q
  return jnp.where(npos > 0, loss, 0.0)


def positives(row_gidx, row_key, col_gidx, col_key, col_valid):
  """Positive pairs: the example itself, or equal keys (keys < 0: none)."""
  same_key = (row_key[:, None] == col_key[None]) & (row_key[:, None] >= 0)
  return ((row_gidx[:, None] == col_gidx[None]) | same_key) & col_valid[None]


def column_blocks(cols, chunk_size):
  """Columns cut into blocks for streaming over `jax.lax.map`.

  cols: dict with 'emb' [C, ...], 'gidx' i32[C], 'key' i32[C], 'valid'
  bool[C]. Returns the same keys, each [ceil(C / chunk_size), chunk_size, ...];
  padding columns are invalid (emb 0, gidx and key -1, valid False).
  """
  num_cols = cols["gidx"].shape[0]
  num_chunks = -(-num_cols // chunk_size)
  pad = num_chunks * chunk_size - num_cols
  fill = {"emb": 0, "gidx": -1, "key": -1, "valid": False}
  return {
      k: jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1),
                 constant_values=fill[k]).reshape(
                     (num_chunks, chunk_size) + v.shape[1:])
      for k, v in cols.items()}


def _streamed_row_losses(logit_fn, row_gidx, row_key, cols, chunk_size,
                         targets):
  """CE of each row against all columns, optionally streamed over chunks.

  logit_fn: col_emb [c, ...] -> f32[R, c]. cols: dict with 'emb' [C, ...],
  'gidx' i32[C], 'key' i32[C], 'valid' bool[C]. With `chunk_size`, columns are
  processed in blocks under `jax.checkpoint`, so forward and backward keep
  O(R x chunk_size) logits alive. Returns f32[R].
  """
  def stats(c):
    pos = positives(row_gidx, row_key, c["gidx"], c["key"], c["valid"])
    return chunk_stats(logit_fn(c["emb"]), pos, c["valid"], targets)

  num_cols = cols["gidx"].shape[0]
  if chunk_size is None or chunk_size >= num_cols:
    return row_losses(*stats(cols), targets)
  blocks = column_blocks(cols, chunk_size)
  lse, tgt, npos = jax.lax.map(jax.checkpoint(stats), blocks)  # [n, R] each
  lse_all = jax.nn.logsumexp(lse, axis=0)
  if targets == "multi_positive":
    tgt = jax.nn.logsumexp(tgt, axis=0)
  else:
    tgt = jnp.sum(tgt, axis=0)
  return row_losses(lse_all, tgt, jnp.sum(npos, axis=0), targets)


def symmetric_infonce(a, b, logit_scale, keys, valid, axis_name, chunk_size,
                      targets):
  """Symmetric InfoNCE between paired rows a_i <-> b_i.

  a, b f32[B_local, d] (normalised here); keys i32[B_local] (equal keys >= 0
  are positives, the pair itself always is); valid bool[B_local] (invalid
  examples are neither rows nor columns). Returns (sum over this device's
  valid rows of (CE_a + CE_b) / 2, global number of valid rows).
  """
  a, b = l2_normalize(a), l2_normalize(b)
  n_local = a.shape[0]
  row_gidx = row_offset(n_local, axis_name) + jnp.arange(n_local)
  cols = {"gidx": gather(row_gidx, axis_name), "key": gather(keys, axis_name),
          "valid": gather(valid, axis_name)}
  ce_a = _streamed_row_losses(
      lambda e: logit_scale * a @ e.T, row_gidx, keys,
      dict(cols, emb=gather(b, axis_name)), chunk_size, targets)
  ce_b = _streamed_row_losses(
      lambda e: logit_scale * b @ e.T, row_gidx, keys,
      dict(cols, emb=gather(a, axis_name)), chunk_size, targets)
  local_sum = jnp.sum(jnp.where(valid, 0.5 * (ce_a + ce_b), 0.0))
  return local_sum, psum(jnp.sum(valid.astype(jnp.float32)), axis_name)


def contrastive_loss_from_logits(logits, labels=None, valid=None,
                                 targets="multi_positive"):
  """Symmetric InfoNCE on a full similarity matrix (single device).

  The same function as `losses.global_contrastive_loss` with S = s * G U^T given
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
  check_targets(targets)
  n = logits.shape[0]
  chex.assert_shape(logits, (n, n))
  keys = (jnp.full((n,), -1, jnp.int32) if labels is None
          else labels.astype(jnp.int32))
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  idx = jnp.arange(n)
  pos = positives(idx, keys, idx, keys, valid)
  ce = [row_losses(*chunk_stats(m, pos, valid, targets), targets)
        for m in (logits, logits.T)]
  total = jnp.sum(jnp.where(valid, 0.5 * (ce[0] + ce[1]), 0.0))
  return total / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)

