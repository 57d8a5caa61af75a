r"""Stage-1 image objectives on a real data set, judged by frozen-feature probes.

  python bench/stage1_probe.py --dataset kermany --objective dino --steps 600
  python bench/stage1_probe.py --dataset busi --objective swav --speckle 0.3
  python bench/stage1_probe.py --dataset kermany --objective none   # floor only
  python bench/stage1_probe.py --tiny        # seconds (smoke)

Trains the image tower (hica_jax.models.vit.ViT; depth 0 = the conv stem
alone, a small conv net) from scratch on the train split's images, labels
unused, with `--objective`:
  dino         self-distillation from an EMA teacher (hica_jax.selfsup);
  swav         swapped prediction of Sinkhorn codes (hica_jax.selfsup);
  deepcluster  k-means over the pool's features every --recluster_every
               steps, a re-initialised linear head, CE weighted by inverse
               cluster size (hica_jax.losses.kmeans and
               cluster_classification_loss), one augmented view;
  none         the randomly initialised tower.
Then, on the test split: a linear probe (evaluate.linear_probe_probs: logistic
regression on L2-normalised features) and cosine k-NN (k=20, weights
exp(cos / 0.07)) at K in --shots x --seeds class-balanced support sets
(fewshot.sample_support) and with all train labels, beside the raw-pixel
floor (logistic regression on per-image standardised 32x32 pixels of the same
support sets). Writes one JSON line per evaluation (--eval_at steps) with
every number, the config and the stage-1 seconds to --out.

Images come through the project's data path (pipeline.open_dataset, the real
builders) and are decoded once into a grayscale cache (--cache_dir).
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hica_jax import pretrain_losses
from hica_jax import testing
from hica_jax import metrics
from hica_jax import selfsup
from hica_jax.data import fewshot
from hica_jax.data import pipeline
from hica_jax.data import preprocess
from hica_jax.evaluators import linear_probe
from hica_jax.evaluators import pixel_probe
from hica_jax.models import vit

# The real images beside the repository (see ../shared/data/README.md).
ROOTS = {"kermany": os.path.join(testing.REPO, "..", "shared", "data",
                                 "chest_xray"),
         "busi": os.path.join(testing.REPO, "..", "shared", "data",
                              "Dataset_BUSI_with_GT")}
FAMILY = {"kermany": "chestxray", "busi": "busi"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="kermany", choices=sorted(ROOTS))
  p.add_argument("--root", default=None, help="default: ROOTS[dataset]")
  p.add_argument("--data_dir", default="/tmp/ssl/tfds")
  p.add_argument("--cache_dir", default="/tmp/ssl/cache")
  p.add_argument("--cache_size", type=int, default=128)
  p.add_argument("--objective", default="dino",
                 choices=["dino", "swav", "deepcluster", "none"])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--eval_at", default="", help="extra steps to evaluate at")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image_size", type=int, default=64,
                 help="global crop and evaluation size")
  p.add_argument("--local_size", type=int, default=32)
  p.add_argument("--crops", type=int, default=4, help="local crops")
  p.add_argument("--width", type=int, default=96)
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--patch", type=int, default=8)
  p.add_argument("--stem", default="conv", choices=["conv", "patch"])
  p.add_argument("--pool", default="cls", choices=["cls", "gap"])
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--weight_decay", type=float, default=0.04)
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument("--prototypes", type=int, default=128)
  p.add_argument("--student_temp", type=float, default=0.1)
  p.add_argument("--teacher_temp", type=float, default=0.04)
  p.add_argument("--teacher_temp_final", type=float, default=None,
                 help="reached linearly at a third of the steps")
  p.add_argument("--head_bn", type=int, default=1,
                 help="batch-standardise the head's input and hidden layer")
  p.add_argument("--teacher_momentum", type=float, default=0.99)
  p.add_argument("--center_momentum", type=float, default=0.9)
  p.add_argument("--sinkhorn_eps", type=float, default=0.05)
  p.add_argument("--recluster_every", type=int, default=100)
  p.add_argument("--speckle", type=float, default=None,
                 help="default: 0.3 for busi, 0 for kermany")
  p.add_argument("--hflip", type=float, default=None,
                 help="default: 0.5 for busi, 0 for kermany")
  p.add_argument("--rotate", type=float, default=10.0)
  p.add_argument("--global_scale", default="0.35,1.0")
  p.add_argument("--local_scale", default="0.08,0.35")
  p.add_argument("--shots", default="1,4,16")
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tag", default="")
  p.add_argument("--out", default="/tmp/ssl/results.jsonl")
  p.add_argument("--tiny", action="store_true",
                 help="a few steps of a tiny tower on 64 images (smoke)")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Data.


def load_split_arrays(args):
  """{'train': (u8[N, S, S] gray, i32[N]), 'test': ...} through open_dataset."""
  os.makedirs(args.cache_dir, exist_ok=True)
  cache = os.path.join(args.cache_dir, f"{args.dataset}_{args.cache_size}.npz")
  if os.path.exists(cache):
    z = np.load(cache)
    return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}
  cfg = testing.config(FAMILY[args.dataset], "").data
  cfg.root = args.root or ROOTS[args.dataset]
  handle = pipeline.open_dataset(cfg, args.data_dir)
  out = {}
  for split in ("train", "test"):
    src = handle.source(split)
    xs = []
    for i in range(len(src)):
      rec = src[i]
      image = preprocess.decode_image(rec["image"])
      image, _ = preprocess.resize_and_pad(
          image, np.zeros(image.shape[:2], bool), args.cache_size)
      xs.append(image.mean(-1).round().astype(np.uint8))
    out[split] = (np.stack(xs), src.labels())
  np.savez(cache, **{f"{s}_{k}": v for s, (x, y) in out.items()
                     for k, v in (("x", x), ("y", y))})
  return out


def standardised(images_u8, size):
  """u8[N, S, S] -> f32[N, size, size] per-image standardised (antialiased)."""
  x = jnp.asarray(images_u8, jnp.float32) / 255.0
  x = jax.image.resize(x, (x.shape[0], size, size), "linear", antialias=True)
  mean = x.mean((1, 2), keepdims=True)
  return np.asarray((x - mean) / (x.std((1, 2), keepdims=True) + 1e-3))


# ----------------------------------------------------------------------------
# Model and objectives.


class SSLNet(vit.nn.Module):
  """ViT backbone + prototype head: images -> (pooled f32[N, W], scores)."""
  tower: dict
  head: dict

  @vit.nn.compact
  def __call__(self, images):
    pooled = vit.ViT(**self.tower, name="tower")(images)["pooled"]
    return pooled, selfsup.PrototypeHead(**self.head, name="head")(pooled)


def head_init(key, width, num_clusters):
  """DeepCluster's linear head on the pooled features, re-drawn per k-means."""
  return {"kernel": jax.random.normal(key, (width, num_clusters)) * 0.01,
          "bias": jnp.zeros((num_clusters,))}


