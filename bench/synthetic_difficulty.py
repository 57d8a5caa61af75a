"""Learnability of the synthetic families across `difficulty` (cheap proxies).

  python bench/synthetic_difficulty.py [--family chestxray] [--difficulty 0.5]

For each family and difficulty, on the seen categories only (unseen left out,
as in stage 2), logistic regression (scikit-learn) on:
- pixels (2x2 mean-pooled) and random-conv features (fixed random filters,
  ReLU, average pooling: a stand-in for an untrained conv net),
  with K=16 examples per class (5 seeds) and with the whole training pool;
- oracle: the ROI crop (mask bounding box + margin, resized), lesion classes
  only, and the 3-way oracle that takes "normal" from the empty mask;
- with --cnn: a small CNN trained from scratch (K=16, 3 seeds; and all);
- global without the lesion: the image with the ROI box blanked, lesion
  classes only (should sit at chance: the class evidence is local).
Prints balanced accuracies (mean +- std over seeds for K=16).
"""
import argparse
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from hica_jax.data import synthetic


def pixels(images, pool=2):
  n, h, w = images.shape
  x = images.astype(np.float32) / 255
  return x.reshape(n, h // pool, pool, w // pool, pool).mean((2, 4)).reshape(
      n, -1)


def random_conv(images, n_filters=16, k=5, pool=8, seed=0):
  """ReLU(conv(x, random zero-mean filters)) average-pooled to a pool grid."""
  rng = np.random.default_rng(seed)
  filt = rng.standard_normal((k * k, n_filters)).astype(np.float32)
  filt -= filt.mean(0, keepdims=True)
  out = []
  for start in range(0, len(images), 64):
    x = images[start:start + 64].astype(np.float32) / 255
    win = sliding_window_view(x, (k, k), axis=(1, 2))
    n, h, w = win.shape[:3]
    y = np.maximum(win.reshape(n, h, w, k * k) @ filt, 0)
    gh, gw = h // pool, w // pool
    y = y[:, :gh * pool, :gw * pool].reshape(n, gh, pool, gw, pool, -1)
    out.append(y.mean((2, 4)).reshape(n, -1))
  return np.concatenate(out)


