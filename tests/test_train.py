"""The sharded train steps equal their single-device computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hica_jax import losses
from hica_jax import sharding
from hica_jax import testing
from hica_jax.training import loop
from hica_jax.training import stage2



def _run_steps(devices, config, model, params, batch, desc, steps=2):
  mesh = sharding.make_mesh(devices)
  state, step, _ = testing.stage2_trainer(config, model, params, mesh)
  losses, params, _ = testing.run_stage2_steps(step, state, batch, desc, mesh,
                                               steps)
  return losses, params


def test_stage2_step_on_8_devices_equals_1_device():
  assert len(jax.devices()) == 8
  config, model, params = testing.tiny_model()
  # Some leaves have a true gradient of exactly zero (an attention key bias
  # cannot change a softmax); Adam with a tiny eps turns their float noise
  # into full-size updates. A larger eps keeps the comparison about the math.
  config.stage2.optim.eps = 1e-6
  batch, desc = testing.fake_stage2_batch(config)
  loss1, params1 = _run_steps(jax.devices()[:1], config, model, params, batch,
                              desc)
  loss8, params8 = _run_steps(jax.devices(), config, model, params, batch,
                              desc)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params1,
                       params)
  assert max(jax.tree.leaves(moved)) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                       rtol=1e-5),
               params8, params1)


def test_freeze_rules_keep_matching_params_fixed():
  config, model, params = testing.tiny_model()
  config.stage2.freeze = (r"^params/image/",)
  mesh = sharding.make_mesh()
  state, step, _ = testing.stage2_trainer(config, model, params, mesh)
  batch, desc = testing.fake_stage2_batch(config)
  _, new, _ = testing.run_stage2_steps(step, state, batch, desc, mesh)
  frozen = sharding.path_mask(params, (r"^params/image/",))
  diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new, params)
  pairs = list(zip(jax.tree.leaves(frozen), jax.tree.leaves(diffs)))
  assert any(f for f, _ in pairs) and any(not f for f, _ in pairs)
  assert all(d == 0.0 for f, d in pairs if f)
  assert any(d > 0.0 for f, d in pairs if not f)


@pytest.mark.parametrize("accum_steps", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_whole_run_freeze_skips_the_held_backward_and_changes_nothing(
    accum_steps):
  """A text tower held for the whole run: the step with stop_gradient on it
  (loop.hold) trains the other params exactly as the step that computes the
  text gradients and zeroes their updates, and compiles to fewer FLOPs;
  with GradCache (accum_steps 2) too."""
  config, model, params = testing.tiny_model()
  config.stage2.freeze = (r"^params/text/",)
  config.stage2.optim.eps = 1e-6
  mesh = sharding.make_mesh()
  batch, desc = testing.fake_stage2_batch(config)
  assert loop.held_patterns(config.stage2) == (r"^params/text/",)
  state, held_step, _ = testing.stage2_trainer(config, model, params, mesh,
                                               accum_steps=accum_steps)
  tx, _ = loop.make_optimizer(config.stage2.optim, 10,
                              **loop.freeze_args(config.stage2))
  full_step = stage2.make_stage2_step(
      model, tx, losses.loss_weights(config.stage2.loss), 3,
      accum_steps=accum_steps, mesh=mesh,
      state_sharding=loop.state_shardings(state))
  args = (sharding.shard_batch(batch, mesh), sharding.replicate(desc, mesh),
          np.float32(1e-3))
  flops = [s.lower(state, *args).compile().cost_analysis()["flops"]
           for s in (held_step, full_step)]
  assert flops[0] < 0.95 * flops[1], flops
  runs = []
  for step in (held_step, full_step):
    fresh, _, _ = testing.stage2_trainer(config, model, params, mesh,
                                         accum_steps=accum_steps)
    new_state, metrics = step(fresh, *args)
    runs.append((jax.device_get(new_state.params), float(metrics["loss"]),
                 float(metrics["grad_norm"])))
  (held_params, held_loss, held_norm), (full_params, full_loss, full_norm) = runs
  assert held_loss == pytest.approx(full_loss, rel=1e-6)
  assert held_norm < full_norm  # the text gradients are not in the norm
  text = sharding.path_mask(params, (r"^params/text/",))
  for t, a, b, p0 in zip(jax.tree.leaves(text), jax.tree.leaves(held_params),
                         jax.tree.leaves(full_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    if t:
      np.testing.assert_array_equal(a, p0)
  assert loop.held_patterns(testing.apply_overrides(
      config, {"stage2.freeze_for": 0.5}).stage2) == ()


def test_a_freeze_for_part_of_the_run_thaws_on_its_step():
  """freeze_for=0.5 of 4 steps: the image tower stays put for 2 steps, then
  moves; the other params move from the first step."""
  config, model, params = testing.tiny_model()
  config.stage2.freeze = (r"^params/image/",)
  config.stage2.freeze_for = 0.5
  mesh = sharding.make_mesh()
  state, step, _ = testing.stage2_trainer(config, model, params, mesh,
                                          num_steps=4)
  batch, desc = testing.fake_stage2_batch(config)
  frozen = jax.tree.leaves(sharding.path_mask(params, (r"^params/image/",)))

  def moved(new):
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), new, params))
    return ([d for f, d in zip(frozen, diffs) if f],
            [d for f, d in zip(frozen, diffs) if not f])

  _, after2, state = testing.run_stage2_steps(step, state, batch, desc, mesh,
                                              steps=2)
  held, trained = moved(after2)
  assert held and all(d == 0.0 for d in held)
  assert any(d > 0.0 for d in trained)
  _, after3, _ = testing.run_stage2_steps(step, state, batch, desc, mesh,
                                          steps=1)
  held, _ = moved(after3)
  assert any(d > 0.0 for d in held)


def test_thaw_after_zeroes_then_scales_updates():
  tx = loop.thaw_after(2, 0.25)
  updates = {"w": jnp.ones((3,))}
  state = tx.init(updates)
  seen = []
  for _ in range(4):
    out, state = tx.update(updates, state)
    seen.append(float(out["w"][0]))
  assert seen == [0.0, 0.0, 0.25, 0.25]


def test_freeze_for_one_is_the_whole_run_freeze():
  """The neutral value builds the very transformation a plain freeze does,
  so the compiled steps and checkpoints of earlier runs are unchanged."""
  optim = testing.config("chestxray", "tiny").stage2.optim
  plain, _ = loop.make_optimizer(optim, 10, (r"^params/image/",))
  neutral, _ = loop.make_optimizer(optim, 10, (r"^params/image/",),
                                   freeze_for=1.0, thaw_lr_scale=1.0)
  assert plain is neutral
  with pytest.raises(ValueError, match="freeze_for=2"):
    loop.make_optimizer(optim, 10, (r"^params/image/",), freeze_for=2)


@pytest.mark.slow
def test_zero_weight_terms_embed_nothing_and_change_nothing():
  """Global-only (and no-cross) steps embed only what their terms read, and
  their loss and gradients equal those computed with everything embedded."""
  config, model, params = testing.tiny_model()
  batch, desc = testing.fake_stage2_batch(config)
  base = losses.loss_weights(config.stage2.loss)
  b, d = batch["text_ids"].shape[0], desc["ids"].shape[0]
  for zeroed, embedded in ((("local", "cross"), b), (("cross",), 2 * b),
                           (("local",), b + d), ((), 2 * b + d)):
    weights = dict(base, **{k: 0.0 for k in zeroed})

    def loss(p, weights=weights, selective=True):
      outputs = stage2.stage2_outputs(
          model, p, batch, desc, 3, weights=weights if selective else None)
      return losses.hica_loss(outputs, batch, weights)[0]

    if zeroed:  # with no term zeroed both embed everything: nothing to compare
      fast = jax.value_and_grad(loss)(params)
      full = jax.value_and_grad(lambda p: loss(p, selective=False))(params)
      np.testing.assert_allclose(fast[0], full[0], rtol=1e-5)
      jax.tree.map(lambda x, y: np.testing.assert_allclose(
          x, y, rtol=1e-4, atol=1e-6), fast[1], full[1])
    # The text tower's one call embeds exactly the needed sequences.
    seqs = {int(v.aval.shape[0])
            for eqn in jax.make_jaxpr(loss)(params).jaxpr.eqns
            if eqn.primitive.name == "concatenate"
            for v in eqn.outvars if v.aval.ndim == 2
            and v.aval.shape[1] == config.model.text.max_len}
    assert max(seqs, default=b) == embedded, (zeroed, seqs)
