"""HiCA training: stage 1 (domain pretraining) and stage 2 (alignment).

Read top to bottom: optimiser, train state, the two loss functions, the jitted
sharded steps, the shared loop (checkpoint, resume, metrics, progress bar),
then the two stage entry points. The global batch is split over the mesh
axis "data"; params are placed by the rules of `config.sharding` (replicated
by default, FSDP or a model axis by a config change) and XLA inserts the
collectives. The loop survives faults: a non-finite loss skips its update,
SIGTERM checkpoints and stops, and a run resumes exactly from its newest
readable checkpoint.
"""
import contextlib
import dataclasses
import itertools
import signal
import threading
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from hica_jax import checkpoint as ckpt_lib
from hica_jax import losses
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


def apply_update(state, grads, loss, tx, lr):
  """One optimiser update with learning rate `lr` (a traced scalar).

  A step whose loss or gradient is not finite changes nothing but the step
  counter (the batch is consumed, so that resuming stays exact).
  Returns (state, ok) with ok a bool scalar.
  """
  ok = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: -lr * u, updates)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jnp.where(ok, new, old)
  return state.replace(step=state.step + 1,
                       params=jax.tree.map(keep, params, state.params),
                       opt_state=jax.tree.map(keep, opt_state,
                                              state.opt_state)), ok


def step_metrics(metrics, loss, grads, ok):
  """Per-step metrics every step returns (`nonfinite` is 1.0 when skipped)."""
  return dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
              nonfinite=1.0 - ok.astype(jnp.float32))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  # Stage 1 only: pseudo-label per record of the train split (-1: not in pool).
  pseudo_labels: jax.Array | None = None


def create_state(params, tx, mesh, pseudo_labels=None, param_shardings=None):
  """Places a fresh train state on the mesh.

  Params go to `param_shardings` (default replicated); optimiser moments
  follow their params, counts and scalars are replicated.
  """
  if param_shardings is None:
    param_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  params = sharding.place(params, param_shardings)
  opt_shardings = sharding.follow_params(jax.eval_shape(tx.init, params),
                                         params, param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  step = sharding.replicate(np.zeros((), np.int32), mesh)
  return TrainState(step=step, params=params, opt_state=opt_state,
                    pseudo_labels=pseudo_labels)


def state_shardings(state):
  """The sharding of every array of a state (the steps keep them fixed)."""
  return jax.tree.map(lambda x: x.sharding, state)


def _jit_step(step, mesh, state_sharding):
  """jit with the state donated and, when known, its shardings kept.

  Pinning the output state to the input shardings keeps FSDP params split
  and lets every later call reuse the first compilation.
  """
  if state_sharding is None:
    return jax.jit(step, donate_argnums=(0,))
  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(state_sharding, sharding.replicated(mesh)))


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


def text_inputs_needed(weights):
  """Which text-tower inputs the nonzero terms of `weights` read:
  (texts for L_g, phrases for L_l, descriptor prototypes for L_c). A term
  with weight 0 is not computed, so its inputs are not embedded either:
  global-only training embeds B texts per step, as CLIP does, not
  2B + D sequences."""
  if weights is None:
    return True, True, True
  return bool(weights["global"]), bool(weights["local"]), \
      bool(weights["cross"])


def _encode_examples(model, params, batch, desc=None, train=True,
                     weights=None):
  """Per-example tower outputs, and pooled descriptor embeddings if `desc`.

  Texts, phrases (and descriptors) go through the text tower in one call
  (one trace, one compiled tower); phrases are right-padded to the text
  length, which leaves their valid tokens unchanged under the padding mask.
  Only what the nonzero terms of `weights` read is embedded
  (text_inputs_needed; None: everything).
  Returns ({image_emb, patch_emb, and as needed text_emb, phrase_emb,
  phrase_tokens}, desc_emb f32[D, d] or None).
  """
  texts, phrases, descriptors = text_inputs_needed(weights)
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


def _loss_inputs(model, params, examples, desc_emb, desc, num_classes):
  """Tower outputs -> the `outputs` dict losses.hica_loss consumes."""
  out = dict(examples,
             logit_scale=model.apply(params, method=model.get_logit_scale))
  if desc_emb is not None:
    out["prototypes"] = losses.category_prototypes(desc_emb, desc["category"],
                                                   num_classes)
  return out


