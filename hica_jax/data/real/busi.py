"""BUSI: Breast Ultrasound Images with ground-truth masks (Al-Dhabyani 2020).

On disk: `Dataset_BUSI_with_GT/{benign,malignant,normal}/"<class> (i).png"`
with masks `"<class> (i)_mask.png"` and, for some images, `_mask_1.png`,
`_mask_2.png`: all masks of an image are combined by pixel-wise OR into the
ROI mask. Mask files are never read as images. Normal images have empty
masks. There is no official split: train/validation/test are stratified and
seeded (`fractions`, default 0.55/0.10/0.35); identical images are kept in
one split. The test fraction is above the usual 0.15 because BUSI is small:
at 0.15 the 520 images of a public copy leave 78 test images and one
support seed's balanced accuracy moves by about 0.05. The local
phrase of an ROI is drawn deterministically (by file id) from the `busi`
descriptor bank's phrases of the class.
"""
import collections
import os

from hica_jax.data.real import common
from hica_jax.data.real import files


def _is_layout(path):
  return len({"benign", "malignant", "normal"} &
             set(files.child_dirs(path))) >= 2


class HicaBusi(common.RealBuilder):
  """BUSI with masks: benign, malignant, normal."""
  name = "hica_busi"
  CATEGORIES = ("benign", "malignant", "normal")
  DESCRIPTION = __doc__
  BANK = "busi"
  OPTIONS = {"fractions": None}
  DEFAULT_FRACTIONS = {"train": 0.55, "val": 0.10, "test": 0.35}

  def scan(self, log):
    base = files.pick_layout_root(
        self.root, _is_layout,
        "BUSI layout (folders benign/, malignant/, normal/)", log)
    folders = files.child_dirs(base)
    items = []
    for label, cat in enumerate(self.CATEGORIES):
      if cat not in folders:
        log.note(f"no {cat}/ folder")
        continue
      images, masks = {}, collections.defaultdict(list)
      for path in files.list_files(folders[cat], log):
        fname = os.path.basename(path)
        stem, ext = os.path.splitext(fname)
        if ext.lower() not in files.IMAGE_EXTS:
          log.skip(path, f"not an image file (extension {ext or 'none'})")
          continue
        key = (os.path.dirname(path), stem)
        m = files.MASK_RE.match(stem)
        if m:
          masks[(os.path.dirname(path), m.group("base"))].append(path)
        elif key in images:
          log.skip(path, f"second file for image {stem} "
                   f"(kept {os.path.basename(images[key])})")
        else:
          images[key] = path
      for key, paths in sorted(masks.items()):
        if key not in images:
          for p in paths:
            log.skip(p, "mask without an image")
      for key, path in sorted(images.items()):
        items.append(files.Item(
            path=path, id=os.path.relpath(path, base).replace(os.sep, "/"),
            label=label, mask_paths=tuple(sorted(masks.get(key, ()))),
            expect_roi=cat != "normal"))
    if items and not any(it.mask_paths for it in items):
      # Public copies of BUSI without the *_mask.png files exist.
      # Local phrases come with ROIs, so 'attention' has none either.
      log.note("no mask files found: every ROI mask is empty and no image "
               "has a local phrase, so stage 2's local term (either mode) "
               "has nothing to align")
    return items
