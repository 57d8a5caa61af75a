"""Tiny copies of the real data sets in their exact on-disk layouts, with
every known defect. Each writer returns the folder to pass as root; the
module constants say what a correct build must find.
"""
import io
import os
import shutil
import zlib

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------
# Images.


def _rng(name):
  return np.random.default_rng(zlib.crc32(name.encode()))


def _gray(name, shape=(16, 16)):
  """Distinct noise image per name (so no accidental duplicates)."""
  return _rng(name).integers(0, 256, shape, dtype=np.uint8)


def write_image(path, array=None, fmt=None, name=None, shape=(16, 16), **save):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if array is None:
    array = _gray(name or os.path.basename(path), shape)
  Image.fromarray(array).save(path, format=fmt, **save)
  return path


def write_truncated_jpeg(path):
  buf = io.BytesIO()
  Image.fromarray(_gray(path, (64, 64))).save(buf, format="JPEG")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])


def write_bytes(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def exif_rotated_jpeg(path):
  """16 wide x 8 high, left half white, EXIF orientation 6 (rotate 90 CW to
  display): displayed it is 8 wide x 16 high with the white half on top."""
  a = np.zeros((8, 16), np.uint8)
  a[:, :8] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  write_image(path, a, fmt="JPEG", exif=exif.tobytes(), quality=95)


def gradient16_png(path):
  """16-bit grayscale PNG, 12-bit values (0..4000) rising left to right."""
  a = np.tile(np.linspace(0, 4000, 16).astype(np.uint16), (16, 1))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(a).save(path, format="PNG")
  assert Image.open(path).mode.startswith("I;16")


def rgba_png(path):
  """RGB noise, top half opaque, bottom half fully transparent."""
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., :3] = 200
  rgba[:8, :, 3] = 255
  write_image(path, rgba, fmt="PNG")


def rgb_jpeg(path):
  a = np.stack([_gray(path + c) for c in "rgb"], axis=-1)
  write_image(path, a, fmt="JPEG")


def junk(folder):
  write_bytes(os.path.join(folder, ".DS_Store"), b"\x00\x00\x00\x01Bud1")
  write_bytes(os.path.join(folder, "Thumbs.db"), b"\xd0\xcf\x11\xe0")


# ----------------------------------------------------------------------------
# Kermany: chest_xray/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}.

KERMANY_TRAIN_NORMAL = [  # valid images
    "IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "IM-0002-0001.jpeg",
    "IM-0003-0001.jpeg", "NORMAL2-IM-0004-0001.jpeg",
    "NORMAL2-IM-0005-0001.jpeg", "IM-0006-0001.jpeg",  # RGB
    "IM-0007-0001.png",  # 16-bit
    "IM-0008-0001.jpeg",  # EXIF rotated
]
KERMANY_TRAIN_PNEUMONIA = [
    "person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg",
    "person2_virus_3.jpeg", "person3_bacteria_4.jpeg", "person4_virus_5.jpeg",
    "person5_bacteria_6.jpeg", "person6_virus_7.jpeg",
    "person7_bacteria_8.jpeg", "person8_virus_9.jpeg",
    "person9_bacteria_10.jpeg",  # patient 9 is also in test: dropped
    "person10_12.jpeg",  # neither bacteria nor virus: skipped in 3-class
    "person11_bacteria_13.png",  # RGBA
]
KERMANY_VAL = {"NORMAL": ["NORMAL2-IM-0100-0001.jpeg",
                          "NORMAL2-IM-0101-0001.jpeg"],
               "PNEUMONIA": ["person100_bacteria_100.jpeg",
                             "person101_virus_101.jpeg"]}
KERMANY_TEST = {"NORMAL": ["IM-0200-0001.jpeg", "IM-0201-0001.jpeg",
                           "IM-0202-0001.jpeg"],  # a copy of IM-0002-0001
                "PNEUMONIA": ["person9_bacteria_20.jpeg",
                              "person200_virus_21.jpeg",
                              "person201_bacteria_22.jpeg",
                              "person202_virus_23.jpeg"]}
# Expected build (2-class, official test kept):
KERMANY_POOL = {"normal": 9 + 2, "pneumonia": 11 + 2}  # train + val folders
KERMANY_TEST_COUNTS = {"normal": 3, "pneumonia": 4}
KERMANY3_POOL = {"normal": 11, "bacterial_pneumonia": 7,
                 "viral_pneumonia": 5}
KERMANY3_TEST_COUNTS = {"normal": 3, "bacterial_pneumonia": 2,
                        "viral_pneumonia": 2}
