"""Real data set builders on tiny copies of the on-disk layouts."""
import contextlib
import io
import json
import glob
import os
import pickle
import shutil
import sys
import tempfile

import numpy as np
import pytest

import fixtures_real as fx
from hica_jax.data import __main__ as data_cli
from hica_jax.data import descriptors
from hica_jax.data import real
from hica_jax.data import synthetic
from hica_jax.data.real import busi as busi_lib
from hica_jax.data.real import common


def _s(x):
  return x.decode() if isinstance(x, bytes) else x


def records(builder):
  """{id: record with split} over every split, decoded by tfds (no TF)."""
  out = {}
  for split in builder.info.splits:
    ds = builder.as_data_source(split)
    for i in range(len(ds)):
      r = dict(ds[i])
      r["split"] = split
      out[_s(r["id"])] = r
  return out


def class_counts(recs, names, split):
  counts = {n: 0 for n in names}
  for r in recs.values():
    if r["split"] == split:
      counts[names[int(r["label"])]] += 1
  return counts


def assert_skipped(summary, expected):
  got = {s["path"]: s["reason"] for s in summary["skipped"]}
  for suffix, reason in expected.items():
    hits = [r for p, r in got.items() if p.endswith(suffix) or
            (suffix.endswith(":") and p.startswith(suffix))]
    assert hits, f"{suffix} not in skipped {sorted(got)}"
    assert any(r.startswith(reason) for r in hits), (suffix, hits)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  base = str(tmp_path_factory.mktemp("downloads"))
  return {"kermany": fx.write_kermany(base), "busi": fx.write_busi(base),
          "rsna": fx.write_rsna(base), "csv": fx.write_csv(base),
          "csv_split": fx.write_csv(base, with_split=True), "base": base}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def kermany(data_root, data_dir):
  builder, summary = real.build_dataset("kermany", data_root["kermany"],
                                        data_dir, val_fraction=0.25)
  return builder, summary, records(builder)


@pytest.fixture(scope="module")
def busi(data_root, data_dir):
  builder, summary = real.build_dataset("busi", data_root["busi"], data_dir)
  return builder, summary, records(builder)


@pytest.fixture(scope="module")
def rsna(data_root, data_dir):
  builder, summary = real.build_dataset("rsna", data_root["rsna"], data_dir)
  return builder, summary, records(builder)


# ----------------------------------------------------------------------------
# Kermany.


def test_kermany_counts_and_layout(kermany):
  builder, summary, recs = kermany
  names = builder.info.features["label"].names
  assert names == ["normal", "pneumonia"]
  assert "tensorflow" not in sys.modules
  train, val = (class_counts(recs, names, s) for s in ("train", "val"))
  assert {c: train[c] + val[c] for c in names} == fx.KERMANY_POOL
  assert class_counts(recs, names, "test") == fx.KERMANY_TEST_COUNTS
  assert all(v > 0 for v in val.values())
  for split, counts in summary["splits"].items():
    assert counts["per_class"] == class_counts(recs, names, split)
    assert len(builder.as_data_source(split)) == counts["total"]
  notes = " | ".join(summary["notes"])
  assert "nested folder chest_xray/chest_xray" in notes
  assert "__MACOSX" in notes and "folded into train" in notes
  assert not any("__MACOSX" in i or "_mask" in i for i in recs)
  saved = os.path.join(os.fspath(builder.data_dir), common.SUMMARY_FILE)
  with open(saved) as f:
    assert json.load(f)["splits"] == summary["splits"]


def test_kermany_skipped_with_reasons(kermany):
  _, summary, _ = kermany
  assert_skipped(summary, fx.KERMANY_SKIPPED)
  assert len(summary["skipped"]) == len(fx.KERMANY_SKIPPED)
  assert summary["skipped_by_reason"]["corrupt or truncated image"] == 2


def test_kermany_no_patient_in_two_splits(kermany):
  _, summary, recs = kermany
  split_of = {}
  for r in recs.values():
    pid = _s(r["patient_id"])
    assert pid, r["id"]  # Every Kermany name here carries a patient id.
    split_of.setdefault(pid, set()).add(r["split"])
  assert all(len(s) == 1 for s in split_of.values())
  assert split_of["person9"] == {"test"}
  assert split_of["IM-0001"] in ({"train"}, {"val"})  # Two images, one split.
  assert _s(recs["train/NORMAL/IM-0001-0001.jpeg"]["patient_id"]) == "IM-0001"
  assert summary["patients"]["in_two_splits"] == []


