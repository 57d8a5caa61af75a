"""The sharded train steps equal their single-device computation."""
import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import base_config
from hica_jax import sharding
from hica_jax import train as train_lib
from hica_jax.models import build_model

VOCAB = 40


def _tiny():
  config = base_config.get_base_config("busi", "tiny")
  model = build_model(config.model, VOCAB)
  size, max_len = config.data.image_size, config.model.text.max_len
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                      jnp.zeros((1, max_len), jnp.int32),
                      jnp.ones((1, max_len), jnp.int32))
  return config, model, jax.device_get(params)


def _batch(config, b=16, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  size, max_len = config.data.image_size, config.model.text.max_len
  lp = config.data.max_phrase_len

  def ids(n, length):
    x = rng.integers(5, VOCAB, (n, length)).astype(np.int32)
    m = (np.arange(length)[None] < rng.integers(3, length, (n, 1)))
    return x * m, m.astype(np.int32)

  text_ids, text_mask = ids(b, max_len)
  phrase_ids, phrase_mask = ids(b, lp)
  label = rng.integers(0, num_classes, b).astype(np.int32)
  roi = np.zeros((b, size, size), np.float32)
  for i in range(b):
    y, x = rng.integers(0, size - 10, 2)
    roi[i, y:y + 9, x:x + 11] = label[i] > 0
  batch = {
      "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
      "roi_mask": roi, "has_roi": (label > 0).astype(np.float32),
      "label": label, "text_ids": text_ids, "text_mask": text_mask,
      "phrase_ids": phrase_ids, "phrase_mask": phrase_mask,
      "phrase_id": np.where(label > 0, label - 1, -1).astype(np.int32),
      "index": np.arange(b, dtype=np.int32),
  }
  d_ids, d_mask = ids(6, max_len)
  desc = {"ids": d_ids, "mask": d_mask,
          "category": np.array([0, 0, 1, 1, 2, 2], np.int32)}
  return batch, desc


def _run_steps(devices, config, model, params, batch, desc, steps=2):
  mesh = sharding.make_mesh(devices)
  tx, _ = train_lib.make_optimizer(config.stage2.optim, 10, params)
  state = train_lib.create_state(params, tx, mesh)
  step = train_lib.make_stage2_step(
      model, tx, train_lib.loss_weights(config.stage2.loss), 3)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, sharding.shard_batch(batch, mesh),
                          sharding.replicate(desc, mesh), np.float32(1e-3))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


def test_stage2_step_on_8_devices_equals_1_device():
  assert len(jax.devices()) == 8
  config, model, params = _tiny()
  # Some leaves have a true gradient of exactly zero (an attention key bias
  # cannot change a softmax); Adam with a tiny eps turns their float noise
  # into full-size updates. A larger eps keeps the comparison about the math.
  config.stage2.optim.eps = 1e-6
  batch, desc = _batch(config)
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
  config, model, params = _tiny()
  tx, _ = train_lib.make_optimizer(config.stage2.optim, 10, params,
                                   freeze=(r"^params/image/",))
  mesh = sharding.make_mesh()
  state = train_lib.create_state(params, tx, mesh)
  step = train_lib.make_stage2_step(
      model, tx, train_lib.loss_weights(config.stage2.loss), 3)
  batch, desc = _batch(config)
  for _ in range(2):
    state, _ = step(state, sharding.shard_batch(batch, mesh),
                    sharding.replicate(desc, mesh), np.float32(1e-3))
  new = jax.device_get(state.params)
  frozen = sharding.path_mask(params, (r"^params/image/",))
  diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new, params)
  pairs = list(zip(jax.tree.leaves(frozen), jax.tree.leaves(diffs)))
  assert any(f for f, _ in pairs) and any(not f for f, _ in pairs)
  assert all(d == 0.0 for f, d in pairs if f)
  assert any(d > 0.0 for f, d in pairs if not f)


def test_zero_weight_terms_embed_nothing_and_change_nothing():
  """Global-only (and no-cross) steps embed only what their terms read, and
  their loss and gradients equal those computed with everything embedded."""
  config, model, params = _tiny()
  batch, desc = _batch(config)
  base = train_lib.loss_weights(config.stage2.loss)
  b, d = batch["text_ids"].shape[0], desc["ids"].shape[0]
  for zeroed, embedded in ((("local", "cross"), b), (("cross",), 2 * b),
                           (("local",), b + d), ((), 2 * b + d)):
    weights = dict(base, **{k: 0.0 for k in zeroed})

    def loss(p, weights=weights, selective=True):
      outputs = train_lib.stage2_outputs(
          model, p, batch, desc, 3, weights=weights if selective else None)
      return train_lib.losses.hica_loss(outputs, batch, weights)[0]

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