def stage2_outputs(model, params, batch, desc, num_classes, train=True,
                   weights=None):
  """Model outputs that losses.hica_loss consumes (see docs/design.md); with
  `weights`, only those its nonzero terms read."""
  examples, desc_emb = _encode_examples(model, params, batch, desc, train,
                                        weights)
  return _loss_inputs(model, params, examples, desc_emb, desc, num_classes)


# Batch fields the towers read; the loss reads the rest of the batch whole.
TOWER_INPUTS = ("image", "text_ids", "text_mask", "phrase_ids", "phrase_mask")


def _to_chunks(x, chunks, shards):
  """[B, ...] -> [chunks, B/chunks, ...].

  Chunk c takes rows [c*m, (c+1)*m) of every one of the `shards` data shards
  (m = B / (shards * chunks)), so every device works on every chunk and
  chunking moves no data between devices.
  """
  m = x.shape[0] // (shards * chunks)
  x = x.reshape((shards, chunks, m) + x.shape[1:]).swapaxes(0, 1)
  return x.reshape((chunks, shards * m) + x.shape[3:])


def _from_chunks(x, shards):
  """Inverse of _to_chunks: [chunks, B/chunks, ...] -> [B, ...]."""
  chunks, n = x.shape[:2]
  x = x.reshape((chunks, shards, n // shards) + x.shape[2:]).swapaxes(0, 1)
  return x.reshape((chunks * n,) + x.shape[3:])


def stage2_loss_and_grads(model, params, batch, desc, weights, num_classes,
                          accum_steps=1, mesh=None):
  """(loss, metrics, grads) of L_HiCA on the whole global batch B.

  With accum_steps > 1 this is GradCache (Gao et al. 2021): the towers embed
  the batch in `accum_steps` chunks without keeping activations; the loss
  and its gradient w.r.t. the embeddings are computed on the whole batch
  (every contrastive negative stays in); then each chunk is re-embedded and
  back-propagated with its slice of those embedding gradients. Tower
  activations are held for B / accum_steps examples at a time; the
  gradients equal the full-batch ones (the towers are deterministic here:
  no dropout rng). B must divide into accum_steps x data shards.
  """
  if accum_steps == 1:
    def loss_fn(p):
      return losses.hica_loss(stage2_outputs(model, p, batch, desc,
                                             num_classes, weights=weights),
                              batch, weights)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, grads

  shards = 1 if mesh is None else sharding.data_size(mesh)
  chunks = {k: _to_chunks(batch[k], accum_steps, shards)
            for k in TOWER_INPUTS}
  if mesh is not None:
    chunks = jax.lax.with_sharding_constraint(
        chunks, NamedSharding(mesh, P(None, sharding.DATA_AXIS)))

  def embed(p, chunk):
    return _encode_examples(model, p, chunk, weights=weights)[0]

  # 1. Embeddings of the whole batch, chunk by chunk, outside autodiff.
  examples = jax.lax.map(lambda c: embed(params, c), chunks)
  examples = {k: _from_chunks(v, shards) for k, v in examples.items()}
  if text_inputs_needed(weights)[2]:
    desc_emb, desc_vjp = jax.vjp(
        lambda p: model.apply(p, desc["ids"], desc["mask"], train=True,
                              method=model.encode_text)[0], params)
  else:
    desc_emb = desc_vjp = None

  # 2. Loss on the whole batch; its gradient w.r.t. the embeddings, and
  # w.r.t. params where they enter the loss directly (the logit scale).
  def loss_of(examples, desc_emb, p):
    outputs = _loss_inputs(model, p, examples, desc_emb, desc, num_classes)
    return losses.hica_loss(outputs, batch, weights)

  (loss, metrics), (g_examples, g_desc, grads) = jax.value_and_grad(
      loss_of, argnums=(0, 1, 2), has_aux=True)(examples, desc_emb, params)
  if desc_vjp is not None:
    grads = jax.tree.map(jnp.add, grads, desc_vjp(g_desc)[0])

  # 3. Per-chunk backward through the towers.
  g_chunks = {k: _to_chunks(v, accum_steps, shards)
              for k, v in g_examples.items()}

  def backward(acc, xs):
    chunk, cotangent = xs
    _, vjp = jax.vjp(lambda p: embed(p, chunk), params)
    return jax.tree.map(jnp.add, acc, vjp(cotangent)[0]), None

  grads, _ = jax.lax.scan(backward, grads, (chunks, g_chunks))
  return loss, metrics, grads


def check_accum_steps(accum_steps, global_batch, mesh):
  shards = sharding.data_size(mesh)
  if accum_steps < 1 or global_batch % (accum_steps * shards):
    raise ValueError(
        f"stage2.accum_steps={accum_steps} must be >= 1 and divide "
        f"stage2.batch_size={global_batch} into equal chunks on each of the "
        f"{shards} data shards; choose a divisor of {global_batch // shards}.")


def make_stage2_step(model, tx, weights, num_classes, *, accum_steps=1,
                     mesh=None, state_sharding=None):
  """Jitted stage-2 step: (state, batch, desc, lr) -> (state, metrics).

  state_sharding (with mesh) pins the output state to the input's layout.
  """

  def step(state, batch, desc, lr):
    loss, metrics, grads = stage2_loss_and_grads(
        model, state.params, batch, desc, weights, num_classes, accum_steps,
        mesh)
    state, ok = apply_update(state, grads, loss, tx, lr)
    return state, step_metrics(metrics, loss, grads, ok)

  return _jit_step(step, mesh, state_sharding)


def cluster_head_init(key, width, num_clusters):
  return {"kernel": jax.random.normal(key, (width, num_clusters)) * 0.01,
          "bias": jnp.zeros((num_clusters,))}


def make_stage1_step(model, tx, s1, special_ids, vocab_size, mask_id, *,
                     mesh=None, state_sharding=None):
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
    state, ok = apply_update(state, grads, loss, tx, lr)
    return state, step_metrics(metrics, loss, grads, ok)

  return _jit_step(step, mesh, state_sharding)


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
  """Applies fn(params, *arrays) in global batches (last one padded).

  Every process holds all of `arrays` and feeds only its rows of each global
  batch; outputs are gathered back to every process, so the result (numpy)
  is the same on one process and on many.
  """
  n = len(arrays[0])
  unit = sharding.data_size(mesh)
  batch_size = max(unit, batch_size - batch_size % unit)
  nproc, pid = jax.process_count(), jax.process_index()
  outs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    m = len(chunk[0])
    pad = (-m) % unit
    if pad:
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
    rows = len(chunk[0]) // nproc
    local = [c[pid * rows:(pid + 1) * rows] for c in chunk]
    res = fn(params, *sharding.shard_batch(local, mesh))
    outs.append(jax.tree.map(lambda r: sharding.to_host(r)[:m], res))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


# ----------------------------------------------------------------------------
# The loop.


class Preempted(Exception):
  """SIGTERM arrived: the loop checkpointed (given a manager) and stopped."""


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient."""


# JAX's preemption sync manager is process-global and wants step ids that
# only grow, across every loop of the run; so is this counter.
_SYNC_IDS = itertools.count(1)


@contextlib.contextmanager
def preemption_watch():
  """Yields should_stop() -> bool: True once SIGTERM arrived.

  Multi-process, JAX's preemption service catches SIGTERM on any process
  and should_stop() turns True at the same call on every process (call it
  once per step on all of them). On one process a SIGTERM handler is held
  for the duration of the block.
  """
  if jax.process_count() > 1:
    yield lambda: multihost_utils.reached_preemption_sync_point(
        next(_SYNC_IDS))
    return
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  received = []
  previous = signal.signal(signal.SIGTERM, lambda *_: received.append(1))
  try:
    yield lambda: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _finite_or_none(x):
  return x if np.isfinite(x) else None


class _MetricLog:
  """Per-step metrics -> window means for the writer; counts skipped steps.

  Device metrics are fetched only at log and checkpoint steps (no per-step
  host sync). The unlogged part of a window and the non-finite streak go
  into checkpoints, so a resumed run logs what an uninterrupted one would.
  """

  def __init__(self, desc, writer, max_nonfinite, resume):
    self.desc, self.writer, self.max_nonfinite = desc, writer, max_nonfinite
    self.on_device = []
    self.window = [{k: np.nan if v is None else v for k, v in m.items()}
                   for m in resume.get("pending_metrics", [])]
    self.streak = int(resume.get("nonfinite_streak", 0))
    self.total = int(resume.get("nonfinite_total", 0))
    self.history = []
    last = resume.get("last_loss")
    self.last_loss = float("nan") if last is None else float(last)

  def add(self, step, metrics):
    self.on_device.append((step, metrics))

  def fetch(self):
    """Moves metrics to the host; raises NonFiniteError on a long streak."""
    host = jax.device_get([m for _, m in self.on_device])
    steps = [s for s, _ in self.on_device]
    self.on_device = []
    for step, m in zip(steps, host):
      m = {k: float(v) for k, v in m.items()}
      bad = m.pop("nonfinite", 0.0) > 0
      m["nonfinite"] = float(bad)
      self.streak = self.streak + 1 if bad else 0
      self.total += int(bad)
      self.window.append(m)
      if bad:
        logging.warning("%s: non-finite loss/gradient at step %d; update "
                        "skipped (%d in a row).", self.desc, step, self.streak)
      if self.max_nonfinite and self.streak >= self.max_nonfinite:
        raise NonFiniteError(
            f"{self.desc}: {self.streak} consecutive steps (up to step "
            f"{step}) had a non-finite loss or gradient; their updates were "
            "skipped and training stopped (train.max_nonfinite="
            f"{self.max_nonfinite}).")

  def flush(self, step):
    """Writes the mean of the window (finite steps only) at `step`."""
    self.fetch()
    if not self.window:
      return
    good = [m for m in self.window if not m["nonfinite"]]
    mean = {"lr": float(np.mean([m["lr"] for m in self.window]))}
    if good:
      mean.update({k: float(np.mean([m[k] for m in good]))
                   for k in good[0] if k not in ("nonfinite", "lr")})
      self.last_loss = mean["loss"]
    mean["nonfinite_steps"] = float(len(self.window) - len(good))
    self.window = []
    self.history.append({"step": step, **mean})
    if self.writer is not None:
      self.writer.write(step, mean)

  def resume_state(self):
    self.fetch()
    return {"pending_metrics": [{k: _finite_or_none(v) for k, v in m.items()}
                                for m in self.window],
            "nonfinite_streak": self.streak,
            "nonfinite_total": self.total,
            "last_loss": _finite_or_none(self.last_loss)}


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  steps: int
  final_loss: float
  seconds: float
  history: list
  nonfinite_steps: int = 0


def train_loop(state, step_fn, data_iter, num_steps, *, mesh, desc, schedule,
               writer=None, mngr=None, ckpt_every=0, log_every=10,
               extra_fn=None, before_step=None, step_args=(), resume=None,
               max_nonfinite=0):
  """Runs step_fn until num_steps, checkpointing and logging on the way.

  Args:
    state: TrainState (already restored when resuming).
    step_fn: jitted (state, batch, *step_args, lr) -> (state, metrics); the
      metrics include `loss` and `nonfinite` (1.0: the update was skipped).
    schedule: step -> learning rate.
    data_iter: grain iterator positioned at state.step.
    mngr: orbax CheckpointManager or None (no checkpoints).
    extra_fn: () -> JSON-able dict saved with each checkpoint.
    before_step: optional (state, step) -> (state, step_args) hook (stage 1
      reclusters there).
    resume: the `extra` dict restored with `state`, or None.
    max_nonfinite: stop after this many consecutive skipped steps (0: never);
      noticed at the next log or checkpoint step.
  Raises:
    Preempted: on SIGTERM, after checkpointing the state reached.
    NonFiniteError: on a streak of non-finite steps; the newest checkpoint
      (taken before the streak was noticed) holds params of finite steps.
  """
  start_step = int(state.step)
  if writer is not None:
    # Steps logged after the checkpoint by an interrupted run are redone.
    writer.discard_after(start_step)
  t0 = time.time()
  # Seconds spent before the checkpoint resumed from (a resumed stage
  # reports its whole training time).
  elapsed_before = float((resume or {}).get("elapsed_seconds") or 0.0)
  log = _MetricLog(desc, writer, max_nonfinite, resume or {})
  bar = tqdm(total=num_steps, initial=start_step, desc=desc,
             disable=jax.process_index() != 0, dynamic_ncols=True)

  def save(step, force=False):
    extra = dict(extra_fn() if extra_fn else {}, **log.resume_state(),
                 elapsed_seconds=elapsed_before + time.time() - t0)
    ckpt_lib.save(mngr, step, state, extra, force=force)

  preempted, end_step = False, start_step
  try:
    with preemption_watch() as should_stop:
      for step in range(start_step, num_steps):
        args = step_args
        if before_step is not None:
          state, args = before_step(state, step)
        batch = sharding.shard_batch(next(data_iter), mesh)
        lr = np.float32(schedule(step))
        state, metrics = step_fn(state, batch, *args, lr)
        end_step = done = step + 1
        log.add(done, dict(metrics, lr=lr))
        if done % log_every == 0 or done == num_steps:
          log.flush(done)
          bar.set_postfix(loss=f"{log.last_loss:.4f}")
        bar.update(1)
        if should_stop():
          preempted = True
          break
        if mngr is not None and ckpt_every and done % ckpt_every == 0 \
            and done != num_steps:
          save(done)
      if mngr is not None and end_step > start_step:
        save(end_step, force=True)
        mngr.wait_until_finished()
      preempted = preempted or should_stop()
  except NonFiniteError as e:
    if mngr is not None:
      mngr.wait_until_finished()
      last = mngr.latest_step()
      kept = ("No checkpoint was written yet." if last is None else
              f"The last good checkpoint is step {last} in {mngr.directory}.")
      raise NonFiniteError(
          f"{e} {kept} Lower the learning rate, check the data, or raise "
          "train.max_nonfinite.") from None
    raise
  finally:
    bar.close()
  if preempted:
    where = (f"checkpoint saved at step {end_step}; rerun the same command "
             "to resume" if mngr is not None else "nothing to save")
    raise Preempted(f"{desc}: stopped by SIGTERM after step {end_step} "
                    f"({where}).")
  return LoopResult(state=state, steps=num_steps, final_loss=log.last_loss,
                    seconds=elapsed_before + time.time() - t0,
                    history=log.history,
                    nonfinite_steps=log.total)


def _restore_if_any(mngr, state):
  """(state, extra) from the newest readable checkpoint, or (state, None)."""
  if mngr is None or not mngr.all_steps():
    return state, None
  restored, extra = ckpt_lib.restore(mngr, ckpt_lib.abstract(state))
  return (state, None) if restored is None else (restored, extra)


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

  def param_shardings(self, params):
    """Shardings of a param tree under config.sharding's rules."""
    sc = self.config.get("sharding")
    return sharding.param_shardings(
        params, self.mesh, sharding.config_rules(sc),
        sc.fsdp_min_size if sc is not None else 2**12)

  def max_nonfinite(self):
    train = self.config.get("train")
    return int(train.max_nonfinite) if train is not None else 0

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
  pseudo = np.full((len(source),), -1, np.int32)
  state = create_state(params, tx, mesh,
                       pseudo_labels=sharding.replicate(pseudo, mesh),
                       param_shardings=ctx.param_shardings(params))
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
                             vocab, special["mask"] or 0, mesh=mesh,
                             state_sharding=state_shardings(state))
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
    params["cluster_head"] = sharding.place(
        head, state_shardings(state.params["cluster_head"]))
    # A new head starts with fresh Adam moments.
    opt_state = reset_opt_state(state.opt_state, "cluster_head")
    return state.replace(params=params, opt_state=opt_state,
                         pseudo_labels=sharding.replicate(full, mesh))

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
                      before_step=before_step, resume=extra,
                      max_nonfinite=ctx.max_nonfinite())
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
                  mngr=None, writer=None, desc="stage2", loss_config=None):
  """Stage 2 on the records `indices` of the train split, from init params.

  Used by the stage-2 stage (with a checkpoint manager) and by every few-shot
  evaluation cell (without). Runs of equal shapes, optimiser and loss
  weights share one compiled step through `ctx.step_cache`. `loss_config`
  replaces config.stage2.loss (the study's global-only baseline and
  ablations zero some weights).
  """
  s2, mesh = ctx.config.stage2, ctx.mesh
  tables = tables or ctx.tables
  state, step_fn, schedule = stage2_setup(ctx, init_params_, num_steps,
                                          tables, loss_config)
  state, extra = _restore_if_any(mngr, state)
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
                    step_args=(ctx.desc_arrays(tables),), resume=extra,
                    max_nonfinite=ctx.max_nonfinite())


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
  # stage2.init="model": the model's initialisation even beside a stage 1
  # (main checks before any work that "stage1" has one).
  init = (load_final_params(ctx, "stage1")
          if s2.get("init", "stage1") == "stage1" else None)
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
  params = ckpt_lib.restore_params(ckpt_lib.manager(ctx.workdir, stage),
                                   ctx.param_shardings)
  return params["model"] if stage == "stage1" else params