KERMANY_SKIPPED = {  # path suffix -> reason start
    "train/NORMAL/IM-0009-0001.jpeg": "corrupt or truncated image",
    "train/NORMAL/Thumbs.db": "OS metadata file",
    "train/NORMAL/notes.txt": "not an image file",
    "train/PNEUMONIA/empty.jpeg": "corrupt or truncated image",
    "train/PNEUMONIA/person9_bacteria_10.jpeg": "patient person9",
    "train/readme.txt": "outside the NORMAL/ and PNEUMONIA/ folders",
    "test/PNEUMONIA/.DS_Store": "OS metadata file",
}
KERMANY_DUPLICATE = ("train/NORMAL/IM-0002-0001.jpeg",
                     "test/NORMAL/IM-0202-0001.jpeg")


def write_kermany(base):
  """Kaggle-style copy: nested twice, __MACOSX, junk, every defect."""
  root = os.path.join(base, "kermany_download")
  top = os.path.join(root, "chest_xray")
  d = os.path.join(top, "chest_xray")
  junk(top)
  write_bytes(os.path.join(top, "__MACOSX", "chest_xray", "train", "NORMAL",
                           "._IM-0001-0001.jpeg"), b"\x00\x05\x16\x07")
  tn = os.path.join(d, "train", "NORMAL")
  tp = os.path.join(d, "train", "PNEUMONIA")
  for f in KERMANY_TRAIN_NORMAL[:6]:
    write_image(os.path.join(tn, f), fmt="JPEG",
                shape=(16, 16) if "0003" not in f else (20, 12))
  rgb_jpeg(os.path.join(tn, "IM-0006-0001.jpeg"))
  gradient16_png(os.path.join(tn, "IM-0007-0001.png"))
  exif_rotated_jpeg(os.path.join(tn, "IM-0008-0001.jpeg"))
  write_truncated_jpeg(os.path.join(tn, "IM-0009-0001.jpeg"))
  write_bytes(os.path.join(tn, "Thumbs.db"), b"\xd0\xcf\x11\xe0")
  write_bytes(os.path.join(tn, "notes.txt"), b"not an image")
  for f in KERMANY_TRAIN_PNEUMONIA[:-1]:
    write_image(os.path.join(tp, f), fmt="JPEG")
  rgba_png(os.path.join(tp, "person11_bacteria_13.png"))
  write_bytes(os.path.join(tp, "empty.jpeg"), b"")
  write_bytes(os.path.join(d, "train", "readme.txt"), b"hello")
  for split, folders in (("val", KERMANY_VAL), ("test", KERMANY_TEST)):
    for cls, files in folders.items():
      for f in files:
        write_image(os.path.join(d, split, cls, f), fmt="JPEG")
  shutil.copy(os.path.join(tn, "IM-0002-0001.jpeg"),
              os.path.join(d, "test", "NORMAL", "IM-0202-0001.jpeg"))
  write_bytes(os.path.join(d, "test", "PNEUMONIA", ".DS_Store"), b"\x00")
  return root


# ----------------------------------------------------------------------------
# BUSI: Dataset_BUSI_with_GT/{benign,malignant,normal}/"<class> (i).png".

BUSI_COUNTS = {"benign": 7, "malignant": 7, "normal": 6}
BUSI_SKIPPED = {
    "benign/benign (8)_mask.png": "mask without an image",
    "benign/benign (9).png": "corrupt or truncated image",
    "benign/.DS_Store": "OS metadata file",
    "normal/Thumbs.db": "OS metadata file",
    "malignant/readme.txt": "not an image file",
}
BUSI_MASK_FILES = 6 + 1 + 7 + 2 + 6  # benign(+1 extra), malignant(+2), normal


def _quadrant(shape, top, left):
  m = np.zeros(shape, np.uint8)
  h, w = shape[0] // 2, shape[1] // 2
  m[(0 if top else h):(h if top else None), (0 if left else w):
    (w if left else None)] = 255
  return m


