"""Chest X-Ray Images (Pneumonia), Kermany et al. 2018.

On disk: `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`, sometimes
nested twice (`chest_xray/chest_xray`) and with `__MACOSX`. Pneumonia file
names say `bacteria` or `virus` (the 3-class task); names carry a patient id:
`person123_bacteria_456.jpeg` -> `person123`, `IM-0115-0001.jpeg` ->
`IM-0115`, `NORMAL2-IM-0927-0001.jpeg` -> `NORMAL2-IM-0927`.

Splits (choice): the official test split is kept as is, so results compare
with the literature. The official val split (16 images) is too small to
select anything with, so it is folded into train and validation is carved
from that pool (fraction `val_fraction`, stratified, patient-grouped,
seeded). Pool images of a patient who is also in the official test split are
dropped (listed as skipped) so that no patient is in two splits. With
`official_test=False` all images are re-split (`fractions`).
"""
import os
import re

from hica_jax.data.real import common
from hica_jax.data.real import files

_PERSON_RE = re.compile(r"^(person\d+)_", re.IGNORECASE)
_NORMAL_RE = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)
_SPLIT_DIRS = {"train": "train", "val": "val", "test": "test"}


def patient_id(filename):
  """Patient id from a Kermany file name, "" when the name has none."""
  stem = os.path.splitext(filename)[0]
  m = _PERSON_RE.match(stem) or _NORMAL_RE.match(stem)
  return m.group(1) if m else ""


def _is_layout(path):
  sub = files.child_dirs(path)
  return all(s in sub and {"normal", "pneumonia"} <= set(
      files.child_dirs(sub[s])) for s in ("train", "test"))


class HicaKermany(common.RealBuilder):
  """Kermany chest X-ray, normal vs pneumonia."""
  name = "hica_kermany"
  CATEGORIES = ("normal", "pneumonia")
  DESCRIPTION = __doc__
  OPTIONS = {"val_fraction": 0.1, "official_test": True, "fractions": None}

  def label_of(self, folder, filename):
    """Label index, or a reason string when the file cannot be labelled."""
    del filename
    return self.CATEGORIES.index(folder)

  def scan(self, log):
    base = files.pick_layout_root(
        self.root, _is_layout,
        "Kermany layout (train/ and test/ folders holding NORMAL/ and "
        "PNEUMONIA/)", log)
    splits = files.child_dirs(base)
    items = []
    for split_dir, official in (("train", "train"), ("val", "val"),
                                ("test", "test")):
      if split_dir not in splits:
        log.note(f"no official {split_dir}/ folder")
        continue
      for path in files.list_files(splits[split_dir], log):
        rel = os.path.relpath(path, splits[split_dir])
        parts = rel.split(os.sep)
        fname = parts[-1]
        folder = parts[0].lower() if len(parts) > 1 else ""
        ext = os.path.splitext(fname)[1].lower()
        if folder not in ("normal", "pneumonia") or len(parts) != 2:
          log.skip(path, "outside the NORMAL/ and PNEUMONIA/ folders")
        elif ext not in files.IMAGE_EXTS:
          log.skip(path, f"not an image file (extension {ext or 'none'})")
        elif files.is_mask_name(fname):
          log.skip(path, "mask file, never read as an image")
        else:
          label = self.label_of(folder, fname)
          if isinstance(label, str):
            log.skip(path, label)
            continue
          items.append(files.Item(
              path=path, id=os.path.relpath(path, base).replace(os.sep, "/"),
              label=label, patient_id=patient_id(fname), split=official))
    return items

  def split_items(self, items, log):
    if not self.options["official_test"]:
      for it in items:
        it.split = None
      return super().split_items(items, log)
    n_val = sum(it.split == "val" for it in items)
    log.note(f"official val split ({n_val} images) folded into train; "
             f"validation carved from train (fraction "
             f"{self.options['val_fraction']}, patient-grouped)")
    test = [it for it in items if it.split == "test"]
    test_patients = {it.patient_id for it in test if it.patient_id}
    pool, leaked = [], []
    for it in items:
      if it.split == "test":
        continue
      (leaked if it.patient_id in test_patients else pool).append(it)
    for it in leaked:
      log.skip(it.path, f"patient {it.patient_id} is also in the official "
               "test split: dropped from train so no patient is in two "
               "splits")
    items[:] = test + pool
    v = float(self.options["val_fraction"])
    splits = common.stratified_group_split(
        [it.label for it in pool], common.group_keys(pool),
        {"train": 1.0 - v, "val": v}, self.seed)
    for it, s in zip(pool, splits):
      it.split = s
    items.sort(key=lambda it: it.id)


class HicaKermany3(HicaKermany):
  """Kermany chest X-ray, normal vs bacterial vs viral pneumonia."""
  name = "hica_kermany3"
  CATEGORIES = ("normal", "bacterial_pneumonia", "viral_pneumonia")

  def label_of(self, folder, filename):
    if folder == "normal":
      return 0
    low = filename.lower()
    if "bacteria" in low and "virus" not in low:
      return 1
    if "virus" in low and "bacteria" not in low:
      return 2
    return "pneumonia file name says neither 'bacteria' nor 'virus'"