# ----------------------------------------------------------------------------
# Study helpers: the stage-2 step set-up and supervised fine-tuning.


def stage2_setup(ctx, init_params_, num_steps, tables=None, loss_config=None):
  """(fresh state, compiled step, LR schedule) of a stage-2 run.

  The step comes from `ctx.step_cache`, keyed by everything it was compiled
  for (class and descriptor counts, frozen params, loss weights, GradCache
  chunks), so the run and the study's step timing share one compilation.
  """
  s2, mesh = ctx.config.stage2, ctx.mesh
  tables = tables or ctx.tables
  sharding.check_global_batch(s2.batch_size, mesh, "stage2.batch_size")
  accum_steps = int(s2.get("accum_steps", 1))
  check_accum_steps(accum_steps, s2.batch_size, mesh)
  tx, schedule = make_optimizer(s2.optim, num_steps, init_params_,
                                s2.get("freeze", ()))
  # A copy: the step donates its state, and init params serve many runs.
  params = jax.tree.map(jnp.array, init_params_)
  state = create_state(params, tx, mesh,
                       param_shardings=ctx.param_shardings(params))
  weights = loss_weights(s2.loss if loss_config is None else loss_config)
  cache_key = ("stage2", tables.num_classes, len(tables.desc_ids),
               tuple(s2.get("freeze", ())), tuple(sorted(weights.items())),
               accum_steps)
  if cache_key not in ctx.step_cache:
    ctx.step_cache[cache_key] = make_stage2_step(
        ctx.model, tx, weights, tables.num_classes, accum_steps=accum_steps,
        mesh=mesh, state_sharding=state_shardings(state))
  return state, ctx.step_cache[cache_key], schedule


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
    state, ok = apply_update(state, grads, loss, tx, lr)
    return state, step_metrics(metrics, loss, grads, ok)

  return _jit_step(step, mesh, state_sharding)


