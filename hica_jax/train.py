"""HiCA training: stage 1 (domain pretraining) and stage 2 (alignment).

Read top to bottom: optimiser, train state, the two loss functions, the jitted
sharded steps, the shared loop (checkpoint, resume, metrics, progress bar),
then the two stage entry points. Params are replicated and the global batch
is split over the mesh axis "data"; XLA inserts the gradient all-reduce.
"""
import dataclasses
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from hica_jax import checkpoint as ckpt_lib
from hica_jax import losses
from hica_jax import metrics as metrics_lib
from hica_jax import sharding
from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import pipeline

# ----------------------------------------------------------------------------
# Optimiser.


def make_optimizer(optim, num_steps, params, freeze=()):
  """AdamW direction with global-norm clipping, and its LR schedule.

  The learning rate is applied by the step (`updates * -lr`, lr a traced
  argument), so the compiled step does not depend on the schedule: stage 2
  and every few-shot run of equal shapes share one compilation.

  Args:
    optim: ConfigDict with lr, warmup_steps, weight_decay, clip_norm, b1, b2,
      eps.
    num_steps: total steps of the stage (schedule length).
    params: the param tree (for the weight-decay and freeze masks).
    freeze: regexes over '/'-joined param paths whose updates are zeroed.
  Returns:
    (tx, schedule): an optax transformation producing un-scaled AdamW
    updates, and step -> learning rate.
  """
  warmup = min(int(optim.warmup_steps), max(num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=optim.lr * 0.01)
  # Decay matrices only: biases, norms and the logit scale are not shrunk.
  decay_mask = jax.tree.map(lambda p: np.ndim(p) >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.get("eps", 1e-8)),
      optax.add_decayed_weights(optim.weight_decay, mask=decay_mask))
  if freeze:
    frozen = sharding.path_mask(params, freeze)
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               labels)
  return tx, schedule