def test_kermany_image_conversions(kermany):
  _, summary, recs = kermany
  for r in recs.values():
    assert r["image"].dtype == np.uint8 and r["image"].shape[-1] == 3
    assert r["mask"].shape == r["image"].shape[:2] + (1,)
    assert not r["mask"].any() and int(r["has_roi"]) == 0
  # EXIF orientation 6: stored 16 high x 8 wide, the white half on top.
  img = recs["train/NORMAL/IM-0008-0001.jpeg"]["image"]
  assert img.shape == (16, 8, 3)
  assert img[:7].mean() > 200 and img[9:].mean() < 50
  assert summary["exif_rotated"] == ["train/NORMAL/IM-0008-0001.jpeg"]
  # 16-bit 12-bit-valued ramp: rescaled to the full 8-bit range, monotone.
  ramp = recs["train/NORMAL/IM-0007-0001.png"]["image"]
  assert ramp.min() == 0 and ramp.max() == 255
  assert np.all(np.diff(ramp[0, :, 0].astype(int)) >= 0)
  assert np.array_equal(ramp[..., 0], ramp[..., 2])
  # RGBA: the transparent half is black, the opaque half keeps its colour.
  rgba = recs["train/PNEUMONIA/person11_bacteria_13.png"]["image"]
  assert np.all(rgba[:8] == 200) and np.all(rgba[8:] == 0)
  # RGB stays colour; grayscale is repeated into three channels.
  rgb = recs["train/NORMAL/IM-0006-0001.jpeg"]["image"]
  assert not np.array_equal(rgb[..., 0], rgb[..., 1])
  gray = recs["train/NORMAL/IM-0002-0001.jpeg"]["image"]
  assert np.array_equal(gray[..., 0], gray[..., 1])
  assert recs["train/NORMAL/IM-0003-0001.jpeg"]["image"].shape == (20, 12, 3)
  assert summary["image_modes"] == {"I;16": 1, "L": 28, "RGB": 1, "RGBA": 1}


def test_kermany_duplicates_reported_and_dropped(kermany, data_root,
                                                 tmp_path):
  _, summary, _ = kermany
  groups = summary["duplicates"]["groups"]
  assert [[m["id"] for m in g] for g in groups] == [list(fx.KERMANY_DUPLICATE)]
  assert summary["duplicates"]["cross_split_groups"] == 1
  assert summary["duplicates"]["dropped"] == []
  builder, dd = real.build_dataset("kermany", data_root["kermany"],
                                   str(tmp_path), val_fraction=0.25,
                                   dedup=True)
  assert dd["duplicates"]["dropped"] == [fx.KERMANY_DUPLICATE[1]]
  assert dd["splits"]["test"]["per_class"]["normal"] == 2
  assert fx.KERMANY_DUPLICATE[1] not in records(builder)


def test_kermany_same_seed_same_splits_and_reuse(kermany, data_root, data_dir,
                                                 tmp_path):
  builder, _, recs = kermany
  split_of = {i: r["split"] for i, r in recs.items()}
  b2, _ = real.build_dataset("kermany", data_root["kermany"],
                             str(tmp_path / "a"), val_fraction=0.25)
  assert {i: r["split"] for i, r in records(b2).items()} == split_of
  b3, _ = real.build_dataset("kermany", data_root["kermany"],
                             str(tmp_path / "b"), val_fraction=0.25, seed=3)
  other = {i: r["split"] for i, r in records(b3).items()}
  assert other != split_of
  assert {i for i, s in other.items() if s == "test"} == {
      i for i, s in split_of.items() if s == "test"}  # Official test kept.
  # A second call reuses the prepared files.
  files = sorted(os.listdir(os.fspath(builder.data_dir)))
  mtimes = [os.path.getmtime(os.path.join(os.fspath(builder.data_dir), f))
            for f in files if "array_record" in f]
  b4, s4 = real.build_dataset("kermany", data_root["kermany"], data_dir,
                              val_fraction=0.25)
  assert s4["reused"] and os.fspath(b4.data_dir) == os.fspath(builder.data_dir)
  assert mtimes == [
      os.path.getmtime(os.path.join(os.fspath(builder.data_dir), f))
      for f in files if "array_record" in f]
  # grain pickles sources for worker processes.
  src = pickle.loads(pickle.dumps(b4.as_data_source("train")))
  assert len(src) == s4["splits"]["train"]["total"]
  assert pickle.loads(pickle.dumps(b4)).root == b4.root


