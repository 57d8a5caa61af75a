"""Procedural synthetic data: builders, determinism, masks, locality."""
import io
import os
import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler
import tensorflow_datasets as tfds

from hica_jax.data import descriptors
from hica_jax.data import synthetic

FAMILIES = synthetic.FAMILIES
COUNTS = {"train": 4, "val": 2, "test": 3}


def _build(family, data_dir, seed=0, **kw):
  return synthetic.build_synthetic(
      family, str(data_dir), image_size=32, num_train_per_class=COUNTS["train"],
      num_val_per_class=COUNTS["val"], num_test_per_class=COUNTS["test"],
      seed=seed, **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
  family = request.param
  return family, _build(family, tmp_path_factory.mktemp(family))


def _records(builder, split):
  ds = builder.as_data_source(split)
  return [ds[i] for i in range(len(ds))]


def _dilate(m, r):
  out = m.copy()
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      out |= np.roll(np.roll(m, dy, -2), dx, -1)
  return out


def test_categories_and_unseen_come_from_the_bank(built):
  family, builder = built
  bank = descriptors.load_bank(f"synthetic_{family}")
  names = builder.info.features["label"].names
  assert names == list(bank["categories"])
  assert len(names) >= 4 and names[0] == "normal"
  assert bank["unseen"] and set(bank["unseen"]) <= set(names)
  assert list(builder.info.metadata["unseen"]) == bank["unseen"]
  for cat, entry in bank["categories"].items():
    assert len(entry["sentences"]) >= 5, cat
    assert bool(entry["phrases"]) == (cat != "normal"), cat


def test_split_counts_per_class(built):
  family, builder = built
  n_cls = len(builder.info.features["label"].names)
  for split, n in COUNTS.items():
    labels = [r["label"] for r in _records(builder, split)]
    assert np.bincount(labels, minlength=n_cls).tolist() == [n] * n_cls, (
        family, split)


def test_records_read_without_tensorflow(built):
  family, builder = built
  name = f"synthetic_{family}/{builder.builder_config.name}"
  ds = tfds.data_source(name, split="test", data_dir=builder.data_dir_root)
  r = ds[0]
  assert r["image"].dtype == np.uint8 and r["image"].shape == (32, 32, 3)
  assert r["mask"].dtype == np.uint8 and r["mask"].shape == (32, 32, 1)
  np.testing.assert_array_equal(r["image"][..., 0], r["image"][..., 2])
  assert isinstance(r["phrase"], bytes) and isinstance(r["id"], bytes)
  assert r["text"] == b"" and r["patient_id"] == b""
  # The pipeline's way: leave the PNG bytes undecoded.
  raw = builder.as_data_source("test", decoders={
      "image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()})
  png = np.asarray(Image.open(io.BytesIO(raw[0]["image"])))
  np.testing.assert_array_equal(png, r["image"])
  assert "tensorflow" not in sys.modules


def test_masks_phrases_and_roi_flags(built):
  family, builder = built
  bank = descriptors.load_bank(f"synthetic_{family}")
  names = builder.info.features["label"].names
  for split in COUNTS:
    for r in _records(builder, split):
      cat = names[r["label"]]
      m = r["mask"][..., 0]
      assert set(np.unique(m)) <= {0, 255}
      assert r["has_roi"] == int(m.any())
      phrase = r["phrase"].decode()
      if cat == "normal":
        assert not m.any() and phrase == ""
      else:
        assert m.any() and phrase in bank["categories"][cat]["phrases"]
        # The ROI lies inside the image, away from its border.
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or
                    m[:, -1].any())
        assert 0.002 < (m > 0).mean() < 0.2


def test_every_phrase_is_rendered():
  for family in FAMILIES:
    cats, _, phrases = synthetic.category_variants(family)
    labels = np.repeat(np.arange(len(cats)), 40)
    out = synthetic.generate(family, labels, image_size=32, seed=3)
    for c, cat in enumerate(cats):
      used = {p for p, y in zip(out["phrase"], labels) if y == c}
      assert used == (set(phrases[cat]) or {""}), (family, cat)


def test_build_is_deterministic_and_parameters_get_their_own_folder(tmp_path):
  family = "busi"
  a = _build(family, tmp_path / "a")
  b = _build(family, tmp_path / "b")
  for split in COUNTS:
    ra, rb = _records(a, split), _records(b, split)
    for x, y in zip(ra, rb):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  c = _build(family, tmp_path / "a", seed=1)
  d = _build(family, tmp_path / "a", difficulty=0.8)
  assert len({a.data_dir, c.data_dir, d.data_dir}) == 3
  assert not np.array_equal(_records(a, "train")[0]["image"],
                            _records(c, "train")[0]["image"])
  # A second build with the same parameters reuses the folder untouched.
  files = sorted(os.listdir(a.data_dir))
  mtimes = [os.path.getmtime(os.path.join(a.data_dir, f)) for f in files]
  again = _build(family, tmp_path / "a")
  assert again.data_dir == a.data_dir
  assert [os.path.getmtime(os.path.join(a.data_dir, f)) for f in files] == (
      mtimes)


@pytest.mark.parametrize("family", FAMILIES)
def test_lesion_changes_only_the_roi(family):
  """Against its lesion-free twin, an image differs only in and at its ROI."""
  cats, _, _ = synthetic.category_variants(family)
  labels = np.repeat(np.arange(len(cats)), 12)
  kw = dict(image_size=48, seed=5)
  a = synthetic.generate(family, labels, **kw)
  b = synthetic.generate(family, labels, lesions=False, **kw)
  np.testing.assert_array_equal(a["mask"], b["mask"])
  diff = np.abs(a["image"].astype(np.float64) - b["image"])
  m = a["mask"] > 0
  region = _dilate(m, 3)
  if family == "busi":  # plus the posterior acoustic column below the mass
    below = np.cumsum(m.any(-1), axis=1)[:, :, None] > 0
    region |= region.any(1, keepdims=True) & below
  normal = labels == 0
  assert diff[normal].max() == 0
  for c in range(1, len(cats)):
    sel = labels == c
    assert (diff[sel] * region[sel]).sum() > 0.85 * diff[sel].sum(), cats[c]
    # The lesion is visible: on average >= 8 grey levels inside the mask.
    assert diff[sel][m[sel]].mean() > 8, cats[c]


def _crop(image, mask, size=24):
  ys, xs = np.nonzero(mask)
  h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
  crop = image[max(ys.min() - h // 4, 0):ys.max() + h // 4 + 1,
               max(xs.min() - w // 4, 0):xs.max() + w // 4 + 1]
  return np.asarray(Image.fromarray(crop).resize((size, size),
                                                 Image.BILINEAR))


def _blank(image, mask, side):
  """Fixed-size square around the ROI centre set to the image mean."""
  ys, xs = np.nonzero(mask)
  cy, cx, half = int(ys.mean()), int(xs.mean()), side // 2
  out = image.copy()
  out[max(cy - half, 0):cy + half, max(cx - half, 0):cx + half] = int(
      image.mean())
  return out


def _random_conv(images, n_filters=16, k=3, pool=4):
  """ReLU of fixed random zero-mean filters, average-pooled: f32[N, F]."""
  filt = np.random.default_rng(0).standard_normal((k * k, n_filters))
  filt -= filt.mean(0)
  win = sliding_window_view(np.asarray(images, np.float64) / 255, (k, k),
                            axis=(1, 2))
  n, h, w = win.shape[:3]
  y = np.maximum(win.reshape(n, h, w, k * k) @ filt, 0)
  gh, gw = h // pool, w // pool
  y = y[:, :gh * pool, :gw * pool].reshape(n, gh, pool, gw, pool, -1)
  return y.mean((2, 4)).reshape(n, -1)


def _score(xtr, ytr, xte, yte):
  scaler = StandardScaler().fit(xtr)
  clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(xtr),
                                                      ytr)
  return balanced_accuracy_score(yte, clf.predict(scaler.transform(xte)))


@pytest.mark.parametrize("family", FAMILIES)
def test_class_signal_is_local(family):
  """Among lesion classes, the ROI crop tells the class and the rest does not."""
  cats, unseen, phrases = synthetic.category_variants(family)
  lesion = [i for i, c in enumerate(cats) if phrases[c] and c not in unseen]
  size = 48
  feats = {}
  for split, stream in (("train", 0), ("test", 1)):
    labels = np.repeat(lesion, 50)
    d = synthetic.generate(family, labels, image_size=size, seed=7,
                           stream=stream)
    crops = [_crop(i, m) for i, m in zip(d["image"], d["mask"])]
    blanked = [_blank(i, m, int(0.45 * size))
               for i, m in zip(d["image"], d["mask"])]
    feats[split] = (_random_conv(crops), _random_conv(blanked), labels)
  (ctr, btr, ytr), (cte, bte, yte) = feats["train"], feats["test"]
  roi_acc = _score(ctr, ytr, cte, yte)
  rest_acc = _score(btr, ytr, bte, yte)
  assert roi_acc > 0.7, roi_acc
  assert rest_acc < 0.65, rest_acc
  assert roi_acc > rest_acc + 0.2


def test_bad_arguments_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="family"):
    synthetic.build_synthetic("mri", str(tmp_path))
  with pytest.raises(ValueError, match="difficulty"):
    synthetic.generate("busi", [0], image_size=32, seed=0, difficulty=1.5)
  with pytest.raises(ValueError, match="image_size"):
    synthetic.generate("busi", [0], image_size=8, seed=0)
  with pytest.raises(ValueError, match="difficulty"):
    synthetic.build_synthetic("chestxray", str(tmp_path), difficulty=-0.1)
  assert not os.listdir(tmp_path)
