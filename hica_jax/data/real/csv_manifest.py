"""Any other data set, described by a CSV manifest.

`root` is the CSV file, or a folder holding `manifest.csv` (or exactly one
`.csv`). Columns (case-insensitive; paths relative to the CSV's folder):
- `image` (or image_path, path, file, filename): image or DICOM file, required;
- `label` (or class, category): category name, required;
- `text` (or report): optional report text;
- `mask` (or mask_path): optional mask file (foreground > half its maximum);
- `x, y, w, h` (or width, height): optional ROI box in pixels;
- `phrase`: optional local phrase of the ROI;
- `patient_id` (or patient): optional, keeps a patient's images in one split;
- `split`: optional train / val(idation) / test.
Several rows may name the same image (several masks or boxes: combined by
OR). Categories are the sorted label names unless `categories=[...]` fixes
their order. Without a split column the split is stratified and seeded
(`fractions`); with one, splits it lacks are carved from train
(`val_fraction`, `test_fraction`). With `bank=<name>`, ROIs without a phrase
get one of that bank's phrases of their class.
"""
import collections
import csv
import os

from hica_jax.data.real import common
from hica_jax.data.real import files

_ALIASES = {
    "image": ("image", "image_path", "path", "file", "filename"),
    "label": ("label", "class", "category"),
    "text": ("text", "report"),
    "mask": ("mask", "mask_path"),
    "x": ("x",), "y": ("y",), "w": ("w", "width"), "h": ("h", "height"),
    "phrase": ("phrase",),
    "patient_id": ("patient_id", "patient", "patientid"),
    "split": ("split",),
}
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val",
                "validation": "val", "dev": "val", "test": "test"}


def manifest_path(root):
  """The manifest CSV for `root` (a CSV file or a folder holding one)."""
  root = os.path.abspath(os.fspath(root))
  if os.path.isfile(root):
    return root
  if not os.path.isdir(root):
    raise FileNotFoundError(f"CSV manifest root {root} does not exist.")
  if os.path.isfile(os.path.join(root, "manifest.csv")):
    return os.path.join(root, "manifest.csv")
  found = sorted(f for f in os.listdir(root) if f.lower().endswith(".csv"))
  if len(found) != 1:
    raise FileNotFoundError(
        f"No CSV manifest in {root}: expected manifest.csv or exactly one "
        f".csv file, found {found}. Pass the CSV file itself as root.")
  return os.path.join(root, found[0])