def test_kermany3_classes_from_file_names(data_root, data_dir):
  builder, summary = real.build_dataset("kermany3", data_root["kermany"],
                                        data_dir, val_fraction=0.25)
  names = builder.info.features["label"].names
  assert names == ["normal", "bacterial_pneumonia", "viral_pneumonia"]
  pool = {c: summary["splits"]["train"]["per_class"][c] +
             summary["splits"]["val"]["per_class"][c] for c in names}
  assert pool == fx.KERMANY3_POOL
  assert summary["splits"]["test"]["per_class"] == fx.KERMANY3_TEST_COUNTS
  assert_skipped(summary, {"train/PNEUMONIA/person10_12.jpeg":
                           "pneumonia file name says neither"})
  recs = records(builder)
  for i, r in recs.items():
    if "bacteria" in i:
      assert names[int(r["label"])] == "bacterial_pneumonia"
    elif "virus" in i:
      assert names[int(r["label"])] == "viral_pneumonia"
    else:
      assert names[int(r["label"])] == "normal"


# ----------------------------------------------------------------------------
# BUSI.


def test_busi_counts_and_stratified_split(busi):
  builder, summary, recs = busi
  names = builder.info.features["label"].names
  assert names == ["benign", "malignant", "normal"]
  totals = {c: sum(class_counts(recs, names, s)[c] for s in common.SPLITS)
            for c in names}
  assert totals == fx.BUSI_COUNTS
  # Singletons are split exactly: 7 -> 4/1/2 and 6 -> 3/1/2 at BUSI's
  # 0.55/0.10/0.35.
  assert busi_lib.HicaBusi.DEFAULT_FRACTIONS == {"train": 0.55, "val": 0.10,
                                                 "test": 0.35}
  per = {s: class_counts(recs, names, s) for s in common.SPLITS}
  assert [per[s]["benign"] for s in common.SPLITS] == [4, 1, 2]
  assert [per[s]["normal"] for s in common.SPLITS] == [3, 1, 2]
  assert summary["masks"]["mask_files"] == fx.BUSI_MASK_FILES
  assert summary["masks"]["images_with_several_masks"] == 2
  assert summary["masks"]["images_with_roi"] == 13
  assert not any("_mask" in i for i in recs)
  assert_skipped(summary, fx.BUSI_SKIPPED)
  assert len(summary["skipped"]) == len(fx.BUSI_SKIPPED)
  assert [w["path"] for w in summary["warnings"]] == [
      "Dataset_BUSI_with_GT/benign/benign (7).png"]
  assert "tensorflow" not in sys.modules


def test_busi_masks_combined_and_phrases(busi):
  _, _, recs = busi
  bank = descriptors.load_bank("busi")
  m = recs["benign/benign (1).png"]["mask"][..., 0]
  expected = np.zeros((16, 16), np.uint8)
  expected[:8, :8] = 255
  expected[8:, 8:] = 255  # _mask OR _mask_1.
  np.testing.assert_array_equal(m, expected)
  m3 = recs["malignant/malignant (3).png"]["mask"][..., 0]
  assert (m3 == 255).sum() == 3 * 64 and (m3[8:, 8:] == 0).all()
  for i, r in recs.items():
    cat = i.split("/")[0]
    assert r["mask"].shape[:2] == r["image"].shape[:2]
    assert set(np.unique(r["mask"])) <= {0, 255}
    if cat == "normal" or i == "benign/benign (7).png":
      assert int(r["has_roi"]) == 0 and not r["mask"].any()
      assert _s(r["phrase"]) == ""
    else:
      assert int(r["has_roi"]) == 1
      assert _s(r["phrase"]) in bank["categories"][cat]["phrases"]
  assert {r["image"].shape for r in recs.values()} == {(16, 16, 3),
                                                        (12, 20, 3)}


def test_busi_duplicates_share_a_split(busi):
  _, summary, recs = busi
  groups = summary["duplicates"]["groups"]
  assert [[m["id"] for m in g] for g in groups] == [
      ["malignant/malignant (1).png", "malignant/malignant (7).png"]]
  assert summary["duplicates"]["cross_split_groups"] == 0
  assert (recs["malignant/malignant (1).png"]["split"] ==
          recs["malignant/malignant (7).png"]["split"])


