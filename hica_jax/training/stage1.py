"""Stage 1: domain-specific pretraining of both towers.

Images, pseudo-labels from clustering (`stage1.image_objective`):
- "deepcluster": every `recluster_every` steps the unlabelled pool is
  embedded and clustered with k-means; a re-initialised linear head is
  trained with cross-entropy on the cluster ids;
- "swav": online clustering against learnable prototypes (selfsup.py):
  multi-crop views of each image, Sinkhorn-balanced codes of the global
  views, each view predicting the codes of the others.
Text: masked (or causal) language modelling on the descriptor corpus.
"""
from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from hica_jax import checkpoint as ckpt_lib
from hica_jax import context as context_lib
from hica_jax import predict
from hica_jax import selfsup
from hica_jax import pretrain_losses
from hica_jax import sharding
from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import pipeline
from hica_jax.data import text_tables
from hica_jax.training import loop


def crop_spec(s1, image_size):
  """selfsup.CropSpec of config.stage1.swav: global views at the model's
  image size, local views at swav.local_size."""
  sw = s1.swav
  return selfsup.CropSpec(
      global_size=int(image_size), local_size=int(sw.local_size),
      num_global=int(sw.num_global), num_local=int(sw.num_local),
      global_scale=tuple(sw.global_scale), local_scale=tuple(sw.local_scale),
      rotate=float(sw.rotate), hflip=float(sw.hflip),
      speckle=float(sw.speckle))


def prototype_head(s1):
  sw = s1.swav
  return selfsup.PrototypeHead(num_prototypes=int(sw.num_prototypes),
                               hidden=int(sw.hidden),
                               bottleneck=int(sw.bottleneck))