def read_manifest(path):
  """(column map {field: header}, rows as dicts) of the manifest."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      headers = reader.fieldnames or []
      rows = list(reader)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                     "save the manifest as UTF-8.") from None
  except csv.Error as e:
    raise ValueError(f"{path}: not a readable CSV file ({e}).") from None
  lower = {h.strip().lower(): h for h in headers}
  cols = {}
  for field, names in _ALIASES.items():
    for n in names:
      if n in lower:
        cols[field] = lower[n]
        break
  missing = [f for f in ("image", "label") if f not in cols]
  if missing:
    raise ValueError(f"{path}: no {missing} column; columns are {headers}. "
                     f"Name them one of {[_ALIASES[m] for m in missing]}.")
  box = [k for k in ("x", "y", "w", "h") if k in cols]
  if box and len(box) != 4:
    raise ValueError(f"{path}: box columns need all of x, y, w (width), "
                     f"h (height); found only {box}.")
  return cols, rows


class HicaCsv(common.RealBuilder):
  """A data set listed in a CSV manifest."""
  name = "hica_csv"
  DESCRIPTION = __doc__
  OPTIONS = {"categories": None, "bank": None, "fractions": None,
             "val_fraction": 0.15, "test_fraction": 0.15}

  def __init__(self, *, root, **kw):
    self.csv_path = manifest_path(root)
    self.cols, self.rows = read_manifest(self.csv_path)
    super().__init__(root=root, **kw)

  def content_tag(self):
    return files.file_digest(self.csv_path)  # The manifest is the data.

  def categories(self):
    if self.options["categories"]:
      return list(self.options["categories"])
    col = self.cols["label"]
    return sorted({(r.get(col) or "").strip() for r in self.rows} - {""})

  def bank(self):
    if not self.options["bank"]:
      return {"categories": {}}
    from hica_jax.data import descriptors  # pylint: disable=g-import-not-at-top
    return descriptors.load_bank(self.options["bank"])

  def scan(self, log):
    cols, cats = self.cols, self.categories()
    base = os.path.dirname(self.csv_path)
    rel_csv = os.path.basename(self.csv_path)

    def get(row, field):
      return (row.get(cols[field]) or "").strip() if field in cols else ""

    def resolve(p):
      return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))

    mask_files = {resolve(get(r, "mask")) for r in self.rows if get(r, "mask")}
    by_image = collections.OrderedDict()
    for line, row in enumerate(self.rows, start=2):
      where = f"{rel_csv}:{line}"
      image, label = get(row, "image"), get(row, "label")
      if not image:
        log.skip(where, "row without an image path")
        continue
      path = resolve(image)
      if not label:
        log.skip(path, f"empty label ({where})")
        continue
      if label not in cats:
        log.skip(path, f"label {label!r} not in categories {cats} ({where})")
        continue
      split = None
      if "split" in cols:
        split = _SPLIT_NAMES.get(get(row, "split").lower())
        if split is None:
          log.skip(path, f"split {get(row, 'split')!r} is not train, val or "
                   f"test ({where})")
          continue
      box = None
      if "x" in cols and any(get(row, k) for k in ("x", "y", "w", "h")):
        try:
          box = tuple(float(get(row, k)) for k in ("x", "y", "w", "h"))
          if box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"non-positive size {box}")
        except ValueError as e:
          log.skip(path, f"bad box ({where}): {e}")
          continue
      by_image.setdefault(path, []).append(
          dict(label=label, split=split, box=box, where=where,
               mask=resolve(get(row, "mask")) if get(row, "mask") else None,
               text=get(row, "text"), phrase=get(row, "phrase"),
               patient_id=get(row, "patient_id")))

    items = []
    for path, rows in by_image.items():
      labels = {r["label"] for r in rows}
      splits = {r["split"] for r in rows}
      if len(labels) > 1 or len(splits) > 1:
        log.skip(path, f"rows disagree on label {sorted(labels)} or split "
                 f"{sorted(map(str, splits))}")
        continue
      if path in mask_files:
        log.skip(path, "mask file, never read as an image")
        continue
      if not os.path.isfile(path):
        log.skip(path, f"file not found ({rows[0]['where']})")
        continue
      if files.is_junk(os.path.basename(path)):
        log.skip(path, f"OS metadata file ({os.path.basename(path)})")
        continue
      masks = []
      for r in rows:
        if r["mask"] and not os.path.isfile(r["mask"]):
          log.warn(r["mask"], f"mask file not found ({r['where']})")
        elif r["mask"] and r["mask"] not in masks:
          masks.append(r["mask"])
      first = lambda k: next((r[k] for r in rows if r[k]), "")  # pylint: disable=cell-var-from-loop
      items.append(files.Item(
          path=path, id=os.path.relpath(path, base).replace(os.sep, "/"),
          label=cats.index(rows[0]["label"]), split=rows[0]["split"],
          patient_id=first("patient_id"), text=first("text"),
          phrase=first("phrase"), mask_paths=tuple(masks),
          boxes=tuple(r["box"] for r in rows if r["box"])))
    return items

  def split_items(self, items, log):
    if "split" not in self.cols:
      return super().split_items(items, log)
    present = {it.split for it in items}
    carve = {s: self.options[f"{s}_fraction"]
             for s in ("val", "test") if s not in present}
    if not carve:
      return
    log.note(f"split(s) {sorted(carve)} not in the manifest: carved from "
             f"train with fractions {carve}")
    pool = [it for it in items if it.split == "train"]
    fractions = {"train": 1.0 - sum(carve.values()), **carve}
    for it, s in zip(pool, common.stratified_group_split(
        [it.label for it in pool], common.group_keys(pool), fractions,
        self.seed)):
      it.split = s