def test_busi_seeded_splits(data_root, tmp_path, busi):
  _, _, recs = busi
  _, s0 = real.build_dataset("busi", data_root["busi"], str(tmp_path))
  assert not s0["reused"]  # A fresh data dir builds again ...
  b0 = real.build_dataset("busi", data_root["busi"], str(tmp_path))[0]
  assert {i: r["split"] for i, r in records(b0).items()} == {
      i: r["split"] for i, r in recs.items()}  # ... to the same splits.
  b1, _ = real.build_dataset("busi", data_root["busi"], str(tmp_path), seed=1)
  assert {i: r["split"] for i, r in records(b1).items()} != {
      i: r["split"] for i, r in recs.items()}


# ----------------------------------------------------------------------------
# RSNA.


def test_rsna_boxes_dicom_and_skips(rsna):
  builder, summary, recs = rsna
  names = builder.info.features["label"].names
  assert names == ["no_pneumonia", "pneumonia"]
  totals = {c: sum(class_counts(recs, names, s)[c] for s in common.SPLITS)
            for c in names}
  assert totals == {"no_pneumonia": len(fx.RSNA_NEGATIVE),
                    "pneumonia": len(fx.RSNA_BOXES)}
  bank = descriptors.load_bank("rsna")
  by_pid = {_s(r["patient_id"]): r for r in recs.values()}
  m = by_pid["p00"]["mask"][..., 0] > 0
  assert m.sum() == 4 * 4 + 5 * 3 and m[1:5, 1:5].all() and m[8:11, 8:13].all()
  assert (by_pid["p01"]["mask"][..., 0] > 0).sum() == 4 * 4  # Clipped.
  for pid in fx.RSNA_BOXES:
    assert int(by_pid[pid]["has_roi"]) == 1
    assert _s(by_pid[pid]["phrase"]) in bank["categories"]["pneumonia"][
        "phrases"]
  for pid in fx.RSNA_NEGATIVE:
    assert int(by_pid[pid]["has_roi"]) == 0 and not by_pid[pid]["mask"].any()
  # 16-bit MONOCHROME1 ramp: rescaled to 8 bits and inverted (bright left).
  ramp = by_pid["p03"]["image"][..., 0]
  assert ramp[:, 0].min() == 255 and ramp[:, -1].max() == 0
  assert_skipped(summary, fx.RSNA_SKIPPED)
  assert "stage_2_test_images" in " ".join(summary["notes"])
  assert any("clipped" in w["warning"] for w in summary["warnings"])
  assert summary["masks"]["images_with_boxes"] == len(fx.RSNA_BOXES)


def _pool_and_test(summary):
  per = {s: summary["splits"][s]["per_class"] for s in common.SPLITS}
  return ({c: per["train"][c] + per["val"][c] for c in per["train"]},
          per["test"])


def test_builds_leave_nothing_in_the_temp_dir(tmp_path, monkeypatch):
  """tfds makes a temp folder for bucket metadata per unprepared builder
  and never removes it; our builders have no bucket to read."""
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  root = fx.write_busi(str(tmp_path / "downloads"))
  assert not real.build_dataset("busi", root, str(tmp_path / "tfds"))[1][
      "reused"]
  synthetic.build_synthetic("busi", str(tmp_path / "synth"), image_size=32,
                            num_train_per_class=1, num_val_per_class=1,
                            num_test_per_class=1)
  assert os.listdir(temp) == []


def test_kermany_changed_folder_is_built_anew(tmp_path):
  root = fx.write_kermany(str(tmp_path / "downloads"))
  data_dir = str(tmp_path / "tfds")
  _, first = real.build_dataset("kermany", root, data_dir, val_fraction=0.25)
  assert not first["reused"]
  assert real.build_dataset("kermany", root, data_dir,
                            val_fraction=0.25)[1]["reused"]
  train = os.path.join(root, "chest_xray", "chest_xray", "train")
  for i in range(10):
    fx.write_image(os.path.join(train, "NORMAL", f"IM-{500 + i}-0001.jpeg"),
                   fmt="JPEG")
  for f in fx.KERMANY_TRAIN_PNEUMONIA[:5]:
    os.remove(os.path.join(train, "PNEUMONIA", f))
  builder, second = real.build_dataset("kermany", root, data_dir,
                                       val_fraction=0.25)
  assert not second["reused"]
  pool, test = _pool_and_test(second)
  assert pool == {"normal": fx.KERMANY_POOL["normal"] + 10,
                  "pneumonia": fx.KERMANY_POOL["pneumonia"] - 5}
  assert test == fx.KERMANY_TEST_COUNTS
  assert second["images"] == first["images"] + 5
  assert builder.content_fingerprint() != real.BUILDERS["kermany"](
      root=root, data_dir=str(tmp_path / "x"), val_fraction=0.5
  ).content_fingerprint()


