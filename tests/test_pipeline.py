"""The grain training pipeline: determinism, resume, per-process
sharding, preprocessing known answers, augmentation, normalisation."""
import io
import json
import os
import re
import types

import jax
import numpy as np
import pytest
from PIL import Image

import fixtures_real as fx
from hica_jax import testing
from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import descriptors
from hica_jax.data import pipeline
from hica_jax.data import preprocess
from hica_jax.data import real
from hica_jax.data import text_tables

# Every augmentation of the default configs, speckle included.
AUG = dict(crop_scale=(0.8, 1.0), rotate=10.0, brightness=0.05, contrast=0.1,
           speckle=0.1, hflip=True)
SIDED = ["opacity in the left lower lobe", "right pleural effusion",
         "mass in the left breast", "mass in the right breast"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  bank = descriptors.load_bank("busi")
  return tokenizer_lib.train_wordpiece(
      text_tables.text_corpus(bank, SIDED), str(tmp_path_factory.mktemp("tok")),
      vocab_size=400)


@pytest.fixture(scope="module")
def busi(tmp_path_factory, tok):
  """Real BUSI layout (non-square images, combined masks) built with tfds."""
  base = str(tmp_path_factory.mktemp("downloads"))
  builder, _ = real.build_dataset("busi", fx.write_busi(base),
                                  str(tmp_path_factory.mktemp("tfds")))
  bank = descriptors.load_bank("busi")
  names = list(builder.info.features["label"].names)
  tables = text_tables.build_text_tables(bank, names, tok, 16, 8)
  pre = preprocess.Preprocessor(tables=tables, class_of={i: i for i in range(
      len(names))}, image_size=32, aug=AUG)
  source = pipeline.SplitSource(builder, "train")
  return source, np.arange(len(source)), pre


def batches(busi, seed=0, steps=5, global_batch=8, **kw):
  source, indices, pre = busi
  return pipeline.train_dataset(source, indices, pre, global_batch, steps,
                                seed=seed, **kw)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------
# Iteration: determinism, resume, processes.


def test_same_seed_same_batches_across_independent_iterators(busi):
  a = list(batches(busi, seed=3, num_threads=0))
  b = list(batches(busi, seed=3, num_threads=4))
  assert len(a) == 5 and a[0]["image"].shape == (8, 32, 32, 3)
  assert_batches_equal(a, b)
  c = list(batches(busi, seed=4, num_threads=0))
  assert not np.array_equal(a[0]["index"], c[0]["index"])
  # Augmentation differs between two steps showing the same record.
  assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_every_record_once_per_epoch(busi):
  source, indices, _ = busi
  n = len(indices)
  seen = np.concatenate([b["index"] for b in batches(busi, steps=2 * n // 8 + 1)])
  for epoch in range(2):
    np.testing.assert_array_equal(np.sort(seen[epoch * n:(epoch + 1) * n]),
                                  indices)
  assert not np.array_equal(seen[:n], seen[n:2 * n])  # reshuffled
  assert len(source) == n


@pytest.mark.parametrize("stop", [0, 2, 5])
def test_resume_equals_uninterrupted(busi, stop):
  full = list(batches(busi, steps=5))
  it = iter(batches(busi, steps=5))
  for _ in range(stop):
    next(it)
  # The state goes through the checkpoint as JSON; resume under another
  # thread count.
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  fresh = iter(batches(busi, steps=5, num_threads=1))
  fresh.set_state(state)
  assert_batches_equal(full[stop:], list(fresh))


def test_state_checks_and_legacy_grain_state(busi):
  full = list(batches(busi, steps=4))
  it = iter(batches(busi, steps=4))
  it.set_state({"next_index": 3})  # grain's own iterator state
  assert_batches_equal(full[3:], list(it))
  for bad in ({"step": 5}, {"foo": 1}, None):
    with pytest.raises(ValueError, match="Data iterator state"):
      iter(batches(busi, steps=4)).set_state(bad)


@pytest.mark.parametrize("nproc", [2, 4])
def test_process_rows_concatenate_to_the_global_batch(busi, nproc):
  global_ = list(batches(busi, steps=3, process_index=0, process_count=1))
  per_process = [list(batches(busi, steps=3, process_index=p,
                              process_count=nproc)) for p in range(nproc)]
  for step, g in enumerate(global_):
    rows = [pp[step] for pp in per_process]
    assert rows[0]["image"].shape[0] == 8 // nproc
    for k in g:
      np.testing.assert_array_equal(
          np.concatenate([r[k] for r in rows]), g[k], err_msg=k)


def test_process_defaults_come_from_jax(busi, monkeypatch):
  explicit = list(batches(busi, steps=2, process_index=1, process_count=2))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert_batches_equal(explicit, list(batches(busi, steps=2)))
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    batches(busi, global_batch=7)


def test_worker_processes_need_parsed_flags(busi, monkeypatch):
  unparsed = types.SimpleNamespace(is_parsed=lambda: False)
  monkeypatch.setattr(pipeline, "flags", types.SimpleNamespace(FLAGS=unparsed))
  with pytest.raises(RuntimeError, match="absl flags parsed"):
    next(iter(batches(busi, worker_count=2)))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(busi):
  from absl import flags  # pylint: disable=g-import-not-at-top
  want = list(batches(busi, steps=4, num_threads=0))
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()  # as absl.app.run does
  try:
    it = iter(batches(busi, steps=4, num_threads=1, worker_count=2))
    got = [next(it), next(it)]
    state = it.get_state()
    it.close()
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()
  rest = iter(batches(busi, steps=4, num_threads=0))
  rest.set_state(state)
  assert_batches_equal(want, got + list(rest))


# ----------------------------------------------------------------------------
# Decoding and resize.


def _encode(writer, tmp_path, name):
  path = str(tmp_path / name)
  writer(path)
  with open(path, "rb") as f:
    return f.read()


def test_image_modes_decode_to_three_channel_uint8(tmp_path):
  gray = _encode(lambda p: fx.write_image(p, np.full((5, 7), 90, np.uint8),
                                          fmt="PNG"), tmp_path, "g.png")
  rgb = _encode(lambda p: fx.write_image(
      p, np.dstack([np.full((5, 7), v, np.uint8) for v in (10, 20, 30)]),
      fmt="PNG"), tmp_path, "c.png")
  images = {"gray": gray, "rgb": rgb,
            "rgba": _encode(fx.rgba_png, tmp_path, "a.png"),
            "16bit": _encode(fx.gradient16_png, tmp_path, "h.png"),
            "jpeg": _encode(fx.rgb_jpeg, tmp_path, "j.jpeg")}
  out = {k: preprocess.decode_image(v) for k, v in images.items()}
  for k, a in out.items():
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3, k
  assert (out["gray"] == 90).all()
  np.testing.assert_array_equal(out["rgb"][2, 3], [10, 20, 30])
  # Alpha composited onto black: the transparent half is black.
  assert (out["rgba"][:8] == 200).all() and (out["rgba"][8:] == 0).all()
  # 12-bit values rescaled to the full 8-bit range, not clipped to white.
  row = out["16bit"][0, :, 0].astype(int)
  assert row[0] == 0 and row[-1] == 255 and (np.diff(row) > 0).all()
  assert (out["16bit"][..., 0] == out["16bit"][..., 2]).all()
  # Arrays take the same path.
  np.testing.assert_array_equal(
      preprocess.decode_image(np.tile(np.linspace(0, 4000, 16).astype(
          np.uint16), (16, 1))), out["16bit"])


def test_undecodable_record_names_the_record(sided_tables):
  pre = preprocess.Preprocessor(tables=sided_tables, class_of={0: 0},
                                image_size=16)
  record = dict(_half_white(), image=b"\x89PNG\r\n\x1a\nbroken", id="b (9).png")
  with pytest.raises(ValueError, match=r"Record 'b \(9\).png'.*rebuild"):
    pre(record)


def test_mask_decoding_thresholds_at_half_max():
  buf = io.BytesIO()
  Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(buf, "PNG")
  np.testing.assert_array_equal(preprocess.decode_mask(buf.getvalue()),
                                [[False, True], [True, False]])
  np.testing.assert_array_equal(
      preprocess.decode_mask(np.array([[0, 255]], np.uint8)[..., None]),
      [[False, True]])


def test_resize_and_pad_known_answers():
  color = np.array([10, 20, 30], np.uint8)
  # Wide 4 x 8 -> 4: scale 1/2, content rows 1..2, zero rows 0 and 3; the
  # 2 x 4 top-left ROI becomes the 1 x 2 block at row 1, columns 0..1.
  image = np.broadcast_to(color, (4, 8, 3)).copy()
  mask = np.zeros((4, 8), bool)
  mask[:2, :4] = True
  im, mk = preprocess.resize_and_pad(image, mask, 4)
  assert im.shape == (4, 4, 3) and mk.shape == (4, 4)
  want = np.zeros((4, 4, 3), np.uint8)
  want[1:3] = color
  np.testing.assert_array_equal(im, want)
  want_mk = np.zeros((4, 4), bool)
  want_mk[1, :2] = True
  np.testing.assert_array_equal(mk, want_mk)
  # Tall 6 x 3 -> 12: scale 2, content columns 3..8; pixel (1, 2) becomes
  # the 2 x 2 block at rows 2..3, columns 7..8.
  image = np.broadcast_to(color, (6, 3, 3)).copy()
  mask = np.zeros((6, 3), bool)
  mask[1, 2] = True
  im, mk = preprocess.resize_and_pad(image, mask, 12)
  want = np.zeros((12, 12, 3), np.uint8)
  want[:, 3:9] = color
  np.testing.assert_array_equal(im, want)
  want_mk = np.zeros((12, 12), bool)
  want_mk[2:4, 7:9] = True
  np.testing.assert_array_equal(mk, want_mk)
  # Already the right size: unchanged.
  im, mk = preprocess.resize_and_pad(want, want_mk, 12)
  assert im is want and mk is want_mk


def test_real_records_are_padded_not_stretched(busi):
  source, indices, pre = busi
  names = {preprocess._as_str(source[int(i)]["id"]): int(i) for i in indices}  # pylint: disable=protected-access
  wide = [i for n, i in names.items()  # written 12 high x 20 wide
          if int(n.split("(")[1].split(")")[0]) % 2 == 0 and "normal" not in n]
  assert wide
  ex = preprocess.Preprocessor(tables=pre.tables, class_of=pre.class_of,
                               image_size=32)(source[wide[0]])
  # 12 x 20 -> 19 x 32 centred: rows 0..5 and 25..31 are padding (black, so
  # -1 after 'half' normalisation) and hold no mask.
  pad = np.r_[0:6, 25:32]
  np.testing.assert_allclose(ex["image"][pad], -1.0)
  assert not ex["roi_mask"][pad].any() and ex["roi_mask"][6:25].any()
  assert ex["image"][6:25].std() > 0.1


def test_resized_pixels_are_cached_by_content_and_change_nothing(
    busi, monkeypatch):
  """The decoded, resized pixels of a record are kept by the digest of its
  bytes: a second pass reads them from the cache and gives the same examples
  as a fresh Preprocessor; they are read-only; an undecodable record is not
  kept; the cache stays within its bound and is not pickled."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  source, _, pre = busi
  records = [source[i] for i in range(6)]
  run = lambda p: [p(r, rng=np.random.default_rng(i), index=i)
                   for i, r in enumerate(records)]
  cached = dataclasses.replace(pre)
  first = run(cached)
  assert len(cached._pixels) == 6  # pylint: disable=protected-access
  second = run(cached)
  assert_batches_equal(first, second)
  assert_batches_equal(first, run(dataclasses.replace(pre)))
  image, mask = cached._resized(records[0])  # pylint: disable=protected-access
  want = preprocess.resize_and_pad(
      preprocess.decode_image(records[0]["image"]),
      preprocess.decode_mask(records[0]["mask"]), pre.image_size)
  np.testing.assert_array_equal(image, want[0])
  np.testing.assert_array_equal(mask, want[1])
  assert not image.flags.writeable and not mask.flags.writeable
  name = preprocess._as_str(records[0]["id"])  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=re.escape(name)):
    cached(dict(records[0], image=b"not an image"))
  assert len(cached._pixels) == 6  # pylint: disable=protected-access
  # The byte bound: room for one record's pixels only.
  monkeypatch.setattr(preprocess, "PIXEL_CACHE_BYTES",
                      image.nbytes + mask.nbytes)
  bounded = dataclasses.replace(pre)
  assert_batches_equal(first, run(bounded))
  assert len(bounded._pixels) == 1  # pylint: disable=protected-access
  clone = pickle.loads(pickle.dumps(cached))
  assert clone._pixels == {}  # pylint: disable=protected-access
  assert_batches_equal(first[:1], [clone(records[0],
                                         rng=np.random.default_rng(0),
                                         index=0)])


# ----------------------------------------------------------------------------
# Augmentation.


def _square_example(size=32):
  image = np.zeros((size, size, 3), np.uint8)
  mask = np.zeros((size, size), bool)
  image[9:19, 13:23] = 255
  mask[9:19, 13:23] = True
  return image, mask


def test_augmentation_keeps_image_and_mask_aligned():
  image, mask = _square_example()
  aug = dict(AUG, crop_scale=(0.6, 1.0), rotate=20.0, speckle=0.0)
  for seed in range(20):
    out, mk = preprocess.augment(image, mask, np.random.default_rng(seed), aug,
                                 flip=seed % 2 == 1)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    bright = out.mean(-1) > 0.5
    assert mk.sum() >= 60, seed
    # The bright square lies on the transformed mask and covers it.
    assert (bright & mk).sum() >= 0.85 * bright.sum(), seed
    assert (bright & mk).sum() >= 0.85 * mk.sum(), seed
    cy, cx = (np.argwhere(bright).mean(0) - np.argwhere(mk).mean(0))
    assert abs(cy) < 1.0 and abs(cx) < 1.0, seed


def test_geometry_matches_pillow_reference():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  mask = np.zeros((32, 32), bool)
  mask[3:9, 20:30] = True
  pil = Image.fromarray(image)
  # Rotation only: exactly Image.rotate by the drawn angle, then the flip.
  for flip in (False, True):
    out, mk = preprocess.augment(image, mask, np.random.default_rng(5),
                                 {"rotate": 10.0}, flip=flip)
    want = pil.rotate(np.random.default_rng(5).uniform(-10, 10),
                      resample=Image.BILINEAR)
    want_mk = Image.fromarray(mask).rotate(
        np.random.default_rng(5).uniform(-10, 10), resample=Image.NEAREST)
    if flip:
      want = want.transpose(Image.FLIP_LEFT_RIGHT)
      want_mk = want_mk.transpose(Image.FLIP_LEFT_RIGHT)
    np.testing.assert_array_equal(np.round(out * 255), np.asarray(want))
    np.testing.assert_array_equal(mk, np.asarray(want_mk))
  # Flip only: the mirror image.
  out, mk = preprocess.augment(image, mask, None, {}, flip=True)
  np.testing.assert_array_equal(np.round(out * 255), image[:, ::-1])
  np.testing.assert_array_equal(mk, mask[:, ::-1])


def test_speckle_only_where_configured():
  image = np.full((32, 32, 3), 128, np.uint8)
  image[:, :8] = 0  # anechoic
  mask = np.zeros((32, 32), bool)
  plain = dict(speckle=0.0, brightness=0.0, contrast=0.0)
  out, _ = preprocess.augment(image, mask, np.random.default_rng(0), plain)
  np.testing.assert_allclose(out[:, 8:], 128 / 255, rtol=1e-6)
  assert (out[:, :8] == 0).all()
  noisy, _ = preprocess.augment(image, mask, np.random.default_rng(0),
                                dict(plain, speckle=0.2))
  rel = noisy[:, 8:, 0] / (128 / 255) - 1
  assert 0.15 < rel.std() < 0.25 and abs(rel.mean()) < 0.03
  assert (noisy[:, :8] == 0).all()  # multiplicative: black stays black
  assert (noisy[..., 0] == noisy[..., 2]).all()  # one field for all channels
  # The default configs: speckle for ultrasound only.
  assert testing.config("busi", "").data.augment.speckle > 0
  assert testing.config("chestxray", "").data.augment.speckle == 0


def test_no_augmentation_at_eval(busi):
  source, indices, pre = busi
  a = pre(source[int(indices[0])])
  b = pre(source[int(indices[0])])
  assert_batches_equal([a], [b])
  plain = preprocess.Preprocessor(tables=pre.tables, class_of=pre.class_of,
                                  image_size=32)
  assert_batches_equal([a], [plain(source[int(indices[0])])])


# ----------------------------------------------------------------------------
# Horizontal flip and laterality.


def test_laterality_words():
  assert preprocess.has_laterality("Opacity in the LEFT lower lobe")
  assert preprocess.has_laterality("right-sided effusion")
  assert preprocess.has_laterality("shift rightward")
  for text in ("bright echogenic halo", "upright film", "copyright", "",
               "bilateral opacities", None):
    assert not preprocess.has_laterality(text), text
  assert (preprocess.swap_laterality(
      "Left lower lobe, RIGHT effusion; left-sided, shift leftwards, bright")
          == "Right lower lobe, LEFT effusion; right-sided, shift rightwards, "
          "bright")


@pytest.fixture(scope="module")
def sided_tables(tok):
  bank = {"categories": {
      "lesion": {"sentences": ["a mass is seen", "a lesion is present"],
                 "phrases": ["mass in the left breast",
                             "mass in the right breast", "left lower lobe"]},
      "normal": {"sentences": ["no mass"], "phrases": []}}, "unseen": []}
  return text_tables.build_text_tables(bank, ["lesion", "normal"], tok, 16, 8)


def _half_white(text="", phrase=""):
  image = np.zeros((16, 16, 3), np.uint8)
  image[:, :8] = 255
  mask = np.zeros((16, 16), np.uint8)
  mask[4:8, 2:6] = 255
  return {"image": image, "mask": mask, "label": 0, "text": text,
          "phrase": phrase, "has_roi": 1}


def _flips(tables, mode, record, n=24):
  pre = preprocess.Preprocessor(tables=tables, class_of={0: 0, 1: 1},
                                image_size=16, aug={"hflip": mode})
  out = []
  for seed in range(n):
    ex = pre(record, rng=np.random.default_rng(seed))
    flipped = ex["image"][:, 8:].mean() > ex["image"][:, :8].mean()
    # The mask moves with the image.
    assert ex["roi_mask"][4:8, 10:14].all() == flipped
    out.append((flipped, ex))
  return out


def _ids(tables, text, length):
  return tokenizer_lib.tokenize(tables.tokenizer, [text], length)[0][0]


def test_class_phrases_give_each_training_image_a_phrase_of_its_class(
    sided_tables):
  """Without a phrase of its own, a training image of a class with bank
  phrases draws one (varying with the rng) and takes part (phrase_id >= 0)
  with the very image it has without class phrases; a class without
  phrases, an evaluation call and the default take no part; a flip that the
  text may not contradict leaves a lateral phrase out."""
  t = sided_tables
  kw = dict(tables=t, class_of={0: 0, 1: 1}, image_size=16)
  record = dict(_half_white(), has_roi=0)
  assert t.class_phrase_rows[0].tolist() == [0, 1, 2]
  assert t.class_phrase_rows[1].size == 0
  for hflip in (False, True):
    plain = preprocess.Preprocessor(**kw, aug={"hflip": hflip})
    drawing = preprocess.Preprocessor(**kw, aug={"hflip": hflip},
                                      class_phrases=True)
    drawn, flips = set(), 0
    for seed in range(24):
      a = plain(record, rng=np.random.default_rng(seed))
      b = drawing(record, rng=np.random.default_rng(seed))
      np.testing.assert_array_equal(a["image"], b["image"])
      assert a["phrase_id"] == -1
      flipped = b["image"][:, 8:].mean() > b["image"][:, :8].mean()
      flips += flipped
      if flipped:  # every phrase of this bank names a side
        assert b["phrase_id"] == -1
        continue
      row = int(b["phrase_id"])
      assert row in (0, 1, 2)
      np.testing.assert_array_equal(b["phrase_ids"], t.phrase_ids[row])
      drawn.add(row)
    assert len(drawn) > 1 and (flips > 0) == hflip
  normal = dict(record, label=1)
  assert drawing(normal, rng=np.random.default_rng(0))["phrase_id"] == -1
  assert drawing(record)["phrase_id"] == -1   # evaluation: no rng


def test_hflip_false_never_flips(sided_tables):
  assert not any(f for f, _ in _flips(sided_tables, False, _half_white()))


def test_hflip_true_flips_only_texts_without_laterality(sided_tables):
  free = _flips(sided_tables, True, _half_white())
  assert 0 < sum(f for f, _ in free) < len(free)
  for record in (_half_white(text="opacity in the left lower lobe"),
                 _half_white(phrase="mass in the right breast")):
    assert not any(f for f, _ in _flips(sided_tables, True, record))


def test_hflip_swap_swaps_left_and_right_in_text_and_phrase(sided_tables):
  t = sided_tables
  text = "opacity in the left lower lobe"
  swapped = _ids(t, "opacity in the right lower lobe", 16)
  record = _half_white(text=text, phrase="mass in the left breast")
  out = _flips(t, "swap", record)
  assert 0 < sum(f for f, _ in out) < len(out)
  assert not np.array_equal(swapped, _ids(t, text, 16))
  for flipped, ex in out:
    np.testing.assert_array_equal(ex["text_ids"],
                                  swapped if flipped else _ids(t, text, 16))
    # The swapped phrase is in the bank: its row and id.
    want = t.phrases.index("mass in the right breast" if flipped else
                           "mass in the left breast")
    assert ex["phrase_id"] == want
    np.testing.assert_array_equal(ex["phrase_ids"], t.phrase_ids[want])
  # A swapped phrase the bank lacks is tokenised on the fly, id -1.
  record = _half_white(phrase="left lower lobe")
  for flipped, ex in _flips(t, "swap", record):
    if flipped:
      np.testing.assert_array_equal(ex["phrase_ids"],
                                    _ids(t, "right lower lobe", 8))
      assert ex["phrase_id"] == -1
    else:
      assert ex["phrase_id"] == t.phrases.index("left lower lobe")


def test_hflip_config_names(sided_tables):
  record = _half_white(text="opacity in the left lower lobe")
  assert not any(f for f, _ in _flips(sided_tables, "off", _half_white()))
  assert not any(f for f, _ in _flips(sided_tables, "no_laterality", record))
  assert any(f for f, _ in _flips(sided_tables, "no_laterality",
                                  _half_white()))


def test_bad_hflip_value_fails_clearly(sided_tables):
  with pytest.raises(ValueError, match="augment.hflip='sometimes'"):
    preprocess.Preprocessor(tables=sided_tables, class_of={0: 0},
                            image_size=16, aug={"hflip": "sometimes"})


# ----------------------------------------------------------------------------
# Normalisation.


def test_normalization_names_and_preprocessor(sided_tables):
  assert preprocess.normalization("half") == ((0.5,) * 3, (0.5,) * 3)
  assert preprocess.normalization("clip") == (preprocess.CLIP_MEAN,
                                              preprocess.CLIP_STD)
  with pytest.raises(ValueError, match="normalization='bogus'"):
    preprocess.normalization("bogus")
  with pytest.raises(ValueError, match="needs the model config"):
    preprocess.normalization("auto")
  mean, std = preprocess.normalization("clip")
  record = _half_white()
  ex = preprocess.Preprocessor(tables=sided_tables, class_of={0: 0},
                               image_size=16, mean=mean, std=std)(record)
  np.testing.assert_allclose(ex["image"][0, 0],
                             (1 - np.array(mean)) / np.array(std), rtol=1e-6)
  np.testing.assert_allclose(ex["image"][0, -1],
                             -np.array(mean) / np.array(std), rtol=1e-6)
  # per_image: every image standardised by its own statistics, so a global
  # exposure change leaves the input unchanged.
  per_image = preprocess.Preprocessor(
      tables=sided_tables, class_of={0: 0}, image_size=16,
      mean=None, std=None)
  a = per_image(record)["image"]
  np.testing.assert_allclose(a.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(a.std(), 1.0, rtol=1e-2)
  dim = dict(record, image=(record["image"] // 2 + 20).astype(np.uint8))
  np.testing.assert_allclose(per_image(dim)["image"], a, atol=2e-2)
  with pytest.raises(ValueError, match="both"):
    preprocess.Preprocessor(tables=sided_tables, class_of={0: 0},
                            image_size=16, mean=None, std=(0.5,) * 3)


def _model_config(**inits):
  cfg = testing.config("busi", "").model
  for k, v in inits.items():
    setattr(cfg, k, v)
  return cfg


def test_auto_normalization_follows_the_image_checkpoint(tmp_path):
  from transformers import BertConfig, CLIPConfig, ViTConfig  # pylint: disable=g-import-not-at-top
  small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64)
  clip = str(tmp_path / "clip")
  CLIPConfig(text_config=small, vision_config=dict(small, image_size=32,
                                                   patch_size=8)
             ).save_pretrained(clip)
  bert = str(tmp_path / "bert")
  BertConfig(**small).save_pretrained(bert)
  vit = str(tmp_path / "vit")
  ViTConfig(**small, image_size=32, patch_size=8).save_pretrained(vit)
  clip_norm = (preprocess.CLIP_MEAN, preprocess.CLIP_STD)
  half = ((0.5,) * 3, (0.5,) * 3)
  auto = lambda **kw: preprocess.normalization("auto", _model_config(**kw))
  per_image = (None, None)
  assert auto() == per_image  # image tower from scratch
  assert auto(init=f"hf:{clip}") == clip_norm
  assert auto(image_init=f"hf:{clip}", text_init=f"hf:{bert}") == clip_norm
  assert auto(text_init=f"hf:{clip}") == per_image  # only the text is CLIP
  assert auto(text_init=f"hf:{bert}") == per_image
  assert auto(image_init=f"hf:{vit}") == half
  # A processor config states the checkpoint's own statistics.
  with open(os.path.join(vit, "preprocessor_config.json"), "w") as f:
    json.dump({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}, f)
  assert auto(image_init=f"hf:{vit}") == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_unseen_categories_only_when_asked():
  bank = {"unseen": ["c", "z"]}
  cats = ["a", "b", "c", "d"]
  assert pipeline.unseen_categories("", bank, cats) == []
  assert pipeline.unseen_categories("bank", bank, cats) == ["c"]
  assert pipeline.unseen_categories("d, a", bank, cats) == ["d", "a"]
  with pytest.raises(ValueError, match=r"config.data.unseen='e'.*\['e'\]"):
    pipeline.unseen_categories("e", bank, cats)
  with pytest.raises(ValueError, match="fewer than two"):
    pipeline.unseen_categories("a,b,c", bank, cats)
