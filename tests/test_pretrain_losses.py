"""Tests of hica_jax.pretrain_losses (stage 1): k-means on planted clusters,
sharded k-means, and known answers of the cluster classification, masked /
causal LM losses and MLM masking. Their sharded equivalence and gradients are
checked with the stage-2 terms in tests/test_losses.py."""
import jax
import jax.numpy as jnp
import numpy as np
from harness import assert_trees_close
from jax.sharding import PartitionSpec as P
from sklearn.metrics import adjusted_rand_score

from hica_jax import pretrain_losses
from hica_jax import sharding

NDEV = 8


def _mesh():
  assert jax.device_count() >= NDEV, "tests/conftest.py sets 8 CPU devices"
  return sharding.make_mesh(jax.devices()[:NDEV])


def _planted(seed=0, n=256, k=4, d=5):
  rng = np.random.RandomState(seed)
  centres = rng.randn(k, d) * 5
  truth = rng.permutation(np.arange(n) % k)
  x = centres[truth] + 0.5 * rng.randn(n, d)
  return jnp.asarray(x, jnp.float32), truth


_KM_KEY = jax.random.key(0)
_kmeans4 = jax.jit(lambda x: pretrain_losses.kmeans(x, 4, _KM_KEY, iters=10))


def test_kmeans_recovers_planted_clusters_and_shards_identically():
  x, truth = _planted()
  cents, assign = _kmeans4(x)
  assert adjusted_rand_score(truth, np.asarray(assign)) >= 0.95
  run = lambda x: pretrain_losses.kmeans(x, 4, _KM_KEY, iters=10,
                                         axis_name="data")
  cents_sm, assign_sm = jax.jit(jax.shard_map(
      run, mesh=_mesh(), in_specs=P("data"), out_specs=(P(), P("data")),
      check_vma=False))(x)
  np.testing.assert_array_equal(assign_sm, assign)
  assert_trees_close(cents_sm, cents)
  cents_pm, assign_pm = jax.pmap(run, axis_name="data")(
      x.reshape(NDEV, -1, x.shape[1]))
  np.testing.assert_array_equal(assign_pm.reshape(-1), assign)
  assert_trees_close(cents_pm[3], cents)


def test_kmeans_reseeds_empty_clusters():
  x, truth = _planted(seed=1, k=3)
  # Third centre far from all data: empty after the first assignment.
  init = jnp.stack([x[truth == 0].mean(0), x[truth == 1].mean(0),
                    jnp.full((x.shape[1],), 1e3)])
  run = jax.jit(lambda x, init, iters: pretrain_losses.kmeans(
      x, 3, jax.random.key(1), iters, init_centroids=init))
  _, assign1 = run(x, init, 1)
  assert np.all(np.bincount(np.asarray(assign1), minlength=3) > 0)
  cents, assign = run(x, init, 10)
  assert np.abs(np.asarray(cents)).max() < 100
  assert adjusted_rand_score(truth, np.asarray(assign)) >= 0.95
  # Degenerate pool (all points equal): k-means++ falls back to uniform
  # sampling and stays finite.
  cents, _ = _kmeans4(jnp.ones_like(_planted()[0]))
  assert np.all(np.isfinite(np.asarray(cents)))


def test_cluster_classification_loss_weights_inverse_cluster_size():
  logits = jnp.asarray(np.random.RandomState(0).randn(5, 3), jnp.float32)
  labels = jnp.array([0, 0, 0, 1, 2])
  ce = np.asarray(jax.nn.logsumexp(logits, 1)
                  - logits[jnp.arange(5), labels])
  expected = (ce[:3].mean() + ce[3] + ce[4]) / 3
  assert_trees_close(
      pretrain_losses.cluster_classification_loss(logits, labels, 3), expected)
  sizes = jnp.array([30.0, 10.0, 10.0])
  expected = (ce[:3].sum() / 30 + ce[3] / 10 + ce[4] / 10) / (3 / 30 + 2 / 10)
  assert_trees_close(
      pretrain_losses.cluster_classification_loss(logits, labels, 3, sizes),
      expected)


def test_masked_lm_loss_ignores_unmasked_and_padding():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(2, 5, 7), jnp.float32)
  targets = jnp.asarray(rng.randint(0, 7, (2, 5)))
  mlm = jnp.array([[1, 0, 1, 0, 0], [0, 0, 1, 0, 0]])  # last 2 cols padding
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, targets[..., None], -1)[..., 0]
  assert_trees_close(pretrain_losses.masked_lm_loss(logits, targets, mlm),
                     (ce[0, 0] + ce[0, 2] + ce[1, 2]) / 3)
  noise = jnp.asarray(rng.randn(2, 5, 7) * 100, jnp.float32)
  changed = jnp.where((mlm > 0)[..., None], logits, noise)
  changed_targets = jnp.where(mlm > 0, targets, 0)
  assert_trees_close(
      pretrain_losses.masked_lm_loss(changed, changed_targets, mlm),
      pretrain_losses.masked_lm_loss(logits, targets, mlm))
  assert float(pretrain_losses.masked_lm_loss(logits, targets, 0 * mlm)) == 0.0


def test_mask_tokens_for_mlm_80_10_10_and_never_special_or_padding():
  rng = np.random.RandomState(0)
  vocab, mask_id, specials = 50, 3, (0, 1, 2)
  ids = rng.randint(4, vocab, (400, 64)).astype(np.int32)
  ids[:, 0] = 1  # CLS
  valid = np.ones_like(ids)
  valid[:, 48:] = 0
  ids[:, 48:] = 0  # PAD
  out, sel = pretrain_losses.mask_tokens_for_mlm(
      jax.random.key(0), jnp.asarray(ids), jnp.asarray(valid), mask_id, vocab,
      specials)
  out, sel = np.asarray(out), np.asarray(sel).astype(bool)
  assert not sel[:, 48:].any() and not sel[:, 0].any()
  np.testing.assert_array_equal(out[~sel], ids[~sel])
  maskable = 400 * 47
  assert abs(sel.sum() / maskable - 0.15) < 0.01
  as_mask = (out[sel] == mask_id).mean()
  unchanged = (out[sel] == ids[sel]).mean()
  assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02
  assert not np.isin(out[sel & (out != mask_id)], specials + (mask_id,)).any()


def test_causal_lm_loss_known_answer():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(2, 4, 6), jnp.float32)
  ids = jnp.asarray(rng.randint(0, 6, (2, 4)))
  valid = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
  lp = jax.nn.log_softmax(logits, -1)
  terms = [lp[0, 0, ids[0, 1]], lp[0, 1, ids[0, 2]], lp[0, 2, ids[0, 3]],
           lp[1, 0, ids[1, 1]]]
  assert_trees_close(pretrain_losses.causal_lm_loss(logits, ids, valid),
                     -sum(terms) / 4)