def random_conv_global(images, n_filters=32, k=5, seed=0):
  """Translation-invariant random features: per filter, the spatial mean and
  max of ReLU(conv) at full and half resolution."""
  rng = np.random.default_rng(seed)
  filt = rng.standard_normal((k * k, n_filters)).astype(np.float32)
  filt -= filt.mean(0, keepdims=True)
  out = []
  for start in range(0, len(images), 64):
    x = images[start:start + 64].astype(np.float32) / 255
    feats = []
    for scale in (1, 2):
      n, h, w = x.shape
      xs = x.reshape(n, h // scale, scale, w // scale, scale).mean((2, 4))
      win = sliding_window_view(xs, (k, k), axis=(1, 2))
      y = np.maximum(win.reshape(*win.shape[:3], k * k) @ filt, 0)
      feats += [y.mean((1, 2)), y.max((1, 2))]
    out.append(np.concatenate(feats, -1))
  return np.concatenate(out)


def small_cnn(xtr, ytr, xte, yte, steps=300, seed=0):
  """Balanced accuracy of a small CNN trained from scratch (flax, AdamW)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  classes = np.unique(ytr)
  n_cls = len(classes)
  ytr_i = np.searchsorted(classes, ytr)

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(16, (5, 5), strides=2)(x))
      x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
      x = nn.relu(nn.Conv(64, (3, 3))(x))
      return nn.Dense(n_cls)(jnp.concatenate([x.mean((1, 2)), x.max((1, 2))],
                                             -1))

  def prep(x):
    x = x.astype(np.float32)[..., None] / 255
    return (x - x.mean((1, 2, 3), keepdims=True)) / (
        x.std((1, 2, 3), keepdims=True) + 1e-6)

  xtr_f, xte_f = jnp.asarray(prep(xtr)), jnp.asarray(prep(xte))
  net = Net()
  params = net.init(jax.random.PRNGKey(seed), xtr_f[:1])
  opt = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y, key):
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)

    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(
          net.apply(p, x), y).mean()

    g = jax.grad(loss)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  batch = min(64, len(xtr_f))
  for _ in range(steps):
    idx = rng.choice(len(xtr_f), batch, replace=False)
    key, sub = jax.random.split(key)
    params, state = step(params, state, xtr_f[idx], ytr_i[idx], sub)
  pred = np.concatenate([np.asarray(net.apply(params, xte_f[i:i + 256])).argmax(
      -1) for i in range(0, len(xte_f), 256)])
  return balanced_accuracy_score(yte, classes[pred])


def roi_crops(images, masks, size=24, margin=0.25):
  """Mask bounding box (+ margin) of each image, resized to size x size."""
  out = np.zeros((len(images), size, size), np.uint8)
  for i, (im, m) in enumerate(zip(images, masks)):
    ys, xs = np.nonzero(m)
    if not len(ys):
      continue
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    y0, y1 = ys.min() - int(margin * h) - 1, ys.max() + int(margin * h) + 2
    x0, x1 = xs.min() - int(margin * w) - 1, xs.max() + int(margin * w) + 2
    crop = im[max(y0, 0):y1, max(x0, 0):x1]
    out[i] = np.asarray(Image.fromarray(crop).resize((size, size),
                                                     Image.BILINEAR))
  return out


def blank_roi(images, masks, side=0.45):
  """The image with a fixed-size square around the ROI centre filled with the
  image mean (fixed size, so the box itself tells nothing of the shape)."""
  out = images.copy()
  half = int(side * images.shape[1] / 2)
  for i, m in enumerate(masks):
    ys, xs = np.nonzero(m)
    if not len(ys):
      continue
    cy, cx = int(ys.mean()), int(xs.mean())
    out[i, max(cy - half, 0):cy + half, max(cx - half, 0):cx + half] = int(
        images[i].mean())
  return out


def fit_score(xtr, ytr, xte, yte, c=0.1):
  scaler = StandardScaler().fit(xtr)
  clf = LogisticRegression(C=c, max_iter=2000)
  clf.fit(scaler.transform(xtr), ytr)
  return balanced_accuracy_score(yte, clf.predict(scaler.transform(xte))), clf


def kshot(xtr, ytr, xte, yte, k, seeds=5):
  scores = []
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(ytr == c), k,
                                     replace=False) for c in np.unique(ytr)])
    scores.append(fit_score(xtr[idx], ytr[idx], xte, yte)[0])
  return float(np.mean(scores)), float(np.std(scores))


def data(family, difficulty, n_train, n_test, size):
  cats, unseen, _ = synthetic.category_variants(family)
  seen = [i for i, c in enumerate(cats) if c not in unseen]
  out = []
  for stream, n in ((0, n_train), (2, n_test)):
    labels = np.repeat(seen, n)
    d = synthetic.generate(family, labels, image_size=size, seed=0,
                           difficulty=difficulty, stream=stream)
    out.append((d["image"], d["mask"] > 0, labels))
  return cats, seen, out


def run(family, difficulty, n_train=150, n_test=100, size=64, k=16,
        cnn=False):
  t0 = time.time()
  cats, seen, ((itr, mtr, ytr), (ite, mte, yte)) = data(
      family, difficulty, n_train, n_test, size)
  gen_s = time.time() - t0
  row = {}
  for name, feat in (("pixels", pixels), ("randconv", random_conv),
                     ("randconv-gpool", random_conv_global)):
    ftr, fte = feat(itr), feat(ite)
    row[f"{name} K={k}"] = kshot(ftr, ytr, fte, yte, k)
    row[f"{name} all"] = fit_score(ftr, ytr, fte, yte)[0]
  for seed in range(3 if cnn else 0):
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(ytr == c), k,
                                     replace=False) for c in np.unique(ytr)])
    row.setdefault(f"cnn K={k}", []).append(
        small_cnn(itr[idx], ytr[idx], ite, yte, seed=seed))
  if cnn:
    row[f"cnn K={k}"] = (float(np.mean(row[f"cnn K={k}"])),
                         float(np.std(row[f"cnn K={k}"])))
    row["cnn all"] = small_cnn(itr, ytr, ite, yte, steps=600)
  # Lesion classes only: ROI crop (oracle) vs image with the ROI blanked.
  lesion = [c for c in seen if synthetic.category_variants(family)[2][cats[c]]]
  ltr, lte = np.isin(ytr, lesion), np.isin(yte, lesion)
  ctr = random_conv(roi_crops(itr[ltr], mtr[ltr]), k=3, pool=4)
  cte = random_conv(roi_crops(ite[lte], mte[lte]), k=3, pool=4)
  row[f"roi-crop(lesion) K={k}"] = kshot(ctr, ytr[ltr], cte, yte[lte], k)
  acc, clf = fit_score(ctr, ytr[ltr], cte, yte[lte])
  row["roi-crop(lesion) all"] = acc
  # 3-way oracle: normal from the empty mask, lesion class from the crop.
  pred = np.full_like(yte, [c for c in seen if c not in lesion][0])
  scaler = StandardScaler().fit(ctr)
  pred[lte] = clf.predict(scaler.transform(cte))
  row["oracle 3-way all"] = balanced_accuracy_score(yte, pred)
  btr = random_conv(blank_roi(itr[ltr], mtr[ltr]))
  bte = random_conv(blank_roi(ite[lte], mte[lte]))
  row["roi-blanked(lesion) all"] = fit_score(btr, ytr[ltr], bte, yte[lte])[0]
  row["seconds"] = (gen_s, time.time() - t0)
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--family", choices=synthetic.FAMILIES, action="append")
  parser.add_argument("--difficulty", type=float, action="append")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--cnn", action="store_true",
                      help="also train a small CNN from scratch (slow on CPU)")
  args = parser.parse_args()
  for family in args.family or synthetic.FAMILIES:
    for d in args.difficulty or (0.0, 0.25, 0.5, 0.75, 1.0):
      row = run(family, d, size=args.size, cnn=args.cnn)
      cells = []
      for key, v in row.items():
        if key == "seconds":
          cells.append(f"gen/total {v[0]:.1f}/{v[1]:.1f}s")
        elif isinstance(v, tuple):
          cells.append(f"{key} {v[0]:.3f}+-{v[1]:.3f}")
        else:
          cells.append(f"{key} {v:.3f}")
      print(f"{family} d={d}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
  main()