def apply_update(state, grads, tx, lr):
  """One optimiser update with learning rate `lr` (a traced scalar)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: -lr * u, updates)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  # Stage 1 only: pseudo-label per record of the train split (-1: not in pool).
  pseudo_labels: jax.Array | None = None


def create_state(params, tx, mesh, pseudo_labels=None, rules=()):
  """Places a fresh train state on the mesh (params per the sharding rules)."""
  shardings = sharding.param_shardings(params, mesh, rules)
  params = jax.tree.map(jax.device_put, params, shardings)
  # Optimiser moments follow their params' shardings; scalars are replicated.
  opt_state = jax.jit(tx.init)(params)
  opt_state = jax.tree.map(
      lambda x: x if len(x.sharding.device_set) == mesh.devices.size else
      jax.device_put(x, sharding.replicated(mesh)), opt_state)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  return TrainState(step=step, params=params, opt_state=opt_state,
                    pseudo_labels=pseudo_labels)


# ----------------------------------------------------------------------------
# Losses of the two stages, as functions of params.


def loss_weights(loss_config):
  """The static weights dict that losses.hica_loss takes."""
  return {
      "global": float(loss_config.global_weight),
      "local": float(loss_config.local_weight),
      "cross": float(loss_config.cross_weight),
      "beta": float(loss_config.beta),
      "margin": float(loss_config.margin),
      "local_mode": loss_config.local_mode,
      "label_aware": bool(loss_config.label_aware),
      "chunk_size": loss_config.get("chunk_size"),
  }


def stage2_outputs(model, params, batch, desc, num_classes, train=True):
  """Model outputs that losses.hica_loss consumes (see docs/design.md).

  Texts, phrases and descriptors go through the text tower in one call (one
  trace, one compiled tower); phrases are right-padded to the text length,
  which leaves their valid tokens unchanged under the padding mask.
  """
  image_emb, patch_emb = model.apply(params, batch["image"], train=train,
                                     method=model.encode_image)
  b, length = batch["text_ids"].shape
  lp = batch["phrase_ids"].shape[1]
  pad = [(0, 0), (0, length - lp)]
  ids = jnp.concatenate([batch["text_ids"],
                         jnp.pad(batch["phrase_ids"], pad), desc["ids"]])
  mask = jnp.concatenate([batch["text_mask"],
                          jnp.pad(batch["phrase_mask"], pad), desc["mask"]])
  pooled, tokens = model.apply(params, ids, mask, train=train,
                               method=model.encode_text)
  return {
      "image_emb": image_emb, "patch_emb": patch_emb,
      "text_emb": pooled[:b], "phrase_emb": pooled[b:2 * b],
      "phrase_tokens": tokens[b:2 * b, :lp],
      "prototypes": losses.category_prototypes(pooled[2 * b:],
                                               desc["category"], num_classes),
      "logit_scale": model.apply(params, method=model.get_logit_scale),
  }


def make_stage2_step(model, tx, weights, num_classes):
  """Jitted stage-2 step: (state, batch, desc, lr) -> (state, metrics)."""

  def loss_fn(params, batch, desc):
    outputs = stage2_outputs(model, params, batch, desc, num_classes)
    return losses.hica_loss(outputs, batch, weights)

  def step(state, batch, desc, lr):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, desc)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return apply_update(state, grads, tx, lr), metrics

  return jax.jit(step, donate_argnums=(0,))


def cluster_head_init(key, width, num_clusters):
  return {"kernel": jax.random.normal(key, (width, num_clusters)) * 0.01,
          "bias": jnp.zeros((num_clusters,))}


def make_stage1_step(model, tx, s1, special_ids, vocab_size, mask_id):
  """Jitted stage-1 step: DeepCluster CE on images + MLM on text."""
  num_clusters = s1.num_clusters

  def loss_fn(params, pseudo_labels, batch, text, key):
    feats = model.apply(params["model"], batch["image"], train=True,
                        method=model.image_features)
    feats = feats / (jnp.linalg.norm(feats, axis=-1, keepdims=True) + 1e-6)
    head = params["cluster_head"]
    logits = feats @ head["kernel"] + head["bias"]
    targets = pseudo_labels[batch["index"]]
    loss_image = losses.cluster_classification_loss(logits, targets,
                                                    num_clusters)
    ids, mlm_mask = losses.mask_tokens_for_mlm(
        key, text["ids"], text["mask"], mask_id, vocab_size,
        special_token_ids=special_ids, rate=s1.mlm_rate)
    if s1.text_objective == "mlm":
      lm_logits = model.apply(params["model"], ids, text["mask"],
                              method=model.mlm_logits)
      loss_text = losses.masked_lm_loss(lm_logits, text["ids"], mlm_mask)
    else:
      lm_logits = model.apply(params["model"], text["ids"], text["mask"],
                              method=model.mlm_logits)
      loss_text = losses.causal_lm_loss(lm_logits, text["ids"], text["mask"])
    loss = s1.image_weight * loss_image + s1.text_weight * loss_text
    acc = jnp.mean(jnp.argmax(logits, -1) == targets)
    return loss, {"loss_cluster": loss_image, "loss_text": loss_text,
                  "cluster_acc": acc}

  def step(state, batch, text, key, lr):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.pseudo_labels, batch, text, key)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return apply_update(state, grads, tx, lr), metrics

  return jax.jit(step, donate_argnums=(0,))


# ----------------------------------------------------------------------------
# Embedding helpers shared with evaluation.


def make_embed_fns(model, mesh):
  """Jitted, batch-sharded image/text encoders returning normalised outputs."""

  def image_fn(params, images):
    g, _ = model.apply(params, images, method=model.encode_image)
    feats = model.apply(params, images, method=model.image_features)
    return _l2(g), feats

  def text_fn(params, ids, mask):
    u, _ = model.apply(params, ids, mask, method=model.encode_text)
    return _l2(u)

  return jax.jit(image_fn), jax.jit(text_fn)


def _l2(x):
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def batched_apply(fn, params, arrays, batch_size, mesh):
  """Applies fn(params, *arrays) in global batches (last one padded)."""
  n = len(arrays[0])
  ndev = mesh.devices.size
  batch_size = max(ndev, batch_size - batch_size % ndev)
  outs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    m = len(chunk[0])
    pad = (-m) % ndev
    if pad:
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
    chunk = sharding.shard_batch(chunk, mesh) if jax.process_count() == 1 \
        else chunk
    res = fn(params, *chunk)
    outs.append(jax.tree.map(lambda r: np.asarray(r)[:m], res))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


# ----------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  steps: int
  final_loss: float
  seconds: float
  history: list


def train_loop(state, step_fn, data_iter, num_steps, *, mesh, desc, schedule,
               writer=None, mngr=None, ckpt_every=0, log_every=10,
               extra_fn=None, before_step=None, step_args=()):
  """Runs step_fn until num_steps, checkpointing and logging on the way.

  Args:
    state: TrainState (already restored when resuming).
    step_fn: jitted (state, batch, *step_args, lr) -> (state, metrics).
    schedule: step -> learning rate.
    data_iter: grain iterator positioned at state.step.
    mngr: orbax CheckpointManager or None (no checkpoints).
    extra_fn: () -> JSON-able dict saved with each checkpoint.
    before_step: optional (state, step) -> (state, step_args) hook (stage 1
      reclusters there).
  """
  start_step = int(state.step)
  t0 = time.time()
  history, last_loss = [], float("nan")
  metrics_acc = []
  bar = tqdm(total=num_steps, initial=start_step, desc=desc,
             disable=jax.process_index() != 0, dynamic_ncols=True)
  for step in range(start_step, num_steps):
    args = step_args
    if before_step is not None:
      state, args = before_step(state, step)
    batch = sharding.shard_batch(next(data_iter), mesh)
    lr = np.float32(schedule(step))
    state, metrics = step_fn(state, batch, *args, lr)
    metrics_acc.append(dict(metrics, lr=lr))
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      host = jax.device_get(metrics_acc)
      mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      metrics_acc = []
      last_loss = mean["loss"]
      if not np.isfinite(last_loss):
        raise FloatingPointError(
            f"{desc}: non-finite loss {last_loss} at step {done}; the last "
            "good checkpoint is kept. Lower the learning rate.")
      history.append({"step": done, **mean})
      if writer is not None:
        writer.write(done, mean)
      bar.set_postfix(loss=f"{last_loss:.4f}")
    bar.update(1)
    if mngr is not None and ckpt_every and done % ckpt_every == 0 \
        and done != num_steps:
      ckpt_lib.save(mngr, done, state, extra_fn() if extra_fn else None)
  bar.close()
  if mngr is not None and num_steps > start_step:
    ckpt_lib.save(mngr, num_steps, state, extra_fn() if extra_fn else None,
                  force=True)
    mngr.wait_until_finished()
  return LoopResult(state=state, steps=num_steps, final_loss=last_loss,
                    seconds=time.time() - t0, history=history)


def _restore_if_any(mngr, state):
  """(state, extra) from the newest checkpoint, or (state, None)."""
  if mngr is None or mngr.latest_step() is None:
    return state, None
  return ckpt_lib.restore(mngr, ckpt_lib.abstract(state))


# ----------------------------------------------------------------------------
# Context shared by the stages.


@dataclasses.dataclass
class Context:
  """Everything the stages share: config, model, data, tokenizer, mesh."""
  config: object
  model_config: object              # config.model resolved against HF inits
  workdir: str
  mesh: object
  model: object
  data: pipeline.DatasetHandle
  tokenizer: object
  tables: pipeline.TextTables       # seen classes, the stage-2 task
  mean: tuple
  std: tuple
  step_cache: dict = dataclasses.field(default_factory=dict)

  def preprocessor(self, tables=None, train=True):
    tables = tables or self.tables
    class_of = {self.data.categories.index(c): i
                for i, c in enumerate(tables.classes)}
    aug = dict(self.config.data.augment) if train else None
    return pipeline.Preprocessor(tables=tables, class_of=class_of,
                                 image_size=self.config.data.image_size,
                                 mean=self.mean, std=self.std, aug=aug)

  def class_ids(self, classes):
    return [self.data.categories.index(c) for c in classes]

  def desc_arrays(self, tables=None):
    tables = tables or self.tables
    return sharding.replicate({"ids": tables.desc_ids,
                               "mask": tables.desc_mask,
                               "category": tables.desc_category}, self.mesh)


def init_params(ctx, key):
  """Fresh model params, optionally initialised from Hugging Face weights."""
  from hica_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  size = ctx.config.data.image_size
  images = jnp.zeros((1, size, size, 3))
  ids = jnp.zeros((1, ctx.model_config.text.max_len), jnp.int32)
  params = jax.jit(ctx.model.init)(key, images, ids, jnp.ones_like(ids))
  params = flax.core.unfreeze(params)
  return hf_import.init_from_hf(ctx.model_config, params)


# ----------------------------------------------------------------------------
# Stage 1: domain-specific pretraining.


def run_stage1(ctx, writer=None):
  """DeepCluster pseudo-label CE on images and MLM on the text corpus."""
  cfg, s1, mesh, model = ctx.config, ctx.config.stage1, ctx.mesh, ctx.model
  sharding.check_global_batch(s1.batch_size, mesh, "stage1.batch_size")
  key = jax.random.PRNGKey(cfg.seed)
  source = ctx.data.source("train")
  # The unlabelled pool: train images of seen categories (unseen ones stay
  # out of every training stage so that the unseen study is clean).
  pool = source.indices_of(ctx.class_ids(ctx.data.seen))
  preprocess = ctx.preprocessor()
  eval_preprocess = ctx.preprocessor(train=False)

  params = {"model": init_params(ctx, jax.random.fold_in(key, 0))}
  feat_width = model.apply(
      params["model"], jnp.zeros((1,) + (cfg.data.image_size,) * 2 + (3,)),
      method=model.image_features).shape[-1]
  params["cluster_head"] = cluster_head_init(jax.random.fold_in(key, 1),
                                             feat_width, s1.num_clusters)
  tx, schedule = make_optimizer(s1.optim, s1.steps, params,
                                s1.get("freeze", ()))
  pseudo = jnp.full((len(source),), -1, jnp.int32)
  state = create_state(params, tx, mesh,
                       pseudo_labels=jax.device_put(
                           pseudo, sharding.replicated(mesh)))
  mngr = ckpt_lib.manager(ctx.workdir, "stage1")
  state, extra = _restore_if_any(mngr, state)

  # Text corpus: tokenised once; each step draws rows by a seeded generator.
  corpus = pipeline.text_corpus(ctx.data.bank, [])
  corpus_ids, corpus_mask = tokenizer_lib.tokenize(
      ctx.tokenizer, corpus, ctx.model_config.text.max_len)
  special = tokenizer_lib.special_ids(ctx.tokenizer)
  vocab = tokenizer_lib.vocab_size(ctx.tokenizer)
  if s1.text_objective == "mlm" and special["mask"] is None:
    raise ValueError("stage1.text_objective='mlm' needs a tokenizer with a "
                     "mask token; use 'clm' for causal (CLIP-style) towers.")
  step_fn = make_stage1_step(model, tx, s1, tuple(special["all_special"]),
                             vocab, special["mask"] or 0)
  image_fn, _ = make_embed_fns(model, mesh)
  kmeans_fn = jax.jit(lambda f, k: losses.kmeans(
      f, s1.num_clusters, k, s1.kmeans_iters), static_argnums=())
  history = {"prev": None}

  def recluster(state, step):
    feats = []
    for start in range(0, len(pool), s1.embed_batch):
      idx = pool[start:start + s1.embed_batch]
      arrays = pipeline.eval_arrays(source, idx, eval_preprocess,
                                    desc="embedding pool")
      _, f = batched_apply(image_fn, state.params["model"], [arrays["image"]],
                           s1.embed_batch, mesh)
      feats.append(f)
    feats = np.concatenate(feats)
    feats = feats / (np.linalg.norm(feats, axis=-1, keepdims=True) + 1e-6)
    _, assign = kmeans_fn(jnp.asarray(feats),
                          jax.random.fold_in(key, 100 + step))
    assign = np.asarray(assign)
    sizes = np.bincount(assign, minlength=s1.num_clusters)
    p = sizes[sizes > 0] / sizes.sum()
    stats = {"cluster_entropy": float(-(p * np.log(p)).sum()),
             "cluster_max_frac": float(sizes.max() / sizes.sum())}
    if history["prev"] is not None:
      from sklearn.metrics import normalized_mutual_info_score  # pylint: disable=g-import-not-at-top
      stats["nmi_prev"] = float(normalized_mutual_info_score(history["prev"],
                                                             assign))
    history["prev"] = assign
    if writer is not None:
      writer.write(step, stats)
    full = np.full((len(source),), -1, np.int32)
    full[pool] = assign
    head = cluster_head_init(jax.random.fold_in(key, 200 + step), feat_width,
                             s1.num_clusters)
    params = dict(state.params)
    params["cluster_head"] = jax.device_put(head, sharding.replicated(mesh))
    # A new head starts with fresh Adam moments.
    opt_state = reset_opt_state(state.opt_state, "cluster_head")
    return state.replace(params=params, opt_state=opt_state,
                         pseudo_labels=jax.device_put(
                             jnp.asarray(full), sharding.replicated(mesh)))

  def before_step(state, step):
    if step % s1.recluster_every == 0 or int(
        np.asarray(state.pseudo_labels).max()) < 0:
      state = recluster(state, step)
    rng = np.random.default_rng([cfg.seed, 7, step])
    rows = rng.integers(0, len(corpus_ids), s1.text_batch_size)
    text = sharding.replicate({"ids": corpus_ids[rows],
                               "mask": corpus_mask[rows]}, mesh)
    return state, (text, jax.random.fold_in(key, 1000 + step))

  it = iter(pipeline.train_dataset(source, pool, preprocess, s1.batch_size,
                                   s1.steps, seed=cfg.seed))
  if extra and extra.get("data_iter") is not None:
    it.set_state(extra["data_iter"])
  result = train_loop(state, step_fn, it, s1.steps, mesh=mesh, desc="stage1",
                      schedule=schedule, writer=writer, mngr=mngr,
                      ckpt_every=s1.ckpt_every,
                      log_every=s1.log_every,
                      extra_fn=lambda: {"data_iter": it.get_state()},
                      before_step=before_step)
  ckpt_lib.mark_final(ctx.workdir, "stage1", s1.steps)
  return result


def reset_opt_state(opt_state, name):
  """Zeroes the optimiser moments of every leaf under `name` in its path."""
  def reset(path, x):
    keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return jnp.zeros_like(x) if name in keys else x
  return jax.tree_util.tree_map_with_path(reset, opt_state)


# ----------------------------------------------------------------------------
# Stage 2: hierarchical contrastive alignment.


def run_stage2_on(ctx, init_params_, indices, num_steps, seed, *, tables=None,
                  mngr=None, writer=None, desc="stage2"):
  """Stage 2 on the records `indices` of the train split, from init params.

  Used by the stage-2 stage (with a checkpoint manager) and by every few-shot
  evaluation cell (without). Runs of equal shapes and optimiser share one
  compiled step through `ctx.step_cache`.
  """
  cfg, s2, mesh, model = ctx.config, ctx.config.stage2, ctx.mesh, ctx.model
  tables = tables or ctx.tables
  sharding.check_global_batch(s2.batch_size, mesh, "stage2.batch_size")
  tx, schedule = make_optimizer(s2.optim, num_steps, init_params_,
                                s2.get("freeze", ()))
  state = create_state(jax.tree.map(jnp.array, init_params_), tx, mesh)
  state, extra = _restore_if_any(mngr, state)
  weights = loss_weights(s2.loss)
  cache_key = ("stage2", tables.num_classes, len(tables.desc_ids),
               tuple(s2.get("freeze", ())), tuple(sorted(weights.items())))
  if cache_key not in ctx.step_cache:
    ctx.step_cache[cache_key] = make_stage2_step(model, tx, weights,
                                                 tables.num_classes)
  step_fn = ctx.step_cache[cache_key]
  source = ctx.data.source("train")
  it = iter(pipeline.train_dataset(source, indices, ctx.preprocessor(tables),
                                   s2.batch_size, num_steps, seed=seed))
  if extra and extra.get("data_iter") is not None:
    it.set_state(extra["data_iter"])
  return train_loop(state, step_fn, it, num_steps, mesh=mesh, desc=desc,
                    schedule=schedule, writer=writer, mngr=mngr,
                    ckpt_every=s2.ckpt_every,
                    log_every=s2.log_every,
                    extra_fn=lambda: {"data_iter": it.get_state()},
                    step_args=(ctx.desc_arrays(tables),))


def stage2_indices(ctx, shots, seed):
  """Train-split records stage 2 learns from: a K-shot support set or all."""
  from hica_jax.data import fewshot  # pylint: disable=g-import-not-at-top
  source = ctx.data.source("train")
  seen_ids = ctx.class_ids(ctx.data.seen)
  if not shots:
    return source.indices_of(seen_ids)
  labels = source.labels()
  return np.asarray(fewshot.sample_support(labels, shots, seed,
                                           classes=seen_ids))


def run_stage2(ctx, writer=None):
  s2 = ctx.config.stage2
  init = load_final_params(ctx, "stage1")
  if init is None:
    init = init_params(ctx, jax.random.PRNGKey(ctx.config.seed))
  indices = stage2_indices(ctx, s2.get("shots"), ctx.config.seed)
  mngr = ckpt_lib.manager(ctx.workdir, "stage2")
  result = run_stage2_on(ctx, init, indices, s2.steps, ctx.config.seed,
                         mngr=mngr, writer=writer)
  ckpt_lib.mark_final(ctx.workdir, "stage2", s2.steps)
  return result


def load_final_params(ctx, stage):
  """Model params from a stage's final checkpoint (None if not finished)."""
  if not ckpt_lib.is_final(ctx.workdir, stage):
    return None
  state, _ = ckpt_lib.restore_raw(ckpt_lib.manager(ctx.workdir, stage))
  params = state["params"]
  if stage == "stage1":
    params = params["model"]
  return jax.device_put(params, sharding.replicated(ctx.mesh))
