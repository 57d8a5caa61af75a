"""Sharding rules, FSDP, the model axis and GradCache on 8 fake CPU devices.

Every layout must compute the same training trajectory as data parallelism;
FSDP must actually split params and optimiser state; GradCache must give the
full-batch gradient.
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hica_jax import losses
from hica_jax import predict
from hica_jax import sharding
from hica_jax import testing
from hica_jax.training import gradcache
from hica_jax.training import stage2

MIN_SIZE = 1024   # tiny towers: 32x32 kernels count as "large"


def _rules(preset="dp", model_axis=1):
  config = testing.config("busi")
  config.sharding.preset = preset
  config.sharding.model_axis = model_axis
  return sharding.config_rules(config.sharding)


def _train(mesh, rules, accum_steps=1, steps=3, image=None):
  config, model, params = testing.tiny_model(image=image)
  config.stage2.optim.eps = 1e-6   # see test_train: compare math, not noise
  batch, desc = testing.fake_stage2_batch(config)
  shardings = sharding.param_shardings(params, mesh, rules, MIN_SIZE)
  state, step, _ = testing.stage2_trainer(
      config, model, params, mesh, accum_steps=accum_steps,
      param_shardings=shardings)
  losses, _, state = testing.run_stage2_steps(step, state, batch, desc, mesh,
                                              steps)
  return losses, state


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5), a, b)


def test_rules_align_to_trailing_dims_and_skip_indivisible_dims():
  mesh = sharding.make_mesh(jax.devices(), model_axis=2)   # data 4 x model 2
  rules = ((r"fc1/kernel$", (None, "model")), (r".*", "fsdp"))
  spec = lambda name, shape: sharding.spec_for(name, shape, mesh, rules, 64)
  assert spec("mlp/fc1/kernel", (32, 64)) == P("data", "model")
  # Scanned layers: the rule names the trailing dims; FSDP takes the largest
  # free dim that "data" divides.
  assert spec("scan/mlp/fc1/kernel", (3, 32, 64)) == P(None, "data", "model")
  assert spec("mlp/fc1/kernel", (30, 63)) == P(None, None)   # indivisible
  assert spec("ln/scale", (32,)) == P(None)                   # too small
  assert spec("emb", (302, 32)) == P(None, "data")   # 302 % 4 != 0
  with pytest.raises(ValueError, match="model"):
    sharding.param_shardings({"w": np.zeros((4, 4))},
                             sharding.make_mesh(jax.devices()),
                             ((r"w", ("model", None)),))
  with pytest.raises(ValueError, match="preset"):
    config = testing.config("busi")
    config.sharding.preset = "zero3"
    sharding.config_rules(config.sharding)


def test_model_axis_must_stay_inside_a_process():
  with pytest.raises(ValueError, match="model_axis=3"):
    sharding.make_mesh(jax.devices(), model_axis=3)


@pytest.mark.slow
def test_fsdp_model_axis_and_gradcache_follow_the_data_parallel_trajectory():
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh()
  loss_dp, state_dp = _train(mesh, _rules("dp"))
  loss_fsdp, state_fsdp = _train(mesh, _rules("fsdp"))
  np.testing.assert_allclose(loss_fsdp, loss_dp, rtol=1e-5, atol=1e-5)
  assert loss_dp[-1] < loss_dp[0]
  _close(state_fsdp.params, state_dp.params)

  # FSDP: every large param and its Adam moments hold 1/8 per device, small
  # ones (LayerNorms, biases, the conv stem's kernels) stay whole, so a
  # device holds exactly large/8 + small.
  params = jax.tree.leaves(state_fsdp.params)
  large = [x for x in params if x.size >= MIN_SIZE]
  small = [x for x in params if x.size < MIN_SIZE]
  assert sum(x.size for x in large) > 0.8 * sum(x.size for x in params)
  for x in large:
    assert x.addressable_shards[0].data.size * 8 == x.size
  on_device = sum(x.addressable_shards[0].data.size for x in params)
  assert on_device == (sum(x.size for x in large) // 8 +
                       sum(x.size for x in small))
  assert on_device < 0.3 * sum(x.size for x in params)
  mu = state_fsdp.opt_state[1].mu     # (clip, adam(mu, nu), decay)
  for p, m in zip(jax.tree.leaves(state_fsdp.params), jax.tree.leaves(mu)):
    assert m.sharding.spec == p.sharding.spec
  # Data parallel keeps whole copies.
  for x in jax.tree.leaves(state_dp.params):
    assert x.addressable_shards[0].data.size == x.size

  # A 2-D (data 4, model 2) mesh with the wide layers split, FSDP on top.
  mesh2 = sharding.make_mesh(jax.devices(), model_axis=2)
  loss_2d, state_2d = _train(mesh2, _rules("fsdp", model_axis=2))
  np.testing.assert_allclose(loss_2d, loss_dp, rtol=1e-5, atol=1e-5)
  _close(state_2d.params, state_dp.params)
  fc1 = state_2d.params["params"]["image"]["encoder"]["block_0"]["mlp"][
      "fc1"]["kernel"]
  assert fc1.sharding.spec == P("data", "model")

  # The stage-2 step with GradCache (2 chunks) on the 8-way batch split.
  loss_gc, state_gc = _train(mesh, _rules("dp"), accum_steps=2)
  np.testing.assert_allclose(loss_gc, loss_dp, rtol=1e-5, atol=1e-5)
  _close(state_gc.params, state_dp.params)


@pytest.mark.slow
def test_resnet_tower_under_fsdp_follows_the_data_parallel_trajectory():
  mesh = sharding.make_mesh()
  resnet = dict(arch="resnet", pool="gap")
  loss_dp, state_dp = _train(mesh, _rules("dp"), image=resnet)
  loss_fsdp, state_fsdp = _train(mesh, _rules("fsdp"), image=resnet)
  np.testing.assert_allclose(loss_fsdp, loss_dp, rtol=1e-5, atol=1e-5)
  assert loss_dp[-1] < loss_dp[0]
  _close(state_fsdp.params, state_dp.params)
  kernel = state_fsdp.params["params"]["image"]["stage_2_block_0"]["conv1"]["kernel"]
  assert kernel.shape == (3, 3, 32, 32)
  assert kernel.addressable_shards[0].data.size * 8 == kernel.size


@pytest.mark.parametrize("zeroed", [(), pytest.param(("local", "cross"),
                                                  marks=pytest.mark.slow)],
                         ids=["hica", "global_only"])
def test_gradcache_over_4_chunks_equals_full_batch_gradient(zeroed):
  config, model, params = testing.tiny_model()
  # Attention mode also exercises the token-level embeddings' gradients;
  # global-only embeds neither phrases nor descriptors.
  config.stage2.loss.local_mode = "attention"
  weights = dict(losses.loss_weights(config.stage2.loss),
                 **{k: 0.0 for k in zeroed})
  batch, desc = testing.fake_stage2_batch(config)
  mesh = sharding.make_mesh(jax.devices()[:4])
  args = (sharding.replicate(params, mesh), sharding.shard_batch(batch, mesh),
          sharding.replicate(desc, mesh))

  def grads(accum_steps):
    fn = jax.jit(lambda p, b, d: stage2.stage2_loss_and_grads(
        model, p, b, d, weights, 3, accum_steps, mesh))
    loss, metrics, g = fn(*args)
    return float(loss), jax.device_get(metrics), jax.device_get(g)

  loss1, metrics1, g1 = grads(1)
  loss4, metrics4, g4 = grads(4)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5, atol=1e-6)
  _close(metrics4, metrics1)
  norms = [float(np.abs(x).max()) for x in jax.tree.leaves(g1)]
  assert sum(n > 1e-4 for n in norms) > (0.5 if zeroed else 0.8) * len(norms)
  _close(g4, g1)
  with pytest.raises(ValueError, match="accum_steps=3"):
    gradcache.check_accum_steps(3, 16, mesh)


def test_batched_apply_pads_and_matches_a_direct_call():
  mesh = sharding.make_mesh()
  x = np.random.default_rng(0).normal(size=(21, 5)).astype(np.float32)
  fn = jax.jit(lambda w, a: (a @ w, a.sum(-1)))
  w = np.ones((5, 3), np.float32)
  out, total = predict.batched_apply(fn, w, [x], 16, mesh)
  np.testing.assert_allclose(out, x @ w, rtol=1e-6)
  np.testing.assert_allclose(total, x.sum(-1), rtol=1e-6)