def run_supervised_ce(ctx, init_params_, indices, num_steps, seed,
                      desc="supervised_ce"):
  """Supervised baseline: the image tower and a linear head fine-tuned with
  cross-entropy on the records `indices`, from `init_params_` with stage 2's
  optimiser, batch size and augmentation. Returns the LoopResult; its
  state.params are {"model", "head"} (see supervised_logits)."""
  s2, mesh, model = ctx.config.stage2, ctx.mesh, ctx.model
  sharding.check_global_batch(s2.batch_size, mesh, "stage2.batch_size")
  size = ctx.config.data.image_size
  width = jax.eval_shape(lambda p: model.apply(
      p, jnp.zeros((1, size, size, 3)), method=model.image_features),
                         init_params_).shape[-1]
  # The stage-1 cluster head's init, here with one output per class.
  head = cluster_head_init(jax.random.PRNGKey(seed), width,
                           ctx.tables.num_classes)
  params = {"model": jax.tree.map(jnp.array, init_params_), "head": head}
  tx, schedule = make_optimizer(s2.optim, num_steps, params,
                                s2.get("freeze", ()))
  state = create_state(params, tx, mesh,
                       param_shardings=ctx.param_shardings(params))
  cache_key = ("supervised_ce", ctx.tables.num_classes,
               tuple(s2.get("freeze", ())))
  if cache_key not in ctx.step_cache:
    ctx.step_cache[cache_key] = make_supervised_step(
        model, tx, mesh=mesh, state_sharding=state_shardings(state))
  it = iter(pipeline.train_dataset(ctx.data.source("train"), indices,
                                   ctx.preprocessor(), s2.batch_size,
                                   num_steps, seed=seed))
  return train_loop(state, ctx.step_cache[cache_key], it, num_steps,
                    mesh=mesh, desc=desc, schedule=schedule,
                    log_every=s2.log_every, max_nonfinite=ctx.max_nonfinite())