def test_copied_folder_keeps_its_fingerprint_and_build(tmp_path,
                                                     monkeypatch):
  """A copy with new modification times is the same data (the build is
  reused); a file edited to the same size is not; unchanged files are not
  read again once their digests are cached."""
  from hica_jax.data.real import files  # pylint: disable=g-import-not-at-top
  root = fx.write_kermany(str(tmp_path / "downloads"))
  data_dir = str(tmp_path / "tfds")
  builder, first = real.build_dataset("kermany", root, data_dir,
                                      val_fraction=0.25)
  assert not first["reused"]
  # A plain copy: new modification times, same bytes.
  copy = str(tmp_path / "copy")
  shutil.copytree(root, copy, copy_function=shutil.copy)
  copied, second = real.build_dataset("kermany", copy, data_dir,
                                      val_fraction=0.25)
  assert copied.content_fingerprint() == builder.content_fingerprint()
  # Another folder is another build; the same content, the same identity.
  assert not second["reused"]
  reads = []
  digest = files.file_digest
  monkeypatch.setattr(files, "file_digest",
                      lambda p: reads.append(p) or digest(p))
  assert real.build_dataset("kermany", copy, data_dir,
                            val_fraction=0.25)[1]["reused"]
  assert not reads
  # Same size, other bytes: another fingerprint.
  image = sorted(glob.glob(os.path.join(copy, "**", "*.jpeg"),
                           recursive=True))[0]
  with open(image, "rb") as f:
    data = bytearray(f.read())
  data[-3] ^= 0xFF
  with open(image, "wb") as f:
    f.write(bytes(data))
  edited = real.BUILDERS["kermany"](root=copy, data_dir=data_dir,
                                    val_fraction=0.25)
  assert reads == [image]
  assert edited.content_fingerprint() != builder.content_fingerprint()


def test_class_without_images_fails_at_build_naming_the_folder(tmp_path):
  root = fx.write_kermany(str(tmp_path / "downloads"))
  for folder in glob.glob(os.path.join(root, "chest_xray", "chest_xray", "*",
                                       "PNEUMONIA")):
    shutil.rmtree(folder)
    os.makedirs(folder)
  with pytest.raises(ValueError) as e:
    real.build_dataset("kermany", root, str(tmp_path / "tfds"))
  assert os.path.abspath(root) in str(e.value)
  assert "['pneumonia'] have no readable images" in str(e.value)


# ----------------------------------------------------------------------------
# CSV manifest.


def test_csv_manifest(data_root, data_dir):
  builder, summary = real.build_dataset("csv", data_root["csv"], data_dir)
  recs = records(builder)
  names = builder.info.features["label"].names
  assert names == ["cat", "dog"]
  totals = {c: sum(class_counts(recs, names, s)[c] for s in common.SPLITS)
            for c in names}
  assert totals == fx.CSV_COUNTS
  a1 = recs["images/a1.png"]
  expected = np.zeros((16, 16), bool)
  expected[8:, 8:] = True   # the mask file
  expected[0:4, 0:4] = True  # OR the box of the second row
  np.testing.assert_array_equal(a1["mask"][..., 0] > 0, expected)
  assert _s(a1["text"]) == "report of a1" and _s(a1["phrase"]) == "left ear"
  assert (recs["images/a2.png"]["mask"] > 0).sum() == 9
  assert _s(recs["images/a2.png"]["phrase"]) == ""  # No bank given.
  assert recs["images/b1.png"]["split"] == recs["images/b2.png"]["split"]
  assert_skipped(summary, {"images/missing.png": "file not found",
                           "masks/a1_m.png": "mask file, never read",
                           "images/a3.png": "empty label"})
  assert "masks/a1_m.png" not in recs