def views_scores(net, params, glob, loc):
  """Scores f32[V, B, K] of the global then local views (two passes)."""
  vg, b = glob.shape[:2]
  _, s = net.apply(params, glob.reshape((vg * b,) + glob.shape[2:]))
  scores = [s.reshape(vg, b, -1)]
  if loc is not None:
    vl = loc.shape[0]
    _, sl = net.apply(params, loc.reshape((vl * b,) + loc.shape[2:]))
    scores.append(sl.reshape(vl, b, -1))
  return jnp.concatenate(scores, 0), s.reshape(vg, b, -1)


def make_step(args, net, tx, spec, total_steps):
  """Jitted (state, images f32[B, S, S], key, step) -> (state, metrics)."""

  def loss_fn(params, state, images, key, step):
    glob, loc = selfsup.multi_crop(key, images, spec)
    variables = {"params": params["params"]}
    scores, _ = views_scores(net, variables, glob, loc)
    aux = {}
    if args.objective == "swav":
      loss, _ = selfsup.swav_loss(scores, spec.num_global, args.student_temp,
                                  args.sinkhorn_eps)
    elif args.objective == "dino":
      vg, b = glob.shape[:2]
      _, t = net.apply(state["teacher"], glob.reshape((vg * b,) + glob.shape[2:]))
      t = jax.lax.stop_gradient(t.reshape(vg, b, -1))
      temp = selfsup.linear_warmup(step, total_steps // 3, args.teacher_temp,
                                   args.teacher_temp_final or args.teacher_temp)
      loss = selfsup.dino_loss(scores, t, state["center"], args.student_temp,
                               temp)
      aux["teacher"] = t
    else:  # deepcluster: pooled features of one global view, linear head.
      feats, _ = net.apply(variables, glob[0])
      feats = feats / (jnp.linalg.norm(feats, axis=-1, keepdims=True) + 1e-6)
      logits = feats @ params["dc_head"]["kernel"] + params["dc_head"]["bias"]
      loss = pretrain_losses.cluster_classification_loss(
          logits, state["batch_labels"], args.prototypes, sizes=state["sizes"])
      aux["teacher"] = scores[:2]
    return loss, (scores, aux)

  @jax.jit
  def step_fn(state, images, key, step, batch_labels=None):
    state = dict(state, batch_labels=batch_labels)
    (loss, (scores, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state, images, key, step)
    updates, opt_state = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt=opt_state)
    new.pop("batch_labels")
    m = {"loss": loss,
         "entropy": selfsup.cluster_size_entropy(scores[0]),
         "agreement": selfsup.view_agreement(scores[0], scores[1])}
    if args.objective == "dino":
      new["center"] = selfsup.update_center(state["center"], aux["teacher"],
                                            args.center_momentum)
      mom = selfsup.cosine_ramp(step, total_steps, args.teacher_momentum, 1.0)
      new["teacher"] = selfsup.ema_update(state["teacher"], params, mom)
      m["teacher_entropy"] = selfsup.cluster_size_entropy(aux["teacher"][0])
    return new, m

  return step_fn


