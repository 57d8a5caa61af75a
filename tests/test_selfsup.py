"""hica_jax.selfsup: Sinkhorn marginals, SwAV/DINO losses against numpy
references, collapse statistics, EMA and centre updates, multi-crop views."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hica_jax import selfsup


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_softmax(x):
  return np.exp(_np_log_softmax(x))


def _np_cross_view(targets, student):
  """Mean over (i, v != i) of the batch-mean CE, with explicit loops."""
  terms = []
  for i in range(targets.shape[0]):
    for v in range(student.shape[0]):
      if v != i:
        terms.append(-(targets[i] * _np_log_softmax(student[v])).sum(-1).mean())
  return float(np.mean(terms))


def _np_sinkhorn(scores, eps, iters):
  """SwAV's algorithm written out in float64."""
  q = np.exp(scores / eps).T          # [K, B]
  q /= q.sum()
  k, b = q.shape
  for _ in range(iters):
    q /= q.sum(1, keepdims=True)
    q /= k
    q /= q.sum(0, keepdims=True)
    q /= b
  return (q * b).T


@pytest.fixture(scope="module")
def scores():
  return np.random.default_rng(0).uniform(-1, 1, (3, 24, 6)).astype(np.float32)


def test_sinkhorn_marginals_are_uniform(scores):
  q = np.asarray(selfsup.sinkhorn(jnp.asarray(scores[0]), eps=0.1, iters=50))
  np.testing.assert_allclose(q.sum(1), np.ones(24), rtol=1e-5)
  np.testing.assert_allclose(q.sum(0), np.full(6, 24 / 6), rtol=1e-3)
  assert (q >= 0).all()