def test_csv_manifest_with_split_column(data_root, data_dir):
  builder, summary = real.build_dataset("csv", data_root["csv_split"],
                                        data_dir)
  recs = records(builder)
  assert sorted(i for i, r in recs.items() if r["split"] == "test") == [
      "images/a5.png", "images/a6.png", "images/b5.png", "images/b6.png"]
  assert summary["splits"]["val"]["total"] >= 2  # Carved from train.
  assert "carved from train" in " ".join(summary["notes"])


def test_csv_not_utf8_names_the_file(tmp_path):
  path = tmp_path / "manifest.csv"
  path.write_bytes("image,label\nimages/\xe9t\xe9.png,cat\n".encode("latin-1"))
  with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text"):
    real.build_dataset("csv", str(path), str(tmp_path / "tfds"))


def test_run_config_takes_a_csv_file_and_asks_for_a_bank(data_root, tmp_path):
  from hica_jax import testing  # pylint: disable=g-import-not-at-top
  from hica_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = testing.config("chestxray", "tiny").data
  config.dataset = "csv"
  config.root = os.path.join(data_root["csv"], "manifest.csv")
  with pytest.raises(ValueError, match="set --config.data.bank"):
    pipeline.open_dataset(config, str(tmp_path))
  bank = tmp_path / "bank.json"
  bank.write_text(json.dumps({"categories": {
      "cat": {"sentences": ["a cat"]}, "dog": {"sentences": ["a dog"]}}}))
  config.bank = str(bank)
  handle = pipeline.open_dataset(config, str(tmp_path))
  assert handle.categories == ["cat", "dog"]
  assert sum(sum(c.values()) for c in handle.split_counts().values()) == \
      sum(fx.CSV_COUNTS.values())


# ----------------------------------------------------------------------------
# Errors, CLI, splits.


@pytest.mark.parametrize("name", ["kermany", "busi", "rsna", "csv"])
def test_unrecognised_root_names_the_path(name, tmp_path):
  (tmp_path / "random").mkdir()
  (tmp_path / "random" / "x.png").write_bytes(b"x")
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    real.build_dataset(name, str(tmp_path), str(tmp_path / "out"))


def test_unknown_dataset_and_option(tmp_path, data_root):
  with pytest.raises(ValueError, match="choose one of"):
    real.build_dataset("chexpert", str(tmp_path), str(tmp_path))
  with pytest.raises(TypeError, match="val_fractoin"):
    real.build_dataset("kermany", data_root["kermany"], str(tmp_path),
                       val_fractoin=0.2)


def test_cli_prints_summary(data_root, data_dir, busi):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    data_cli.main(["build", "--dataset", "busi", "--root", data_root["busi"],
                   "--data_dir", data_dir])
  summary = json.loads(out.getvalue())
  assert summary["reused"] and summary["splits"] == busi[1]["splits"]


def test_stratified_group_split_known_answers():
  labels = np.repeat([0, 1], [20, 10])
  groups = [f"g{i}" for i in range(30)]
  fr = {"train": 0.7, "val": 0.15, "test": 0.15}
  s = common.stratified_group_split(labels, groups, fr, seed=0)
  for c, want in ((0, [14, 3, 3]), (1, [7, 2, 1])):
    got = [sum(1 for i in np.flatnonzero(labels == c) if s[i] == n)
           for n in fr]
    assert got == want, (c, got)
  assert s == common.stratified_group_split(labels, groups, fr, seed=0)
  assert s != common.stratified_group_split(labels, groups, fr, seed=1)
  paired = [f"p{i // 2}" for i in range(30)]  # Pairs must stay together.
  s2 = common.stratified_group_split(labels, paired, fr, seed=0)
  assert all(s2[i] == s2[i + 1] for i in range(0, 30, 2))


def test_busi_without_mask_files_says_so(data_root, busi, tmp_path):
  _, summary = busi[:2]
  assert not any("no mask files" in n for n in summary["notes"])
  root = tmp_path / "Dataset_BUSI_with_GT"
  shutil.copytree(data_root["busi"], root)
  for mask in root.rglob("*_mask*"):
    mask.unlink()
  _, bare = real.build_dataset("busi", str(root), str(tmp_path / "tfds"))
  assert any("no mask files found" in n and "either mode" in n
             for n in bare["notes"])
  assert all(s["with_roi"] == 0 for s in bare["splits"].values())
