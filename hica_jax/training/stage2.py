"""Stage 2: hierarchical contrastive alignment (L_HiCA), as a stage and as
the few-shot method.

Read top to bottom: the towers' outputs that losses.hica_loss consumes (only
those its active terms read), loss and gradients (GradCache when
stage2.accum_steps > 1), the jitted step and its cached factory, a run on any
set of train records (the stage and every few-shot cell), and the stage.
"""
import functools

import jax
import jax.numpy as jnp

from hica_jax import checkpoint as ckpt_lib
from hica_jax import context as context_lib
from hica_jax import losses
from hica_jax import sharding
from hica_jax.data import pipeline
from hica_jax.training import gradcache
from hica_jax.training import loop


def encode_examples(model, params, batch, desc=None, train=True,
                     weights=None):
  """Per-example tower outputs, and pooled descriptor embeddings if `desc`.

  Texts, phrases (and descriptors) go through the text tower in one call
  (one trace, one compiled tower); phrases are right-padded to the text
  length, which leaves their valid tokens unchanged under the padding mask.
  Only what the nonzero terms of `weights` read is embedded
  (losses.text_inputs_needed; None: everything).
  Returns ({image_emb, patch_emb, and as needed text_emb, phrase_emb,
  phrase_tokens}, desc_emb f32[D, d] or None).
  """
  texts, phrases, descriptors = losses.text_inputs_needed(weights)
  desc = desc if descriptors else None
  image_emb, patch_emb = model.apply(params, batch["image"], train=train,
                                     method=model.encode_image)
  out = {"image_emb": image_emb, "patch_emb": patch_emb}
  b, length = batch["text_ids"].shape
  ids, mask = [], []
  if texts:
    ids.append(batch["text_ids"])
    mask.append(batch["text_mask"])
  if phrases:
    lp = batch["phrase_ids"].shape[1]
    pad = [(0, 0), (0, length - lp)]
    ids.append(jnp.pad(batch["phrase_ids"], pad))
    mask.append(jnp.pad(batch["phrase_mask"], pad))
  if desc is not None:
    ids.append(desc["ids"])
    mask.append(desc["mask"])
  if not ids:
    return out, None
  pooled, tokens = model.apply(params, jnp.concatenate(ids),
                               jnp.concatenate(mask), train=train,
                               method=model.encode_text)
  start = 0
  if texts:
    out["text_emb"] = pooled[:b]
    start = b
  if phrases:
    out["phrase_emb"] = pooled[start:start + b]
    out["phrase_tokens"] = tokens[start:start + b, :lp]
    start += b
  return out, (pooled[start:] if desc is not None else None)


def loss_inputs(model, params, examples, desc_emb, desc, num_classes):
  """Tower outputs -> the `outputs` dict losses.hica_loss consumes."""
  out = dict(examples,
             logit_scale=model.apply(params, method=model.get_logit_scale),
             logit_bias=model.apply(params, method=model.get_logit_bias))
  if desc_emb is not None:
    out["prototypes"] = losses.category_prototypes(desc_emb, desc["category"],
                                                   num_classes)
  return out


def stage2_outputs(model, params, batch, desc, num_classes, train=True,
                   weights=None):
  """Model outputs that losses.hica_loss consumes (see docs/design.md); with
  `weights`, only those its nonzero terms read."""
  examples, desc_emb = encode_examples(model, params, batch, desc, train,
                                        weights)
  return loss_inputs(model, params, examples, desc_emb, desc, num_classes)


TOWER_INPUTS = ("image", "text_ids", "text_mask", "phrase_ids", "phrase_mask")


def encode_descriptors(model, params, desc):
  """f32[D, d] pooled descriptor embeddings (train mode, as in the step)."""
  return model.apply(params, desc["ids"], desc["mask"], train=True,
                     method=model.encode_text)[0]


def stage2_loss_and_grads(model, params, batch, desc, weights, num_classes,
                          accum_steps=1, mesh=None, held=()):
  """(loss, metrics, grads) of L_HiCA on the whole global batch B.

  With accum_steps > 1 the towers embed the batch in chunks (GradCache,
  gradcache.loss_and_grads); the gradients equal the full-batch ones. B must
  divide into accum_steps x data shards. The gradients of the params that
  `held` matches are zeros, and not computed (loop.hold).
  """
  if accum_steps == 1:
    def loss_fn(p):
      p = loop.hold(p, held)
      return losses.hica_loss(stage2_outputs(model, p, batch, desc,
                                             num_classes, weights=weights),
                              batch, weights)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads

  def embed(p, chunk):
    return encode_examples(model, loop.hold(p, held), chunk,
                           weights=weights)[0]

  def loss_of(examples, p):
    p = loop.hold(p, held)
    desc_emb = (encode_descriptors(model, p, desc)
                if losses.text_inputs_needed(weights)[2] else None)
    outputs = loss_inputs(model, p, examples, desc_emb, desc, num_classes)
    return losses.hica_loss(outputs, batch, weights)

  return gradcache.loss_and_grads(
      embed, loss_of, params, {k: batch[k] for k in TOWER_INPUTS},
      accum_steps, mesh)