def write_busi(base):
  root = os.path.join(base, "busi_download")
  d = os.path.join(root, "Dataset_BUSI_with_GT")
  write_bytes(os.path.join(root, "__MACOSX", "Dataset_BUSI_with_GT",
                           "benign", "._benign (1).png"), b"\x00\x05")
  for cls, n in (("benign", 7), ("malignant", 6), ("normal", 6)):
    for i in range(1, n + 1):
      shape = (16, 16) if i % 2 else (12, 20)
      img = os.path.join(d, cls, f"{cls} ({i}).png")
      rgb = np.stack([_gray(f"{cls}{i}", shape)] * 3, axis=-1)
      write_image(img, rgb, fmt="PNG")
      if cls == "benign" and i == 7:
        continue  # An image without a mask.
      mask = (np.zeros(shape, np.uint8) if cls == "normal"
              else _quadrant(shape, True, True))
      write_image(img[:-4] + "_mask.png", mask, fmt="PNG")
  # Several masks: OR of the top-left and bottom-right quadrants.
  write_image(os.path.join(d, "benign", "benign (1)_mask_1.png"),
              _quadrant((16, 16), False, False), fmt="PNG")
  for k, (top, left) in ((1, (True, False)), (2, (False, True))):
    write_image(os.path.join(d, "malignant", f"malignant (3)_mask_{k}.png"),
                _quadrant((16, 16), top, left), fmt="PNG")
  # An exact copy of malignant (1) under another name: same split.
  shutil.copy(os.path.join(d, "malignant", "malignant (1).png"),
              os.path.join(d, "malignant", "malignant (7).png"))
  shutil.copy(os.path.join(d, "malignant", "malignant (1)_mask.png"),
              os.path.join(d, "malignant", "malignant (7)_mask.png"))
  write_image(os.path.join(d, "benign", "benign (8)_mask.png"),
              _quadrant((16, 16), True, True), fmt="PNG")
  write_bytes(os.path.join(d, "benign", "benign (9).png"),
              b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
  write_bytes(os.path.join(d, "benign", ".DS_Store"), b"\x00")
  write_bytes(os.path.join(d, "normal", "Thumbs.db"), b"\x00")
  write_bytes(os.path.join(d, "malignant", "readme.txt"), b"x")
  return root


# A BUSI folder with images larger than a stored bound of 32 px: a
# 96 x 128 (h x w) benign image with a bright lesion and its mask, a 128 x 64
# malignant one, and 16 x 16 noise images elsewhere (7 per class: 5/1/1).
BIG_LESION = (slice(24, 48), slice(64, 96))  # rows, columns of the mask
BIG_IMAGES = {"benign/benign (1).png": (96, 128),
              "malignant/malignant (1).png": (128, 64)}


STRIPES = (slice(64, 96), slice(0, 48))  # 1-pixel 0/100 columns there


def big_image(shape, lesion=None):
  """uint8[H, W]: a gradient, plus 150 inside `lesion`, with STRIPES
  replaced by columns alternating 0 and 100 (detail finer than any
  downsampled pixel: antialiasing turns it to ~50, decimation does not)."""
  h, w = shape
  a = np.add.outer(np.linspace(0, 60, h), np.linspace(0, 40, w))
  if lesion is not None:
    a[lesion] += 150
  if h >= 96 and w >= 48:
    a[STRIPES] = 100 * (np.arange(48) % 2)
  return np.round(a).astype(np.uint8)


def write_busi_sizes(base):
  d = os.path.join(base, "busi_sizes", "Dataset_BUSI_with_GT")
  for cls in ("benign", "malignant", "normal"):
    for i in range(1, 8):
      rel = f"{cls}/{cls} ({i}).png"
      path = os.path.join(d, rel)
      if rel in BIG_IMAGES:
        shape = BIG_IMAGES[rel]
        lesion = BIG_LESION if cls == "benign" else None
        write_image(path, big_image(shape, lesion), fmt="PNG")
        mask = np.zeros(shape, np.uint8)
        mask[lesion or (slice(0, 8), slice(0, 8))] = 255
        write_image(path[:-4] + "_mask.png", mask, fmt="PNG")
      else:
        write_image(path, fmt="PNG")
  return os.path.dirname(d)


# ----------------------------------------------------------------------------
# RSNA: stage_2_train_labels.csv + stage_2_train_images/<patientId>.dcm.

RSNA_BOXES = {  # patientId -> boxes (x, y, w, h) on 16 x 16 images
    "p00": [(1, 1, 4, 4), (8, 8, 5, 3)],
    "p01": [(12, 12, 10, 10)],  # runs off the image: clipped to 4 x 4
    "p02": [(2, 3, 6, 6)],
    "p03": [(0, 0, 16, 2)],  # 16-bit MONOCHROME1
    "p04": [(5, 5, 2, 2)],
}
RSNA_NEGATIVE = ["p05", "p06", "p07", "p08", "p09", "p10", "p11"]
RSNA_SKIPPED = {
    "stage_2_train_images/p12.dcm": "in the labels CSV but the DICOM file",
    "stage_2_train_images/p13.dcm": "no row in the labels CSV",
    "stage_2_train_images/p14.dcm": "unreadable DICOM",
    "stage_2_train_labels.csv:": "bad label row",
}


def write_dicom(path, pixels, photometric="MONOCHROME2", patient="p"):
  from pydicom.dataset import Dataset, FileMetaDataset  # pylint: disable=g-import-not-at-top,g-multiple-import
  from pydicom.uid import (ExplicitVRLittleEndian, SecondaryCaptureImageStorage,  # pylint: disable=g-import-not-at-top,g-multiple-import
                           generate_uid)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.PatientID = patient
  ds.Modality = "CR"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  bits = 8 if pixels.dtype == np.uint8 else 16
  ds.BitsAllocated = bits
  ds.BitsStored = 8 if bits == 8 else 12
  ds.HighBit = ds.BitsStored - 1
  ds.PixelRepresentation = 0
  ds.PixelData = pixels.tobytes()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def write_rsna(base):
  root = os.path.join(base, "rsna_download")
  imgs = os.path.join(root, "stage_2_train_images")
  rows = ["patientId,x,y,width,height,Target"]
  for pid, boxes in RSNA_BOXES.items():
    rows += [f"{pid},{x},{y},{w},{h},1" for x, y, w, h in boxes]
  rows += [f"{pid},,,,,0" for pid in RSNA_NEGATIVE + ["p12", "p14"]]
  rows.append("p15,abc,1,2,3,1")
  write_bytes(os.path.join(root, "stage_2_train_labels.csv"),
              ("\n".join(rows) + "\n").encode())
  write_bytes(os.path.join(root, "stage_2_detailed_class_info.csv"),
              b"patientId,class\n")
  for pid in list(RSNA_BOXES) + RSNA_NEGATIVE + ["p13"]:
    if pid == "p03":
      ramp = np.tile(np.linspace(0, 4000, 16).astype(np.uint16), (16, 1))
      write_dicom(os.path.join(imgs, f"{pid}.dcm"), ramp, "MONOCHROME1", pid)
    else:
      write_dicom(os.path.join(imgs, f"{pid}.dcm"), _gray(pid), patient=pid)
  write_bytes(os.path.join(imgs, "p14.dcm"), b"DICM" + bytes(300))
  write_dicom(os.path.join(root, "stage_2_test_images", "t1.dcm"),
              _gray("t1"), patient="t1")
  junk(imgs)
  return root


# ----------------------------------------------------------------------------
# CSV manifest.

CSV_COUNTS = {"cat": 6, "dog": 6}


def write_csv(base, with_split=False):
  root = os.path.join(base, "csv_split" if with_split else "csv_data")
  for name in [f"a{i}" for i in range(1, 7)] + [f"b{i}" for i in range(1, 7)]:
    write_image(os.path.join(root, "images", f"{name}.png"), fmt="PNG")
  write_image(os.path.join(root, "masks", "a1_m.png"),
              _quadrant((16, 16), False, False), fmt="PNG")
  header = "image,label,text,mask,x,y,w,h,patient_id,phrase"
  rows = [
      "images/a1.png,cat,report of a1,masks/a1_m.png,,,,,,left ear",
      "images/a1.png,cat,,,0,0,4,4,,",  # a second ROI of a1
      "images/a2.png,cat,,,2,2,3,3,,",
  ]
  rows += [f"images/a{i}.png,cat,,,,,,,," for i in range(3, 7)]
  rows += ["images/b1.png,dog,,,,,,,P1,", "images/b2.png,dog,,,,,,,P1,"]
  rows += [f"images/b{i}.png,dog,,,,,,,," for i in range(3, 7)]
  rows += ["images/missing.png,dog,,,,,,,,", "images/a3.png,,,,,,,,,",
           "masks/a1_m.png,cat,,,,,,,,"]
  if with_split:
    header += ",split"
    splits = {"a1": "train", "a2": "train", "a3": "train", "a4": "train",
              "a5": "test", "a6": "test", "b1": "train", "b2": "train",
              "b3": "train", "b4": "train", "b5": "test", "b6": "test"}
    rows = [r + "," + next((s for k, s in splits.items()
                            if f"/{k}.png" in r), "train") for r in rows]
  write_bytes(os.path.join(root, "manifest.csv"),
              ("\n".join([header] + rows) + "\n").encode())
  return root