def make_embed(net, batch=256):
  """(params, f32[N, size, size] standardised) -> f32[N, W] pooled features."""
  fn = jax.jit(lambda p, x: net.apply({"params": p["params"]}, x)[0])
  return lambda params, images: _batched(fn, params, images, batch)


def _batched(fn, params, images, batch):
  out = []
  for i in range(0, len(images), batch):
    x = jnp.asarray(images[i:i + batch])
    out.append(np.asarray(fn(params, jnp.broadcast_to(x[..., None],
                                                      x.shape + (3,)))))
  return np.concatenate(out)


# ----------------------------------------------------------------------------
# Probes.


def knn_probs(train_f, train_y, test_f, num_classes, k=20, temp=0.07):
  """Cosine k-NN with exp(cos / temp) weights -> f[N_test, C] probabilities."""
  norm = lambda f: f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
  sim = norm(test_f) @ norm(train_f).T
  k = min(k, len(train_y))
  idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
  w = np.exp(np.take_along_axis(sim, idx, 1) / temp)
  probs = np.zeros((len(test_f), num_classes))
  np.add.at(probs, (np.arange(len(test_f))[:, None], train_y[idx]), w)
  return probs / probs.sum(1, keepdims=True)


def probe_table(feats_tr, y_tr, feats_te, y_te, shots, seeds, num_classes,
                pixels=None):
  """{method: {K or 'all': {'bacc': [..], 'auc': [..]}}} over support seeds."""
  methods = {
      "linear": lambda a, ya, b: linear_probe.linear_probe_probs(a, ya, b,
                                                             num_classes),
      "knn": lambda a, ya, b: knn_probs(a, ya, b, num_classes)}
  out = {}
  sets = [(k, s, fewshot.sample_support(y_tr, k, s)) for k in shots
          for s in range(seeds)] + [("all", 0, np.arange(len(y_tr)))]
  if feats_tr is not None:
    # The pool's (unlabelled train split's) mean and std per feature: a
    # tower's features share a large common direction that, L2-normalised at
    # C=1, leaves the probe under-fit (random tower, all labels: 0.53).
    mu, sd = feats_tr.mean(0), feats_tr.std(0) + 1e-6
    std_tr, std_te = (feats_tr - mu) / sd, (feats_te - mu) / sd
    methods["linear_std"] = lambda a, ya, b: linear_probe.linear_probe_probs(
        a, ya, b, num_classes)
    methods["knn_std"] = lambda a, ya, b: knn_probs(a, ya, b, num_classes)
  for name, fn in methods.items():
    if feats_tr is None:
      continue
    if name.endswith("_std"):
      out[name] = _cells(sets, lambda idx, fn=fn: fn(std_tr[idx], y_tr[idx],
                                                     std_te), y_te, num_classes)
      continue
    out[name] = _cells(sets, lambda idx: fn(feats_tr[idx], y_tr[idx], feats_te),
                       y_te, num_classes)
  if pixels is not None:
    px_tr, px_te = pixels
    # The floor of the project's reports (evaluators/pixel_probe.py).
    out["pixels"] = _cells(sets, lambda idx: pixel_probe.pixel_probe_probs(
        px_tr[idx], y_tr[idx], px_te, num_classes, size=32), y_te,
                           num_classes)
  return out


