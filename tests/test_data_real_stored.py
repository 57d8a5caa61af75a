"""The stored resolution of real builds (option stored_max_side): images over
the bound are stored downsampled with their masks aligned, the others as
they are; the bound is part of the build's identity. Also the full-size
copy that bench/input_bench.py writes for timing the README command."""
import logging
import os
import sys

import numpy as np
from PIL import Image
import pytest

import fixtures_real as fx
from hica_jax import testing
from hica_jax.data import pipeline
from hica_jax.data import real
from hica_jax.data.real import common
from hica_jax.data.real import files
from test_data_real import records

sys.path.insert(0, os.path.join(testing.REPO, "bench"))

import input_bench  # noqa: E402  pylint: disable=g-import-not-at-top

BOUND = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return fx.write_busi_sizes(str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def bounded(root, data_dir):
  builder, summary = real.build_dataset("busi", root, data_dir,
                                        stored_max_side=BOUND)
  return builder, summary, records(builder)


def _file(root, rel):
  path = os.path.join(root, "Dataset_BUSI_with_GT", rel)
  return np.asarray(Image.open(path).convert("RGB"))


def test_large_images_are_stored_at_the_bound_with_aligned_masks(bounded):
  _, summary, recs = bounded
  assert summary["stored"] == {"max_side": BOUND, "downsampled": 2,
                               "max_hw": [32, 32]}
  assert summary["sizes"]["max_hw"] == [128, 128]  # The files' own sizes.
  big = recs["benign/benign (1).png"]
  assert big["image"].shape == (24, 32, 3)  # 96 x 128 shrunk by 4.
  mask = big["mask"][..., 0] > 0
  expected = np.zeros((24, 32), bool)
  expected[6:12, 16:24] = True  # Rows 24:48, columns 64:96 divided by 4.
  np.testing.assert_array_equal(mask, expected)
  assert int(big["has_roi"]) == 1
  # Antialiased: close to the means of the 4 x 4 source blocks, also on the
  # 1-pixel stripes (~50; taking one pixel per block gives 0 or 100), with a
  # little Lanczos ringing at the lesion's edges.
  source = fx.big_image((96, 128), fx.BIG_LESION).astype(np.float64)
  block_means = source.reshape(24, 4, 32, 4).mean(axis=(1, 3))
  diff = np.abs(big["image"][..., 0] - block_means)
  assert diff.mean() < 2 and diff.max() < 25
  stripes = diff[16:, :12]  # STRIPES divided by 4.
  assert stripes.mean() < 2 and stripes.max() < 8
  tall = recs["malignant/malignant (1).png"]
  assert tall["image"].shape == (32, 16, 3)
  tall_mask = np.zeros((32, 16), bool)
  tall_mask[:2, :2] = True  # The 8 x 8 top-left corner of 128 x 64.
  np.testing.assert_array_equal(tall["mask"][..., 0] > 0, tall_mask)


def _same_records(a, b):
  assert a.keys() == b.keys()
  for key, rec in a.items():
    for field, value in rec.items():
      np.testing.assert_array_equal(np.asarray(value),
                                    np.asarray(b[key][field]), err_msg=key)


@pytest.mark.parametrize("keep_bytes", [0, 3000])
def test_writer_decodes_again_only_what_the_probe_did_not_keep(
    bounded, root, tmp_path, monkeypatch, keep_bytes):
  """The probe keeps the stored PNGs within common.KEEP_STORED_BYTES; past
  it (here none, or a few images) the writer decodes again, storing the
  same records either way."""
  decoded = []
  load = files.load_example_arrays

  def counting_load(item, max_side=0):
    decoded.append(item.id)
    return load(item, max_side)

  monkeypatch.setattr(files, "load_example_arrays", counting_load)
  monkeypatch.setattr(common, "KEEP_STORED_BYTES", keep_bytes)
  builder, _ = real.build_dataset("busi", root, str(tmp_path),
                                  stored_max_side=BOUND)
  _same_records(records(builder), bounded[2])
  images = len(bounded[2])
  again = len(decoded) - images
  if keep_bytes == 0:
    assert again == images
  else:
    assert 0 < again < images
  monkeypatch.setattr(common, "KEEP_STORED_BYTES", 1 << 30)
  decoded.clear()
  real.build_dataset("busi", root, str(tmp_path / "all_kept"),
                     stored_max_side=BOUND)
  assert len(decoded) == images  # Each file decoded once.


@pytest.mark.parametrize("channels", ["gray", "color"])
def test_bound_long_side_matches_pillows_rgb_lanczos(channels):
  """Gray images shrink one channel (faster), to the same pixels as
  Pillow's RGB resize; colour ones as before."""
  rng = np.random.default_rng(0)
  if channels == "gray":
    rgb = np.repeat(rng.integers(0, 256, (300, 400, 1), np.uint8), 3, -1)
  else:
    rgb = rng.integers(0, 256, (300, 400, 3), np.uint8)
  got, mask = files.bound_long_side(rgb, np.zeros((300, 400), bool), 64)
  want = np.asarray(Image.fromarray(rgb).resize((64, 48), Image.LANCZOS,
                                                reducing_gap=3.0))
  np.testing.assert_array_equal(got, want)
  assert mask.shape == (48, 64) and not mask.any()


def test_images_within_the_bound_are_stored_unchanged(bounded, root):
  _, _, recs = bounded
  small = [i for i in recs if i not in fx.BIG_IMAGES]
  assert len(small) == 19
  for i in small:
    np.testing.assert_array_equal(recs[i]["image"], _file(root, i))


def test_bound_zero_keeps_full_size_and_builds_anew(bounded, root, data_dir):
  builder32, _, _ = bounded
  builder0, summary = real.build_dataset("busi", root, data_dir,
                                         stored_max_side=0)
  assert summary["reused"] is False
  assert summary["stored"] == {"max_side": 0, "downsampled": 0,
                               "max_hw": [128, 128]}
  assert builder0.builder_config.name != builder32.builder_config.name
  assert builder0.content_fingerprint() != builder32.content_fingerprint()
  recs = records(builder0)
  for rel in fx.BIG_IMAGES:
    np.testing.assert_array_equal(recs[rel]["image"], _file(root, rel))
  again = real.BUILDERS["busi"](root=root, data_dir=data_dir,
                                stored_max_side=BOUND)
  assert again.builder_config.name == builder32.builder_config.name


@pytest.mark.parametrize("bad", [-1, 1.5, True, "256"])
def test_bad_bound_names_the_option(bad, root, tmp_path):
  with pytest.raises(ValueError, match=r"stored_max_side=.* must be an "
                     r"integer >= 0"):
    real.BUILDERS["busi"](root=root, data_dir=str(tmp_path),
                          stored_max_side=bad)


def test_open_dataset_passes_the_config_bound(bounded, root, data_dir,
                                              caplog):
  builder32, _, _ = bounded
  config = testing.config("busi", "tiny").data
  config.root = root
  config.stored_max_side = BOUND
  with caplog.at_level(logging.INFO):
    handle = pipeline.open_dataset(config, data_dir)
  assert handle.builder.builder_config.name == builder32.builder_config.name
  assert "stored long side <= 32: 2 downsampled" in caplog.text
  config.builder_options = '{"stored_max_side": 64}'
  with pytest.raises(ValueError, match="set config.data.stored_max_side"):
    pipeline.open_dataset(config, data_dir)


def test_builder_default_is_the_config_default():
  # A build made with `python -m hica_jax.data build` is the one a run with
  # the default config reuses.
  assert common.COMMON_OPTIONS["stored_max_side"] == \
      testing.config("busi", "").data.stored_max_side


# Large JPEGs: decoded at a reduced scale, stored as if decoded whole. Each
# is 192 x 256 (raw), over twice BOUND, so libjpeg decodes it at 1/2 scale.
JPEG_LESION = (slice(48, 96), slice(128, 192))
JPEG_BOX = (64, 32, 64, 32)  # x, y, w, h on the file's 192 x 256 grid.


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
  """A CSV data set: a large JPEG with a mask file, one with a box, one
  EXIF-rotated, a 64 x 48 JPEG (within twice the bound) and small PNGs."""
  root = str(tmp_path_factory.mktemp("jpeg_csv"))
  img = lambda n: os.path.join(root, "images", n)
  fx.write_image(img("big.jpg"), fx.big_image((192, 256), JPEG_LESION),
                 fmt="JPEG", quality=95)
  mask = np.zeros((192, 256), np.uint8)
  mask[JPEG_LESION] = 255
  fx.write_image(os.path.join(root, "masks", "big_m.png"), mask, fmt="PNG")
  fx.write_image(img("box.jpg"), fx.big_image((192, 256)), fmt="JPEG",
                 quality=95)
  exif = Image.Exif()
  exif[0x0112] = 6  # Displayed rotated 90 degrees: 256 high, 192 wide.
  fx.write_image(img("rot.jpg"), fx.big_image((192, 256)), fmt="JPEG",
                 quality=95, exif=exif.tobytes())
  fx.write_image(img("mid.jpg"), fx.big_image((48, 64)), fmt="JPEG",
                 quality=95)
  rows = ["images/big.jpg,a,masks/big_m.png,,,,,train",
          "images/box.jpg,a,,%d,%d,%d,%d,train" % JPEG_BOX,
          "images/rot.jpg,b,,,,,,train", "images/mid.jpg,b,,,,,,train"]
  for i in range(8):
    fx.write_image(img(f"s{i}.png"), fmt="PNG")
    rows.append(f"images/s{i}.png,{'ab'[i % 2]},,,,,,"
                f"{('val', 'test')[i // 2 % 2] if i < 4 else 'test'}")
  fx.write_bytes(os.path.join(root, "manifest.csv"), (
      "image,label,mask,x,y,w,h,split\n" + "\n".join(rows) + "\n").encode())
  return root


@pytest.fixture(scope="module")
def jpeg_build(jpeg_root, tmp_path_factory):
  builder, summary = real.build_dataset(
      "csv", jpeg_root, str(tmp_path_factory.mktemp("jpeg_tfds")),
      stored_max_side=BOUND)
  return summary, records(builder)


def _whole(root, name, shape, mask=None):
  """What the build stores when the file is decoded at full scale."""
  rgb, _, _, full = files.read_pil(os.path.join(root, "images", name))
  assert rgb.shape[:2] == full == shape
  return files.bound_long_side(
      rgb, np.zeros(shape, bool) if mask is None else mask, BOUND)


def test_large_jpeg_is_decoded_at_a_reduced_scale():
  assert files.jpeg_draft_size((256, 192), BOUND) == (64, 64)
  assert files.jpeg_draft_size((64, 48), BOUND) is None  # Within 2 x bound.
  assert files.jpeg_draft_size((4000, 3000), 0) is None  # No bound.


def test_large_jpegs_are_stored_as_if_decoded_whole(jpeg_root, jpeg_build):
  summary, recs = jpeg_build
  # The summary gives the files' own sizes, the rotated one as displayed.
  assert summary["sizes"]["max_hw"] == [256, 256]
  assert summary["stored"] == {"max_side": BOUND, "downsampled": 4,
                               "max_hw": [32, 32]}
  assert not [w for w in summary["warnings"] if "mask size" in w["message"]]
  rgb, _, _, full = files.read_pil(os.path.join(jpeg_root, "images",
                                                "big.jpg"), BOUND)
  assert rgb.shape == (96, 128, 3) and full == (192, 256)
  full_mask = np.zeros((192, 256), bool)
  full_mask[JPEG_LESION] = True
  want_rgb, want_mask = _whole(jpeg_root, "big.jpg", (192, 256), full_mask)
  big = recs["images/big.jpg"]
  assert big["image"].shape == want_rgb.shape == (24, 32, 3)
  diff = np.abs(big["image"].astype(int) - want_rgb)
  assert diff.mean() < 1.5 and diff.max() < 40
  # The mask lands on the same stored pixels as from the full-size grid.
  np.testing.assert_array_equal(big["mask"][..., 0] > 0, want_mask)
  assert want_mask[6:12, 16:24].all() and want_mask.sum() == 48
  box = recs["images/box.jpg"]["mask"][..., 0] > 0
  expected = np.zeros((24, 32), bool)
  expected[4:8, 8:16] = True  # JPEG_BOX divided by 8.
  np.testing.assert_array_equal(box, expected)
  rot = recs["images/rot.jpg"]["image"]
  assert rot.shape == (32, 24, 3)
  # Rotated 90 degrees clockwise: the gradient's dark corner (raw top left)
  # is now at the top right.
  assert rot[0, -1, 0] < rot[-1, 0, 0]


def test_jpeg_within_twice_the_bound_is_decoded_whole(jpeg_root,
                                                      jpeg_build):
  _, recs = jpeg_build
  want, _ = _whole(jpeg_root, "mid.jpg", (48, 64))
  np.testing.assert_array_equal(recs["images/mid.jpg"]["image"], want)


def test_fullsize_copy_mirrors_past_the_root_and_builds_every_copy(tmp_path):
  """bench/input_bench.py's full-size copy (for timing the README command on
  full-size X-rays): past the root's count each image comes again,
  mirrored; the build keeps every copy (none is a duplicate) and puts each
  beside its original (same patient prefix, so the same split)."""
  root = tmp_path / "chest_xray"
  names = {("train", "NORMAL"): ["IM-0001-0001", "IM-0002-0001",
                                 "IM-0003-0001"],
           ("train", "PNEUMONIA"): ["person1_bacteria_1", "person2_virus_2",
                                    "person3_bacteria_3"],
           ("test", "NORMAL"): ["IM-0101-0001"],
           ("test", "PNEUMONIA"): ["person101_virus_1"]}
  for (split, cls), stems in names.items():
    for stem in stems:
      fx.write_image(str(root / split / cls / f"{stem}.jpeg"), fmt="JPEG",
                     shape=(24, 20))
  out, _ = input_bench.write_fullsize_copy(str(root), str(tmp_path / "copy"),
                                           14, 80)
  written = sorted(os.path.relpath(os.path.join(d, f), out)
                   for d, _, fs in os.walk(out) for f in fs
                   if f.endswith(".jpeg"))
  assert len(written) == 14
  mirrored = [w for w in written if w.endswith("-mirror.jpeg")]
  assert len(mirrored) == 6
  for rel in mirrored:
    with Image.open(os.path.join(out, rel)) as m, Image.open(
        os.path.join(out, rel.replace("-mirror", ""))) as o:
      assert m.size == o.size and max(m.size) == 80
      diff = np.abs(np.asarray(m, np.float32)
                    - np.asarray(o, np.float32)[:, ::-1])
      assert diff.mean() < 2.0, rel   # JPEG, not bit-exact
  with pytest.raises(ValueError, match="at most twice"):
    input_bench.write_fullsize_copy(str(root), str(tmp_path / "c2"), 17, 80)
  builder, _ = real.build_dataset("kermany", out, str(tmp_path / "tfds"),
                                  dedup=True, val_fraction=0.3)
  recs = records(builder)
  assert len(recs) == 14
  split_of = {rid: r["split"] for rid, r in recs.items()}
  for rel in mirrored:
    twin = [i for i in split_of if i.endswith(
        os.path.basename(rel).replace("-mirror", ""))]
    mine = [i for i in split_of if i.endswith(os.path.basename(rel))]
    assert len(twin) == 1 and len(mine) == 1
    assert split_of[twin[0]] == split_of[mine[0]], rel
