"""The supervised baseline: the image tower and a linear head fine-tuned
with cross-entropy, from the same initialisation and with stage 2's
optimiser, batch size, augmentation and steps.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from hica_jax import sharding
from hica_jax.data import pipeline
from hica_jax.training import loop


def supervised_logits(model, params, images, train=False):
  """f32[B, K] logits of the supervised baseline: a linear head on the
  pooled image features. params: {"model": HiCA params, "head": {kernel
  [w, K], bias [K]}}; images f32[B, H, W, 3]."""
  feats = model.apply(params["model"], images, train=train,
                      method=model.image_features)
  return feats @ params["head"]["kernel"] + params["head"]["bias"]


def make_supervised_step(model, tx, *, mesh=None, state_sharding=None):
  """Jitted (state, batch, lr) -> (state, metrics): cross-entropy of the
  linear head, back-propagated into the image tower."""

  def loss_fn(params, batch):
    logits = supervised_logits(model, params, batch["image"], train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) ==
                                       batch["label"])}

  def step(state, batch, lr):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch)
    state, ok = loop.apply_update(state, grads, loss, tx, lr)
    return state, loop.step_metrics(metrics, loss, grads, ok)

  return loop.jit_step(step, mesh, loop.hashable_shardings(state_sharding))


@functools.lru_cache(maxsize=None)
def cached_supervised_step(model, tx, mesh, state_sharding_key):
  treedef, leaves = state_sharding_key
  return make_supervised_step(
      model, tx, mesh=mesh, state_sharding=jax.tree.unflatten(treedef, leaves))


@functools.lru_cache(maxsize=None)
def probs_fn(model):
  """Jitted (params, images) -> f[B, K] class probabilities."""
  return jax.jit(lambda p, x: jax.nn.softmax(supervised_logits(model, p, x),
                                             -1))


def train(ctx, init_params, indices, num_steps, seed, desc="supervised_ce"):
  """Fine-tunes on the records `indices` of the train split; returns the
  LoopResult, whose state.params are {"model", "head"} (supervised_logits)."""
  s2, mesh, model = ctx.config.stage2, ctx.mesh, ctx.model
  sharding.check_global_batch(s2.batch_size, mesh, "stage2.batch_size")
  size = ctx.config.data.image_size
  width = jax.eval_shape(lambda p: model.apply(
      p, jnp.zeros((1, size, size, 3)), method=model.image_features),
                         init_params).shape[-1]
  head = loop.linear_head_init(jax.random.PRNGKey(seed), width,
                               ctx.tables.num_classes)
  params = {"model": jax.tree.map(jnp.array, init_params), "head": head}
  tx, schedule = loop.make_optimizer(s2.optim, num_steps,
                                     **loop.freeze_args(s2))
  state = loop.create_state(params, tx, mesh,
                            param_shardings=ctx.param_shardings(params))
  step_fn = cached_supervised_step(
      model, tx, mesh, loop.hashable_shardings(loop.state_shardings(state)))
  it = iter(pipeline.train_dataset(ctx.data.source("train"), indices,
                                   ctx.preprocessor(), s2.batch_size,
                                   num_steps, seed=seed))
  return loop.train_loop(state, step_fn, it, num_steps, mesh=mesh, desc=desc,
                         schedule=schedule, log_every=s2.log_every,
                         max_nonfinite=ctx.max_nonfinite())