def test_sinkhorn_matches_numpy_reference(scores):
  q = selfsup.sinkhorn(jnp.asarray(scores[1]), eps=0.05, iters=3)
  ref = _np_sinkhorn(scores[1].astype(np.float64), 0.05, 3)
  np.testing.assert_allclose(np.asarray(q), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_sharded_equals_single_device(scores):
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  fn = jax.jit(jax.shard_map(
      functools.partial(selfsup.sinkhorn, eps=0.1, iters=5, axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  np.testing.assert_allclose(
      np.asarray(fn(jnp.asarray(scores[0]))),
      np.asarray(selfsup.sinkhorn(jnp.asarray(scores[0]), 0.1, 5)),
      rtol=1e-5, atol=1e-7)


def test_swav_loss_matches_numpy_reference(scores):
  loss, codes = selfsup.swav_loss(jnp.asarray(scores), num_assign=2,
                                  temperature=0.1, eps=0.05, iters=3)
  ref_codes = np.stack([_np_sinkhorn(scores[i].astype(np.float64), 0.05, 3)
                        for i in range(2)])
  np.testing.assert_allclose(np.asarray(codes), ref_codes, rtol=1e-4,
                             atol=1e-6)
  ref = _np_cross_view(ref_codes, scores.astype(np.float64) / 0.1)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_swav_loss_sharded_equals_single_device(scores):
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  fn = jax.jit(jax.shard_map(
      lambda s: selfsup.swav_loss(s, 2, axis_name="data")[0],
      mesh=mesh, in_specs=P(None, "data"), out_specs=P()))
  np.testing.assert_allclose(float(fn(jnp.asarray(scores))),
                             float(selfsup.swav_loss(jnp.asarray(scores), 2)[0]),
                             rtol=1e-5)


def test_swav_loss_with_queue_balances_over_queue_and_batch(scores):
  """The batch's codes are the last B rows of Sinkhorn over [queue; batch]."""
  queue = np.random.default_rng(2).uniform(-1, 1, (2, 40, 6)).astype(
      np.float32)
  loss, codes = selfsup.swav_loss(jnp.asarray(scores), 2, 0.1, 0.05, 3,
                                  queue_scores=jnp.asarray(queue))
  ref_codes = np.stack([_np_sinkhorn(np.concatenate(
      [queue[i], scores[i]]).astype(np.float64), 0.05, 3)[-24:]
                        for i in range(2)])
  np.testing.assert_allclose(np.asarray(codes), ref_codes, rtol=1e-4,
                             atol=1e-6)
  ref = _np_cross_view(ref_codes, scores.astype(np.float64) / 0.1)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  plain = selfsup.swav_loss(jnp.asarray(scores), 2, 0.1, 0.05, 3)[1]
  assert np.abs(np.asarray(plain) - ref_codes).max() > 1e-3


def test_push_queue_keeps_newest_first():
  queue = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
  batch = -np.ones((2, 2, 3), np.float32)
  out = np.asarray(selfsup.push_queue(jnp.asarray(queue), jnp.asarray(batch)))
  np.testing.assert_array_equal(out[:, :2], batch)
  np.testing.assert_array_equal(out[:, 2:], queue[:, :3])


def test_dino_loss_matches_numpy_reference(scores):
  center = np.linspace(-0.2, 0.2, 6).astype(np.float32)
  teacher = scores[:2] * 0.5 + 0.1
  loss = selfsup.dino_loss(jnp.asarray(scores), jnp.asarray(teacher),
                           jnp.asarray(center), 0.1, 0.04)
  targets = _np_softmax((teacher - center).astype(np.float64) / 0.04)
  ref = _np_cross_view(targets, scores.astype(np.float64) / 0.1)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_dino_loss_minimal_when_views_agree():
  """With one-hot teacher targets, students that agree with them beat any
  other assignment of the same confidence."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 5, 16)
  agree = 5.0 * np.eye(5)[labels][None].repeat(3, 0).astype(np.float32)
  other = 5.0 * np.eye(5)[(labels + 1) % 5][None].repeat(3, 0)
  zero = jnp.zeros(5)
  lo = selfsup.dino_loss(jnp.asarray(agree), jnp.asarray(agree[:2]), zero)
  hi = selfsup.dino_loss(jnp.asarray(other.astype(np.float32)),
                         jnp.asarray(agree[:2]), zero)
  assert float(lo) < 0.01 < float(hi)


def test_dino_gradients_skip_teacher_and_center(scores):
  s, t = jnp.asarray(scores), jnp.asarray(scores[:2])
  gs, gt, gc = jax.grad(selfsup.dino_loss, argnums=(0, 1, 2))(
      s, t, jnp.zeros(6))
  assert float(jnp.abs(gs).sum()) > 0
  assert float(jnp.abs(gt).sum()) == 0 and float(jnp.abs(gc).sum()) == 0


def test_update_center_and_ema_follow_their_formulas(scores):
  center = jnp.full((6,), 0.3)
  new = selfsup.update_center(center, jnp.asarray(scores), momentum=0.9)
  np.testing.assert_allclose(
      np.asarray(new), 0.27 + 0.1 * scores.reshape(-1, 6).mean(0), rtol=1e-5)
  teacher = {"a": jnp.ones((2, 3)), "b": {"c": jnp.full((4,), 2.0)}}
  student = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.full((4,), -1.0)}}
  out = selfsup.ema_update(teacher, student, 0.99)
  np.testing.assert_allclose(np.asarray(out["a"]), 0.99, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["b"]["c"]), 1.97, rtol=1e-6)


def test_collapse_and_agreement_statistics():
  k = 8
  collapsed = jnp.tile(jax.nn.one_hot(3, k), (32, 1))
  spread = jax.nn.one_hot(jnp.arange(32) % k, k)
  assert float(selfsup.cluster_size_entropy(collapsed)) == 0.0
  np.testing.assert_allclose(float(selfsup.cluster_size_entropy(spread)), 1.0,
                             rtol=1e-6)
  shifted = jax.nn.one_hot((jnp.arange(32) + (jnp.arange(32) < 8)) % k, k)
  np.testing.assert_allclose(float(selfsup.view_agreement(spread, shifted)),
                             24 / 32)


def test_schedules_reach_their_endpoints():
  assert float(selfsup.cosine_ramp(0, 100, 0.99, 1.0)) == pytest.approx(0.99)
  assert float(selfsup.cosine_ramp(100, 100, 0.99, 1.0)) == pytest.approx(1.0)
  assert float(selfsup.linear_warmup(5, 10, 0.04, 0.06)) == pytest.approx(0.05)


def test_multi_crop_shapes_and_standardisation():
  spec = selfsup.CropSpec(global_size=16, local_size=8, num_global=2,
                          num_local=3, speckle=0.2, hflip=0.5)
  images = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (4, 32, 32)),
                       jnp.float32)
  glob, loc = jax.jit(selfsup.multi_crop, static_argnums=2)(
      jax.random.PRNGKey(0), images, spec)
  assert glob.shape == (2, 4, 16, 16, 3) and loc.shape == (3, 4, 8, 8, 3)
  np.testing.assert_allclose(np.asarray(glob.mean((2, 3, 4))), 0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(glob.std((2, 3, 4))), 1, atol=0.05)
  assert not np.allclose(np.asarray(glob[0]), np.asarray(glob[1]))


def test_multi_crop_identity_crop_keeps_the_image():
  """Full-area crop, no jitter: the view is the standardised image."""
  spec = selfsup.CropSpec(global_size=16, num_local=0, global_scale=(1, 1),
                          aspect=(1, 1), rotate=0.0, brightness=0.0,
                          contrast=0.0, gamma=0.0, blur_prob=0.0, noise=0.0,
                          channels=1)
  images = jnp.asarray(np.random.default_rng(3).uniform(0.1, 1, (2, 16, 16)),
                       jnp.float32)
  glob, loc = selfsup.multi_crop(jax.random.PRNGKey(1), images, spec)
  ref = np.asarray(images)
  ref = (ref - ref.mean((1, 2), keepdims=True)) / (
      ref.std((1, 2), keepdims=True) + 1e-3)
  assert loc is None
  np.testing.assert_allclose(np.asarray(glob[0, ..., 0]), ref, atol=1e-4)


def test_prototype_head_scores_are_cosines():
  head = selfsup.PrototypeHead(num_prototypes=10, hidden=16, bottleneck=8)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(5, 12)), jnp.float32)
  out = head.apply(head.init(jax.random.PRNGKey(0), x), x)
  assert out.shape == (5, 10)
  assert float(jnp.abs(out).max()) <= 1.0 + 1e-5


def test_batch_standardise_sharded_equals_single_device():
  x = jnp.asarray(np.random.default_rng(5).normal(3.0, 2.0, (16, 5)),
                  jnp.float32)
  out = np.asarray(selfsup.batch_standardise(x))
  np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(out.std(0), 1, rtol=1e-4)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  fn = jax.jit(jax.shard_map(
      functools.partial(selfsup.batch_standardise, axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  np.testing.assert_allclose(np.asarray(fn(x)), out, rtol=1e-5, atol=1e-6)


def test_prototype_head_batch_norm_spreads_near_identical_inputs():
  """Features that differ by 1e-3 around one large common vector: with batch
  standardisation the score rows differ; without, they are nearly equal."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(5.0 + 1e-3 * rng.normal(size=(32, 12)), jnp.float32)
  spread = {}
  for bn in (True, False):
    head = selfsup.PrototypeHead(num_prototypes=10, hidden=16, bottleneck=8,
                                 batch_norm=bn)
    out = head.apply(head.init(jax.random.PRNGKey(0), x), x)
    spread[bn] = float(out.std(0).mean())
  assert spread[True] > 0.1 > 100 * spread[False]
