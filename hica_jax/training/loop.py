"""The train loop every objective runs through, and what it needs.

Read top to bottom: optimiser (AdamW direction, LR applied by the step as a
traced argument so one compilation serves every run of equal shapes), the
train state and its placement on the mesh, the jitted-step wrapper, then the
loop: metrics (window means, no per-step host sync), checkpoints with the
data-iterator state, SIGTERM (checkpoint and stop), and non-finite steps
(update skipped, a streak stops training).
"""
import dataclasses
import functools
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from hica_jax import checkpoint as ckpt_lib
from hica_jax import distributed
from hica_jax import sharding

# ----------------------------------------------------------------------------
# Optimiser.


def _decay_mask(params):
  """Decay matrices only: biases, norms and the logit scale are not shrunk."""
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def thaw_after(frozen_steps, thaw_scale):
  """Zero updates for the first `frozen_steps` updates, then scale them by
  `thaw_scale`: the tail of a freeze that ends mid-run (the LP-FT pattern:
  align the heads on frozen features, then fine-tune the tower gently)."""
  def init(params):
    del params
    return {"count": jnp.zeros([], jnp.int32)}

  def update(updates, state, params=None):
    del params
    gate = jnp.where(state["count"] >= frozen_steps, thaw_scale, 0.0)
    return (jax.tree.map(lambda u: u * gate.astype(u.dtype), updates),
            {"count": state["count"] + 1})

  return optax.GradientTransformation(init, update)


@functools.lru_cache(maxsize=None)
def _make_tx(clip_norm, b1, b2, eps, weight_decay, freeze, frozen_steps=None,
             thaw_scale=1.0):
  adamw = lambda: optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=_decay_mask))
  tx = adamw()
  if freeze:
    def labels(params):
      frozen = sharding.path_mask(params, freeze)
      return jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    # A freeze that ends mid-run gives the held params their own AdamW
    # (clipped by their own norm, as the trained group is by its own).
    held = (optax.set_to_zero() if frozen_steps is None else
            optax.chain(adamw(), thaw_after(frozen_steps, thaw_scale)))
    tx = optax.multi_transform({"train": tx, "frozen": held}, labels)
  return tx


def freeze_args(section):
  """make_optimizer's freeze keywords from a stage's config section."""
  return dict(freeze=tuple(section.get("freeze", ())),
              freeze_for=float(section.get("freeze_for", 1.0)),
              thaw_lr_scale=float(section.get("thaw_lr_scale", 1.0)))


def held_patterns(section):
  """The freeze regexes of a stage's config section that hold for the whole
  run (freeze_for 1.0): no update ever reaches those params, so the step
  need not compute their gradients (`hold`)."""
  args = freeze_args(section)
  return args["freeze"] if args["freeze_for"] >= 1.0 else ()


def hold(params, patterns):
  """params with `stop_gradient` on the leaves whose path matches a regex.

  For params frozen for a whole run: their gradients are zeros, and XLA drops
  the backward pass of the layers that lead only to them (a held text tower
  costs its forward pass alone). The optimiser still zeroes their updates.
  """
  if not patterns:
    return params
  held = sharding.path_mask(params, patterns)
  return jax.tree.map(lambda p, h: jax.lax.stop_gradient(p) if h else p,
                      params, held)


def make_optimizer(optim, num_steps, freeze=(), freeze_for=1.0,
                   thaw_lr_scale=1.0):
  """AdamW direction with global-norm clipping, and its LR schedule.

  The learning rate is applied by the step (`updates * -lr`, lr a traced
  argument), so the compiled step does not depend on the schedule. The
  transformation is cached by its hyperparameters: runs with equal optimiser
  settings get the same `tx` object, so the step factories (cached by their
  arguments) compile once for all of them.

  Args:
    optim: ConfigDict with lr, warmup_steps, weight_decay, clip_norm, b1, b2,
      eps.
    num_steps: total steps of the run (schedule length).
    freeze: regexes over '/'-joined param paths whose updates are zeroed.
    freeze_for: fraction of the run's steps the freeze holds (1.0: all);
      below 1 the frozen params train from step round(freeze_for *
      num_steps) on, their updates scaled by thaw_lr_scale.
  Returns:
    (tx, schedule): an optax transformation producing un-scaled AdamW
    updates, and step -> learning rate.
  """
  if not 0.0 <= float(freeze_for) <= 1.0:
    raise ValueError(f"freeze_for={freeze_for}: expected a fraction of the "
                     "run's steps in [0, 1].")
  warmup = min(int(optim.warmup_steps), max(num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=optim.lr * 0.01)
  frozen_steps = (None if float(freeze_for) >= 1.0
                  else int(round(float(freeze_for) * num_steps)))
  tx = _make_tx(float(optim.clip_norm), float(optim.b1), float(optim.b2),
                float(optim.get("eps", 1e-8)), float(optim.weight_decay),
                tuple(freeze), frozen_steps, float(thaw_lr_scale))
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


def linear_head_init(key, width, num_outputs):
  """{kernel f[width, num_outputs] ~ N(0, 0.01^2), bias 0}: the stage-1
  cluster head and the supervised baseline's class head."""
  return {"kernel": jax.random.normal(key, (width, num_outputs)) * 0.01,
          "bias": jnp.zeros((num_outputs,))}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  # Stage 1 only: pseudo-label per record of the train split (-1: not in pool).
  pseudo_labels: jax.Array | None = None
  # Stage 1 with a SwAV queue only: embeddings of earlier batches,
  # f32[num_global, queue_length, bottleneck], newest first.
  queue: jax.Array | None = None


def create_state(params, tx, mesh, pseudo_labels=None, param_shardings=None,
                 queue=None):
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
                    pseudo_labels=pseudo_labels, queue=queue)


def state_shardings(state):
  """The sharding of every array of a state (the steps keep them fixed)."""
  return jax.tree.map(lambda x: x.sharding, state)


def hashable_shardings(state_sharding):
  """A pytree of shardings as a hashable key (None stays None)."""
  if state_sharding is None:
    return None
  leaves, treedef = jax.tree.flatten(state_sharding)
  return treedef, tuple(leaves)


def jit_step(step, mesh, state_sharding_key):
  """jit with the state donated and, when known, its shardings kept.

  Pinning the output state to the input shardings keeps FSDP params split
  and lets every later call reuse the first compilation.
  state_sharding_key: hashable_shardings(state_shardings(state)) or None.
  """
  if state_sharding_key is None:
    return jax.jit(step, donate_argnums=(0,))
  treedef, leaves = state_sharding_key
  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(jax.tree.unflatten(treedef, leaves),
                                sharding.replicated(mesh)))


# ----------------------------------------------------------------------------
# The loop.


class Preempted(Exception):
  """SIGTERM arrived: the loop checkpointed (given a manager) and stopped."""


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient."""


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
  # Seconds spent before the checkpoint resumed from: a resumed stage
  # reports its whole training time.
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
    with distributed.preemption_watch() as should_stop:
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


def restore_if_any(mngr, state):
  """(state, extra) from the newest readable checkpoint, or (state, None)."""
  if mngr is None or not mngr.all_steps():
    return state, None
  restored, extra = ckpt_lib.restore(mngr, ckpt_lib.abstract(state))
  return (state, None) if restored is None else (restored, extra)


def reset_opt_state(opt_state, name):
  """Zeroes the optimiser moments of every leaf under `name` in its path."""
  def reset(path, x):
    keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return jnp.zeros_like(x) if name in keys else x
  return jax.tree_util.tree_map_with_path(reset, opt_state)