def _cells(sets, probs_fn, y_te, num_classes):
  cells = {}
  for k, _, idx in sets:
    m = metrics.classification_metrics(probs_fn(idx), y_te, num_classes)
    cell = cells.setdefault(str(k), {"bacc": [], "auc": []})
    cell["bacc"].append(round(m["balanced_accuracy"], 4))
    cell["auc"].append(round(m["auc"], 4))
  for cell in cells.values():
    cell["bacc_mean"] = round(float(np.mean(cell["bacc"])), 4)
    cell["auc_mean"] = round(float(np.mean(cell["auc"])), 4)
  return cells


# ----------------------------------------------------------------------------
# Main.


def _pair(text):
  lo, hi = (float(v) for v in text.split(","))
  return (lo, hi)


def main(argv=None):
  args = parse_args(argv)
  if args.tiny:
    args.steps, args.width, args.depth, args.batch = 4, 32, 1, 16
    args.seeds, args.shots, args.eval_at = 1, "1", ""
  busi = args.dataset == "busi"
  speckle = args.speckle if args.speckle is not None else (0.3 if busi else 0.)
  hflip = args.hflip if args.hflip is not None else (0.5 if busi else 0.)
  data = load_split_arrays(args)
  (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
  if args.tiny:
    x_tr, y_tr, x_te, y_te = x_tr[::40], y_tr[::40], x_te[::40], y_te[::40]
  num_classes = int(max(y_tr.max(), y_te.max())) + 1
  shots = [int(s) for s in args.shots.split(",")]
  spec = selfsup.CropSpec(global_size=args.image_size,
                          local_size=args.local_size, num_local=args.crops,
                          speckle=speckle, hflip=hflip, rotate=args.rotate,
                          global_scale=_pair(args.global_scale),
                          local_scale=_pair(args.local_scale))
  tower = dict(image_size=args.image_size, patch_size=args.patch,
               width=args.width, depth=args.depth, heads=max(1, args.width // 32),
               mlp_dim=2 * args.width, act="gelu", pool=args.pool,
               stem=args.stem)
  net = SSLNet(tower=tower, head=dict(num_prototypes=args.prototypes,
                                      hidden=2 * args.width, bottleneck=64,
                                      batch_norm=bool(args.head_bn)))
  key = jax.random.PRNGKey(args.seed)
  params = net.init(key, jnp.zeros((1, args.image_size, args.image_size, 3)))
  if args.objective == "deepcluster":
    params = dict(params, dc_head=head_init(
        key, args.width, args.prototypes))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, min(args.warmup, max(args.steps // 4, 1)),
      max(args.steps, 4), args.lr * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(3.0),
                   optax.adamw(schedule, weight_decay=args.weight_decay))
  state = {"params": params, "opt": tx.init(params)}
  if args.objective == "dino":
    state["teacher"] = params
    state["center"] = jnp.zeros((args.prototypes,))
  if args.objective == "deepcluster":
    state["sizes"] = jnp.ones((args.prototypes,))
  step_fn = make_step(args, net, tx, spec, args.steps)
  embed = make_embed(net)
  pool = jnp.asarray(x_tr, jnp.float32) / 255.0
  ev_tr = standardised(x_tr, args.image_size)
  ev_te = standardised(x_te, args.image_size)
  px_tr, px_te = x_tr[..., None], x_te[..., None]   # gray u8 [N, S, S, 1]
  eval_at = sorted({int(s) for s in args.eval_at.split(",") if s}
                   | {args.steps})
  config = {k: v for k, v in vars(args).items()}
  config.update(speckle=speckle, hflip=hflip, num_train=len(y_tr),
                num_test=len(y_te))
  rng = np.random.default_rng(args.seed)
  order, pos, pseudo = rng.permutation(len(y_tr)), 0, None
  train_s, log, t0 = 0.0, [], time.time()
  for step in range(args.steps + 1):
    if step in eval_at:
      te0 = time.time()
      f_tr = embed(state["params"], ev_tr)
      f_te = embed(state["params"], ev_te)
      table = probe_table(f_tr, y_tr, f_te, y_te, shots, args.seeds,
                          num_classes,
                          pixels=(px_tr, px_te) if step == eval_at[0] else None)
      rec = dict(config=config, step=step, train_seconds=round(train_s, 1),
                 sec_per_step=round(train_s / max(step, 1), 3),
                 eval_seconds=round(time.time() - te0, 1), probes=table,
                 last_metrics=log[-1] if log else None)
      with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
      summary = {m: {k: c["bacc_mean"] for k, c in t.items()}
                 for m, t in table.items()}
      print(f"[{args.tag}] step {step} train {train_s:.0f}s "
            f"{json.dumps(summary)}", flush=True)
    if step == args.steps:
      break
    ts = time.time()
    if args.objective == "deepcluster" and step % args.recluster_every == 0:
      f = embed(state["params"], ev_tr)
      f = f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
      _, pseudo = pretrain_losses.kmeans(jnp.asarray(f), args.prototypes,
                                jax.random.fold_in(key, step))
      state["sizes"] = pretrain_losses.cluster_sizes(pseudo, args.prototypes)
      state["params"] = dict(state["params"],
                             dc_head=head_init(
                                 jax.random.fold_in(key, 10**6 + step),
                                 args.width, args.prototypes))
    if pos + args.batch > len(order):
      order, pos = rng.permutation(len(y_tr)), 0
    idx = order[pos:pos + args.batch]
    pos += args.batch
    labels = pseudo[idx] if pseudo is not None else None
    state, m = step_fn(state, pool[idx], jax.random.fold_in(key, step),
                       jnp.float32(step), labels)
    if step % 25 == 0 or step == args.steps - 1:
      m = {k: round(float(v), 4) for k, v in m.items()}
      log.append(dict(step=step, **m))
      print(f"[{args.tag}] {step} {m} {time.time() - t0:.0f}s", flush=True)
    train_s += time.time() - ts
  return log


if __name__ == "__main__":
  main()
