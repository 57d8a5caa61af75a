"""The stored resolution of real builds (option stored_max_side): images over
the bound are stored downsampled with their masks aligned, the others as
they are; the bound is part of the build's identity."""
import logging
import os

import numpy as np
from PIL import Image
import pytest

import fixtures_real as fx
from hica_jax import testing
from hica_jax.data import pipeline
from hica_jax.data import real
from hica_jax.data.real import common
from test_data_real import records

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