def make_stage2_step(model, tx, weights, num_classes, *, accum_steps=1,
                     mesh=None, state_sharding=None, held=()):
  """Jitted stage-2 step: (state, batch, desc, lr) -> (state, metrics).

  state_sharding (with mesh) pins the output state to the input's layout.
  held: regexes of params frozen for the whole run (loop.held_patterns):
  their gradients are not computed (loop.hold).
  """

  def step(state, batch, desc, lr):
    loss, metrics, grads = stage2_loss_and_grads(
        model, state.params, batch, desc, weights, num_classes, accum_steps,
        mesh, held)
    state, ok = loop.apply_update(state, grads, loss, tx, lr)
    return state, loop.step_metrics(metrics, loss, grads, ok)

  return loop.jit_step(step, mesh, loop.hashable_shardings(state_sharding))


@functools.lru_cache(maxsize=None)
def cached_stage2_step(model, tx, weights_items, num_classes, accum_steps,
                       mesh, state_sharding_key, held=()):
  """make_stage2_step, compiled once per distinct (hashable) argument set:
  the stage, every few-shot run and the study's timing share it."""
  treedef, leaves = state_sharding_key
  return make_stage2_step(model, tx, dict(weights_items), num_classes,
                          accum_steps=accum_steps, mesh=mesh,
                          state_sharding=jax.tree.unflatten(treedef, leaves),
                          held=held)


def with_extra_freeze(s2, extra_freeze):
  """The stage-2 section, as a dict, with `extra_freeze` regexes appended
  to its freeze (same schedule); the section itself when there are none."""
  if not extra_freeze:
    return s2
  return dict(s2.to_dict(), freeze=tuple(s2.get("freeze", ()))
              + tuple(extra_freeze))


def setup(ctx, init_params, num_steps, tables=None, loss_config=None,
          extra_freeze=()):
  """(fresh state, compiled step, LR schedule) of a stage-2 run.

  loss_config replaces config.stage2.loss (global-only, ablations, sweep);
  extra_freeze: regexes held on top of stage2.freeze (eval.hica_freeze).
  """
  s2, mesh = ctx.config.stage2, ctx.mesh
  held = with_extra_freeze(s2, extra_freeze)
  tables = tables or ctx.tables
  sharding.check_global_batch(s2.batch_size, mesh, "stage2.batch_size")
  accum_steps = int(s2.get("accum_steps", 1))
  gradcache.check_accum_steps(accum_steps, s2.batch_size, mesh)
  tx, schedule = loop.make_optimizer(s2.optim, num_steps,
                                     **loop.freeze_args(held))
  # A copy: the step donates its state, and init params serve many runs.
  params = jax.tree.map(jnp.array, init_params)
  state = loop.create_state(params, tx, mesh,
                            param_shardings=ctx.param_shardings(params))
  weights = losses.loss_weights(s2.loss if loss_config is None
                                else loss_config)
  step_fn = cached_stage2_step(
      ctx.model, tx, tuple(sorted(weights.items())), tables.num_classes,
      accum_steps, mesh, loop.hashable_shardings(loop.state_shardings(state)),
      loop.held_patterns(held))
  return state, step_fn, schedule


def train_on(ctx, init_params, indices, num_steps, seed, *, tables=None,
             mngr=None, writer=None, desc="stage2", loss_config=None,
             extra_freeze=()):
  """Stage 2 on the records `indices` of the train split, from init params.

  Used by the stage (with a checkpoint manager) and by every few-shot cell
  (without). Returns loop.LoopResult.
  """
  s2, mesh = ctx.config.stage2, ctx.mesh
  tables = tables or ctx.tables
  state, step_fn, schedule = setup(ctx, init_params, num_steps, tables,
                                   loss_config, extra_freeze)
  state, extra = loop.restore_if_any(mngr, state)
  source = ctx.data.source("train")
  phrases = (s2.loss if loss_config is None else loss_config).get(
      "phrases", "roi")
  it = iter(pipeline.train_dataset(source, indices,
                                   ctx.preprocessor(
                                       tables,
                                       class_phrases=phrases == "class"),
                                   s2.batch_size, num_steps, seed=seed))
  if extra and extra.get("data_iter") is not None:
    it.set_state(extra["data_iter"])
  return loop.train_loop(state, step_fn, it, num_steps, mesh=mesh, desc=desc,
                         schedule=schedule, writer=writer, mngr=mngr,
                         ckpt_every=s2.ckpt_every, log_every=s2.log_every,
                         extra_fn=lambda: {"data_iter": it.get_state()},
                         step_args=(ctx.desc_arrays(tables),), resume=extra,
                         max_nonfinite=ctx.max_nonfinite())


def run(ctx, writer=None):
  """The stage: stage 2 from stage2.init on config.stage2.shots
  examples per class (None: the whole train split of the seen classes)."""
  s2 = ctx.config.stage2
  # stage2.init="model": the model's initialisation even beside a stage 1
  # (workdir.plan_stages checked before any work that "stage1" has one).
  init = (context_lib.load_final_params(ctx, "stage1")
          if s2.get("init", "stage1") == "stage1" else None)
  if init is None:
    init = context_lib.init_params(ctx, jax.random.PRNGKey(ctx.config.seed))
  indices = ctx.support_indices(s2.get("shots"), ctx.config.seed)
  mngr = ckpt_lib.manager(ctx.workdir, "stage2")
  result = train_on(ctx, init, indices, s2.steps, ctx.config.seed,
                    mngr=mngr, writer=writer)
  ckpt_lib.mark_final(ctx.workdir, "stage2", s2.steps)
  return result