def queue_use_from(s1):
  """First step at which the SwAV queue enters the Sinkhorn: at
  swav.queue_start, and not before the queue is full of real embeddings."""
  q, b = int(s1.swav.get("queue_length", 0)), int(s1.batch_size)
  return max(int(s1.swav.get("queue_start", 0)), -(-q // b))


def swav_image_loss(model, params, images, key, s1, queue=None,
                    use_queue=False):
  """(loss, (metrics, embeddings)) of SwAV on multi-crop views of `images`
  f32[B,S,S,3] (the pipeline's per-image standardised images, rescaled to
  [0, 1] gray). queue: f32[num_global, Q, bottleneck] embeddings of earlier
  batches or None; use_queue: a traced bool, whether the codes are balanced
  together with the queue. embeddings: f32[num_global, B, bottleneck] of
  this batch's global views (no gradient), for the queue.
  """
  gray = images.mean(-1)
  lo = gray.min((1, 2), keepdims=True)
  hi = gray.max((1, 2), keepdims=True)
  gray = (gray - lo) / jnp.maximum(hi - lo, 1e-6)
  spec = crop_spec(s1, images.shape[1])
  views = [v for v in selfsup.multi_crop(key, gray, spec) if v is not None]
  head = prototype_head(s1)

  def scores(v):  # [V, B, S, S, 3] -> ([V, B, K], [V, B, D]); head
    n, b = v.shape[:2]  # statistics per view
    f = model.apply(params["model"], v.reshape((n * b,) + v.shape[2:]),
                    train=True, method=model.image_features)
    return jax.vmap(lambda x: head.apply(params["ssl_head"], x,
                                         return_embedding=True))(
                                             f.reshape(n, b, -1))

  per_size = [scores(v) for v in views]
  all_scores = jnp.concatenate([sc for sc, _ in per_size])
  embeddings = jax.lax.stop_gradient(per_size[0][1])  # the global views
  sw = s1.swav
  swav = lambda queue_scores: selfsup.swav_loss(
      all_scores, spec.num_global, float(sw.temperature),
      float(sw.sinkhorn_eps), int(sw.sinkhorn_iters),
      queue_scores=queue_scores)[0]
  metrics = {"cluster_entropy": selfsup.cluster_size_entropy(all_scores[0]),
             "view_agreement": selfsup.view_agreement(all_scores[0],
                                                      all_scores[1])}
  if queue is None:
    return swav(None), (metrics, embeddings)
  protos = params["ssl_head"]["params"]["prototypes"]
  queue_scores = jax.lax.stop_gradient(
      selfsup.prototype_scores(protos, queue))
  # One branch runs: the queue's Sinkhorn only once it is in use.
  loss = jax.lax.cond(use_queue, lambda: swav(queue_scores),
                      lambda: swav(None))
  metrics["queue_in_use"] = use_queue.astype(jnp.float32)
  return loss, (metrics, embeddings)


def make_stage1_step(model, tx, s1, special_ids, vocab_size, mask_id, *,
                     mesh=None, state_sharding=None):
  """Jitted stage-1 step: the image objective + MLM (or CLM) on text."""
  num_clusters = s1.num_clusters
  objective = s1.get("image_objective", "deepcluster")
  queue_from = queue_use_from(s1)

  def image_loss(params, state, batch, key):
    if objective == "swav":
      return swav_image_loss(model, params, batch["image"], key, s1,
                             state.queue, state.step >= queue_from)
    feats = model.apply(params["model"], batch["image"], train=True,
                        method=model.image_features)
    feats = feats / (jnp.linalg.norm(feats, axis=-1, keepdims=True) + 1e-6)
    head = params["cluster_head"]
    logits = feats @ head["kernel"] + head["bias"]
    targets = state.pseudo_labels[batch["index"]]
    loss = pretrain_losses.cluster_classification_loss(logits, targets,
                                                       num_clusters)
    return loss, ({"cluster_acc": jnp.mean(jnp.argmax(logits, -1) == targets)},
                  None)

  def loss_fn(params, state, batch, text, key):
    loss_image, (image_metrics, embeddings) = image_loss(
        params, state, batch, jax.random.fold_in(key, 1))
    ids, mlm_mask = pretrain_losses.mask_tokens_for_mlm(
        key, text["ids"], text["mask"], mask_id, vocab_size,
        special_token_ids=special_ids, rate=s1.mlm_rate)
    if s1.text_objective == "mlm":
      lm_logits = model.apply(params["model"], ids, text["mask"],
                              method=model.mlm_logits)
      loss_text = pretrain_losses.masked_lm_loss(lm_logits, text["ids"],
                                                 mlm_mask)
    else:
      lm_logits = model.apply(params["model"], text["ids"], text["mask"],
                              method=model.mlm_logits)
      loss_text = pretrain_losses.causal_lm_loss(lm_logits, text["ids"],
                                                 text["mask"])
    loss = s1.image_weight * loss_image + s1.text_weight * loss_text
    return loss, (dict(image_metrics, loss_cluster=loss_image,
                       loss_text=loss_text), embeddings)

  def step(state, batch, text, key, lr):
    (loss, (metrics, embeddings)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state, batch, text, key)
    new_state, ok = loop.apply_update(state, grads, loss, tx, lr)
    if state.queue is not None:
      # Newest first; a skipped (non-finite) step leaves the queue alone.
      pushed = selfsup.push_queue(state.queue, embeddings)
      new_state = new_state.replace(
          queue=jnp.where(ok, pushed, state.queue))
    return new_state, loop.step_metrics(metrics, loss, grads, ok)

  return loop.jit_step(step, mesh, loop.hashable_shardings(state_sharding))


def pool_size(num_train, fraction):
  """Images stage 1 trains on out of `num_train` at stage1.pool_fraction."""
  if fraction >= 1.0:
    return int(num_train)
  return max(1, int(round(fraction * num_train)))


def unlabelled_pool(indices, fraction, seed):
  """i[M] sorted: a seeded uniform sample of pool_size(N, fraction) of the
  train records i[N], drawn without their labels; all of them when
  fraction is 1."""
  indices = np.asarray(indices)
  size = pool_size(len(indices), fraction)
  if size == len(indices):
    return indices
  rng = np.random.default_rng([int(seed), 1])
  return np.sort(rng.choice(indices, size, replace=False))


def run(ctx, writer=None):
  """The stage: config.stage1.image_objective on the unlabelled pool's
  images and MLM (or CLM) on the text corpus."""
  cfg, s1, mesh, model = ctx.config, ctx.config.stage1, ctx.mesh, ctx.model
  sharding.check_global_batch(s1.batch_size, mesh, "stage1.batch_size")
  key = jax.random.PRNGKey(cfg.seed)
  source = ctx.data.source("train")
  # The unlabelled pool: train images of seen categories (unseen ones stay
  # out of every training stage so that the unseen study is clean).
  pool = unlabelled_pool(source.indices_of(ctx.class_ids(ctx.data.seen)),
                         s1.get("pool_fraction", 1.0), cfg.seed)
  logging.info("Stage 1 pool: %d train images.", len(pool))
  preprocess = ctx.preprocessor()
  eval_preprocess = ctx.preprocessor(train=False)

  params = {"model": context_lib.init_params(ctx,
                                             jax.random.fold_in(key, 0))}
  feat_width = model.apply(
      params["model"], jnp.zeros((1,) + (cfg.data.image_size,) * 2 + (3,)),
      method=model.image_features).shape[-1]
  swav = s1.get("image_objective", "deepcluster") == "swav"
  if swav:
    params["ssl_head"] = flax.core.unfreeze(prototype_head(s1).init(
        jax.random.fold_in(key, 1), jnp.zeros((2, feat_width))))
  else:
    params["cluster_head"] = loop.linear_head_init(
        jax.random.fold_in(key, 1), feat_width, s1.num_clusters)
  tx, schedule = loop.make_optimizer(s1.optim, s1.steps,
                                     **loop.freeze_args(s1))
  pseudo = np.full((len(source),), -1, np.int32)
  queue_length = int(s1.swav.get("queue_length", 0)) if swav else 0
  queue = (sharding.replicate(np.zeros(
      (int(s1.swav.num_global), queue_length, int(s1.swav.bottleneck)),
      np.float32), mesh) if queue_length else None)
  state = loop.create_state(params, tx, mesh,
                            pseudo_labels=sharding.replicate(pseudo, mesh),
                            param_shardings=ctx.param_shardings(params),
                            queue=queue)
  mngr = ckpt_lib.manager(ctx.workdir, "stage1")
  state, extra = loop.restore_if_any(mngr, state)

  # Text corpus: tokenised once; each step draws rows by a seeded generator.
  corpus = text_tables.text_corpus(ctx.data.bank, [])
  corpus_ids, corpus_mask = tokenizer_lib.tokenize(
      ctx.tokenizer, corpus, ctx.model_config.text.max_len)
  special = tokenizer_lib.special_ids(ctx.tokenizer)
  vocab = tokenizer_lib.vocab_size(ctx.tokenizer)
  if s1.text_objective == "mlm" and special["mask"] is None:
    raise ValueError("stage1.text_objective='mlm' needs a tokenizer with a "
                     "mask token; use 'clm' for causal (CLIP-style) towers.")
  step_fn = make_stage1_step(model, tx, s1, tuple(special["all_special"]),
                             vocab, special["mask"] or 0, mesh=mesh,
                             state_sharding=loop.state_shardings(state))
  image_fn, _ = predict.embed_fns(model)
  kmeans_fn = jax.jit(lambda f, k: pretrain_losses.kmeans(
      f, s1.num_clusters, k, s1.kmeans_iters), static_argnums=())
  history = {"prev": None}

  def recluster(state, step):
    feats = []
    for start in range(0, len(pool), s1.embed_batch):
      idx = pool[start:start + s1.embed_batch]
      arrays = pipeline.eval_arrays(source, idx, eval_preprocess,
                                    desc="embedding pool")
      _, f = predict.batched_apply(image_fn, state.params["model"],
                                   [arrays["image"]], s1.embed_batch, mesh)
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
    head = loop.linear_head_init(jax.random.fold_in(key, 200 + step), feat_width,
                             s1.num_clusters)
    params = dict(state.params)
    params["cluster_head"] = sharding.place(
        head, loop.state_shardings(state.params["cluster_head"]))
    # A new head starts with fresh Adam moments.
    opt_state = loop.reset_opt_state(state.opt_state, "cluster_head")
    return state.replace(params=params, opt_state=opt_state,
                         pseudo_labels=sharding.replicate(full, mesh))

  def before_step(state, step):
    if not swav and (step % s1.recluster_every == 0 or int(
        np.asarray(state.pseudo_labels).max()) < 0):
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
  result = loop.train_loop(
      state, step_fn, it, s1.steps, mesh=mesh, desc="stage1",
      schedule=schedule, writer=writer, mngr=mngr, ckpt_every=s1.ckpt_every,
      log_every=s1.log_every, extra_fn=lambda: {"data_iter": it.get_state()},
      before_step=before_step, resume=extra,
      max_nonfinite=ctx.max_nonfinite())
  ckpt_lib.mark_final(ctx.workdir, "stage1", s1.steps)
  return result


