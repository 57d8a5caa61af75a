"""RSNA Pneumonia Detection Challenge (2018).

On disk: `stage_2_train_images/<patientId>.dcm` (or stage_1) and
`stage_2_train_labels.csv` with rows `patientId,x,y,width,height,Target`:
one row per box for Target 1 (several boxes per patient), one row with empty
coordinates for Target 0. Boxes (pixels of the DICOM) are rasterised into the
ROI mask. Classes: `no_pneumonia` (Target 0: normal or other findings) and
`pneumonia` (lung opacity). One image per patient, so the stratified seeded
split is patient-level; the unlabelled test images are ignored.
"""
import collections
import csv
import glob
import os

from hica_jax.data.real import common
from hica_jax.data.real import files

_LABEL_GLOB = "stage_*_train_labels.csv"


def _labels_csv(path):
  found = sorted(glob.glob(os.path.join(path, _LABEL_GLOB)))
  return found[-1] if found else None  # stage_2 supersedes stage_1.


def _images_dir(path, csv_path):
  stage = os.path.basename(csv_path).split("_train_labels")[0]
  d = os.path.join(path, f"{stage}_train_images")
  return d if os.path.isdir(d) else None


def _is_layout(path):
  c = _labels_csv(path)
  return c is not None and _images_dir(path, c) is not None


def read_labels(csv_path, log):
  """{patientId: (target, [(x, y, w, h), ...])} from the labels CSV."""
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      fieldnames = reader.fieldnames
  except UnicodeDecodeError as e:
    raise ValueError(f"{csv_path}: not UTF-8 text (byte {e.start}: "
                     f"{e.reason}); save the labels CSV as UTF-8.") from None
  out = {}
  need = {"patientId", "x", "y", "width", "height", "Target"}
  if not fieldnames or not need <= set(fieldnames):
    raise ValueError(f"{csv_path}: expected columns {sorted(need)}, found "
                     f"{fieldnames}.")
  for line, row in enumerate(rows, start=2):
    pid = (row["patientId"] or "").strip()
    try:
      target = int(float(row["Target"]))
      box = None
      if target == 1:
        box = tuple(float(row[k]) for k in ("x", "y", "width", "height"))
        if box[2] <= 0 or box[3] <= 0:
          raise ValueError(f"box of non-positive size {box}")
      elif target != 0:
        raise ValueError(f"Target {target} is neither 0 nor 1")
      if not pid:
        raise ValueError("empty patientId")
    except (TypeError, ValueError) as e:
      log.skip(f"{csv_path}:{line}", f"bad label row: {e}")
      continue
    prev_target, boxes = out.get(pid, (target, []))
    if prev_target != target:
      log.warn(f"{csv_path}:{line}",
               f"patient {pid} has rows with Target 0 and 1: labelled 1")
      target = 1
    out[pid] = (target, boxes + ([box] if box else []))
  return out


class HicaRsna(common.RealBuilder):
  """RSNA pneumonia detection: no_pneumonia vs pneumonia, boxes as ROIs."""
  name = "hica_rsna"
  CATEGORIES = ("no_pneumonia", "pneumonia")
  DESCRIPTION = __doc__
  BANK = "rsna"
  OPTIONS = {"fractions": None}

  def scan(self, log):
    base = files.pick_layout_root(
        self.root, _is_layout,
        "RSNA layout (stage_2_train_labels.csv beside stage_2_train_images/)",
        log)
    csv_path = _labels_csv(base)
    images_dir = _images_dir(base, csv_path)
    labels = read_labels(csv_path, log)
    for d in sorted(glob.glob(os.path.join(base, "stage_*_test_images"))):
      log.note(f"ignored unlabelled test images {log.rel(d)} "
                f"({len(os.listdir(d))} files)")
    found = collections.OrderedDict()
    for path in files.list_files(images_dir, log):
      stem, ext = os.path.splitext(os.path.basename(path))
      if ext.lower() not in (".dcm", ".dicom"):
        log.skip(path, f"not a DICOM file (extension {ext or 'none'})")
      elif stem not in labels:
        log.skip(path, "no row in the labels CSV")
      else:
        found[stem] = path
    for pid in sorted(set(labels) - set(found)):
      log.skip(os.path.join(images_dir, pid + ".dcm"),
               "in the labels CSV but the DICOM file is missing")
    items = []
    for pid, path in found.items():
      target, boxes = labels[pid]
      items.append(files.Item(
          path=path, id=os.path.relpath(path, base).replace(os.sep, "/"),
          label=target, patient_id=pid, boxes=tuple(boxes),
          expect_roi=target == 1))
    return items
