"""Shared machinery of the real data set builders.

A builder only says where the images of its layout are (a list of `Item`s,
with official splits where the data set has them). Everything else is done
here, once for every data set: walking folders past the known junk, decoding
any image to 8-bit RGB, combining masks and boxes into one ROI mask, hashing
for duplicates, patient-grouped stratified splits, the tfds builder and the
JSON summary of the build.
"""
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from PIL import ImageOps

from hica_jax.data import schema

SPLITS = ("train", "val", "test")  # As the synthetic builders name them.
SUMMARY_FILE = "build_summary.json"
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff",
                        ".gif", ".webp", ".dcm", ".dicom"})
JUNK_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "icon\r"})
MASK_RE = re.compile(r"^(?P<base>.*)_mask(?:_\d+)?$", re.IGNORECASE)
_EXIF_ORIENTATION = 0x0112
_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class BadImage(Exception):
  """An image (or DICOM) that cannot be decoded; the build skips it."""


@dataclasses.dataclass
class Item:
  """One image of a data set, as found on disk.

  `id` is its path relative to the layout root (unique; also the tfds key).
  `split` is the official split, None where the data set has none.
  `mask_paths` are OR-ed and `boxes` (x, y, w, h in pixels) rasterised into
  one ROI mask. The probe fills `hash`, `shape`, `mode`, `roi`.
  """
  path: str
  id: str
  label: int
  patient_id: str = ""
  split: str = None
  text: str = ""
  phrase: str = ""
  mask_paths: tuple = ()
  boxes: tuple = ()
  expect_roi: bool = False  # The class has ROIs (warn when none is found).
  hash: str = ""
  shape: tuple = ()
  mode: str = ""
  exif_rotated: bool = False
  roi: bool = False


class BuildLog:
  """What a build skipped, ignored or repaired, with paths relative to root."""

  def __init__(self, root):
    self.root = root
    self.skipped = []
    self.notes = []
    self.warnings = []

  def rel(self, path):
    try:
      return os.path.relpath(path, self.root)
    except ValueError:  # Another drive on Windows.
      return str(path)

  def skip(self, path, reason):
    self.skipped.append({"path": self.rel(path), "reason": reason})

  def note(self, message):
    if message not in self.notes:
      self.notes.append(message)

  def warn(self, path, message):
    self.warnings.append({"path": self.rel(path), "warning": message})


# ----------------------------------------------------------------------------
# Folders.


def is_junk(name):
  """OS metadata files that are never data (Finder, Explorer, AppleDouble)."""
  return name.lower() in JUNK_FILES or name.startswith("._")


def is_mask_name(filename):
  return MASK_RE.match(os.path.splitext(filename)[0]) is not None


def list_files(folder, log):
  """Sorted paths of the data files under `folder` (recursive).

  `__MACOSX` and hidden folders are ignored (one note each, with the number
  of files they hold); OS junk files are logged as skipped.
  """
  out = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    for d in list(dirnames):
      if d == "__MACOSX" or d.startswith("."):
        n = sum(len(f) for _, _, f in os.walk(os.path.join(dirpath, d)))
        log.note(f"ignored folder {log.rel(os.path.join(dirpath, d))} "
                 f"({n} files of OS metadata)")
        dirnames.remove(d)
    for f in sorted(filenames):
      p = os.path.join(dirpath, f)
      if is_junk(f):
        log.skip(p, f"OS metadata file ({f})")
      else:
        out.append(p)
  return out


def find_layout_roots(root, is_layout, max_depth=4):
  """(layout folders, skipped metadata folders) at or below `root`, breadth
  first so the shallowest layout comes first. `__MACOSX` and hidden folders
  are never entered; a layout's own sub-folders are searched too, so that a
  second copy nested inside it (`chest_xray/chest_xray`) is seen."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Data set root {root} does not exist or is not "
                            "a folder.")
  found, skipped, frontier = [], [], collections.deque([(root, 0)])
  while frontier:
    path, depth = frontier.popleft()
    if is_layout(path):
      found.append(path)
    if depth >= max_depth:
      continue
    try:
      children = sorted(os.listdir(path))
    except OSError:
      continue
    for c in children:
      p = os.path.join(path, c)
      if not os.path.isdir(p):
        continue
      if c == "__MACOSX" or c.startswith("."):
        skipped.append(p)
      else:
        frontier.append((p, depth + 1))
  return found, skipped


def pick_layout_root(root, is_layout, what, log):
  """The shallowest layout folder under `root`; clear error when none.

  Copies nested deeper (e.g. `chest_xray/chest_xray`) and `__MACOSX`
  folders are noted and ignored.
  """
  found, skipped = find_layout_roots(root, is_layout)
  for p in skipped:
    n = sum(len(f) for _, _, f in os.walk(p))
    log.note(f"ignored folder {log.rel(p)} ({n} files of OS metadata)")
  if not found:
    listing = sorted(os.listdir(root))[:20]
    raise FileNotFoundError(
        f"No {what} found under {os.path.abspath(root)} (searched 4 levels "
        f"deep; the top level holds {listing}). Point the root at the data "
        "set folder as downloaded.")
  chosen = found[0]
  if os.path.abspath(chosen) != os.path.abspath(root):
    log.note(f"layout found in nested folder {log.rel(chosen)}")
  for other in found[1:]:
    log.note(f"ignored another copy of the layout at {log.rel(other)}")
  return chosen


def folder_fingerprint(root):
  """Hash of every file under `root` (relative name, size, modification
  time), without reading contents: a build is reused only while the folder
  is unchanged. A file root (a CSV manifest) hashes that file's stat."""
  root = os.path.abspath(os.fspath(root))
  h = hashlib.sha1()
  if os.path.isfile(root):
    st = os.stat(root)
    h.update(f"{os.path.basename(root)}\0{st.st_size}\0{st.st_mtime_ns}\n"
             .encode())
    return h.hexdigest()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      p = os.path.join(dirpath, f)
      try:
        st = os.stat(p)
      except OSError:  # A dangling link or a file deleted meanwhile.
        continue
      rel = os.path.relpath(p, root)
      h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
          "utf-8", "surrogateescape"))
  return h.hexdigest()


def child_dirs(path):
  """{lower-case name: path} of the sub-folders of `path`."""
  try:
    names = os.listdir(path)
  except OSError:
    return {}
  return {n.lower(): os.path.join(path, n) for n in names
          if os.path.isdir(os.path.join(path, n))}


# ----------------------------------------------------------------------------
# Decoding.


def to_uint8(a):
  """8-bit image from any integer or float array.

  uint8 stays as is; anything else (16-bit PNG or TIFF, DICOM) is rescaled
  min-max per image, because medical 16-bit data rarely fill the 16-bit range
  (12-bit detectors) and a fixed /257 would leave them almost black.
  """
  if a.dtype == np.uint8:
    return a
  a = a.astype(np.float64)
  lo, hi = float(a.min()), float(a.max())
  if hi <= lo:
    return np.zeros(a.shape, np.uint8)
  return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def gray_to_rgb(a):
  """uint8[H, W] or [H, W, 1|3] -> uint8[H, W, 3]."""
  if a.ndim == 2:
    a = a[..., None]
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  return np.ascontiguousarray(a)


def read_pil(path):
  """uint8[H, W, 3] RGB from any Pillow image, EXIF orientation applied.

  Returns (rgb, mode, exif_rotated). Alpha is composited onto black (the
  background of radiographs and ultrasound), 16-bit/32-bit/float images are
  rescaled to 8 bits, grayscale is repeated into three channels.
  """
  try:
    with Image.open(path) as img:
      img.load()  # Truncated files fail here, not later in the writer.
      mode = img.mode
      rotated = img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
      img = ImageOps.exif_transpose(img)
      if mode in _HIGH_BIT_MODES:
        rgb = gray_to_rgb(to_uint8(np.asarray(img)))
      elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32)
        rgb = np.round(rgba[..., :3] * (rgba[..., 3:] / 255.0)).astype(np.uint8)
      else:
        rgb = np.asarray(img.convert("RGB"))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadImage(f"corrupt or truncated image: {e}") from e
  if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
    raise BadImage(f"corrupt or truncated image: decoded shape {rgb.shape}")
  return np.ascontiguousarray(rgb), mode, rotated


def read_dicom(path):
  """uint8[H, W, 3] from a DICOM file (pydicom).

  Modality LUT (rescale slope/intercept) and VOI window are applied where the
  file has them, MONOCHROME1 is inverted, multi-frame files keep frame 0.
  """
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom.pixels import apply_modality_lut  # pylint: disable=g-import-not-at-top
  from pydicom.pixels import apply_voi_lut  # pylint: disable=g-import-not-at-top
  try:
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
      a = a[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("MONOCHROME"):
      a = apply_modality_lut(a, ds)
      if "WindowCenter" in ds or "VOILUTSequence" in ds:
        a = apply_voi_lut(a, ds)
      a = to_uint8(np.asarray(a))
      if photometric == "MONOCHROME1":
        a = 255 - a
      mode = f"DICOM {photometric} {int(ds.BitsStored)}-bit"
    else:
      if photometric != "RGB":
        from pydicom.pixels import convert_color_space  # pylint: disable=g-import-not-at-top
        a = convert_color_space(a, photometric, "RGB")
      a = to_uint8(np.asarray(a))
      mode = f"DICOM {photometric}"
  except Exception as e:  # pydicom raises many types for broken files.
    raise BadImage(f"unreadable DICOM: {type(e).__name__}: {e}") from e
  return gray_to_rgb(a), mode, False


def read_image(path):
  """(uint8[H, W, 3], source mode, exif_rotated) for an image or DICOM file."""
  if os.path.splitext(path)[1].lower() in (".dcm", ".dicom"):
    return read_dicom(path)
  return read_pil(path)


def read_mask(path):
  """bool[H, W] from a mask file: foreground is above half its maximum, which
  holds for 0/255, 0/1 and 16-bit masks alike."""
  try:
    with Image.open(path) as img:
      img.load()
      img = ImageOps.exif_transpose(img)
      if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
        img = img.convert("L")
      a = np.asarray(img)
  except (OSError, ValueError, SyntaxError) as e:
    raise BadImage(f"unreadable mask: {e}") from e
  if a.ndim == 3:
    a = a.max(axis=-1)
  hi = float(a.max()) if a.size else 0.0
  return a > hi / 2.0 if hi > 0 else np.zeros(a.shape, bool)


def rasterise_boxes(boxes, shape):
  """bool[H, W] union of (x, y, w, h) pixel boxes, clipped to the image.

  Returns (mask, number of boxes that had to be clipped)."""
  h, w = shape
  mask = np.zeros((h, w), bool)
  clipped = 0
  for x, y, bw, bh in boxes:
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = int(np.ceil(x + bw)), int(np.ceil(y + bh))
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    clipped += (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    if cx1 > cx0 and cy1 > cy0:
      mask[cy0:cy1, cx0:cx1] = True
  return mask, clipped


def load_example_arrays(item):
  """(rgb uint8[H, W, 3], mask bool[H, W], mode, exif_rotated, warnings).

  Raises BadImage when the image itself cannot be read; unreadable or
  mis-sized masks only produce warnings (the image is kept).
  """
  rgb, mode, rotated = read_image(item.path)
  shape = rgb.shape[:2]
  mask = np.zeros(shape, bool)
  warnings = []
  for mp in item.mask_paths:
    try:
      m = read_mask(mp)
    except BadImage as e:
      warnings.append((mp, str(e)))
      continue
    if m.shape != shape:
      warnings.append((mp, f"mask size {m.shape} differs from image size "
                           f"{shape}; resized (nearest)"))
      m = np.asarray(Image.fromarray(m).resize(shape[::-1], Image.NEAREST))
    mask |= m
  if item.boxes:
    box_mask, clipped = rasterise_boxes(item.boxes, shape)
    if clipped:
      warnings.append((item.path, f"{clipped} box(es) clipped to the image"))
    mask |= box_mask
  return rgb, mask, mode, rotated, warnings


def encode_png(a):
  """PNG bytes of uint8[H, W, C]; level 1 because builds are decode-bound and
  the size gain of higher levels is small on noisy medical images."""
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def pixel_hash(rgb):
  """Hash of the decoded pixels: equal for identical images in any file."""
  h = hashlib.sha1(np.asarray(rgb.shape, np.int64).tobytes())
  h.update(rgb.tobytes())
  return h.hexdigest()


def stable_index(key, n):
  """Deterministic index in [0, n) from a string (no Python hash salt)."""
  return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % n


def pick_phrase(bank, category, key):
  """A local phrase of `category` from the bank, chosen by `key` (the id)."""
  phrases = bank["categories"].get(category, {}).get("phrases", [])
  return phrases[stable_index(key, len(phrases))] if phrases else ""


def ordered_map(fn, items, workers):
  """map(fn, items) in order, on `workers` threads, at most 4*workers ahead.

  Pillow, zlib and pydicom's numpy work release the GIL, so threads scale
  decoding and PNG encoding without pickling arrays between processes.
  """
  if workers <= 1:
    yield from map(fn, items)
    return
  items = iter(items)
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    window = collections.deque(
        ex.submit(fn, x) for x in itertools.islice(items, 4 * workers))
    while window:
      done = window.popleft()
      for x in itertools.islice(items, 1):
        window.append(ex.submit(fn, x))
      yield done.result()


def default_workers():
  return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------
# Probing, duplicates and splits.


def probe_items(items, log, workers):
  """Decodes every item once; returns those that decode, with hash, shape,
  mode and ROI filled in. Undecodable images are logged as skipped."""

  def probe(item):
    try:
      rgb, mask, mode, rotated, warnings = load_example_arrays(item)
    except BadImage as e:
      return item, None, str(e)
    item.hash, item.shape, item.mode = pixel_hash(rgb), rgb.shape[:2], mode
    item.exif_rotated, item.roi = rotated, bool(mask.any())
    return item, warnings, None

  kept = []
  for item, warnings, error in ordered_map(probe, items, workers):
    if error is not None:
      log.skip(item.path, error)
      continue
    for path, message in warnings:
      log.warn(path, message)
    kept.append(item)
  return kept


def group_keys(items):
  """A group key per item: items sharing a patient id or identical pixels
  are in one group (union-find), so a split never separates them."""
  parent = {}

  def find(x):
    parent.setdefault(x, x)
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  def union(a, b):
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)

  for it in items:
    node = "f:" + it.id
    find(node)
    if it.patient_id:
      union(node, "p:" + it.patient_id)
    if it.hash:
      union(node, "h:" + it.hash)
  return [find("f:" + it.id) for it in items]


def stratified_group_split(labels, groups, fractions, seed):
  """Split names, one per item: stratified by label, grouped, seeded.

  labels: int[N]; groups: N keys (one group never spans two splits);
  fractions: {split: fraction} in split order. Per class (the majority label
  of a group), groups are shuffled with a generator seeded by (seed, class)
  and each goes to the split furthest below its target image count, so
  singleton groups give exactly rounded stratified counts.
  """
  labels = np.asarray(labels)
  names = list(fractions)
  frac = np.asarray([fractions[n] for n in names], np.float64)
  if np.any(frac < 0) or not np.isclose(frac.sum(), 1.0):
    raise ValueError(f"split fractions {fractions} must be >= 0 and sum to 1")
  members = collections.defaultdict(list)
  for i, g in enumerate(groups):
    members[g].append(i)
  group_label = {}
  for g, m in members.items():  # Majority label, ties to the smaller label.
    counts = collections.Counter(labels[m].tolist())
    group_label[g] = min(counts, key=lambda c: (-counts[c], c))  # pylint: disable=cell-var-from-loop
  out = [None] * len(labels)
  for c in sorted(set(group_label.values())):
    gs = sorted(g for g, gl in group_label.items() if gl == c)
    perm = np.random.default_rng([seed, int(c)]).permutation(len(gs))
    gs = [gs[i] for i in perm]
    target = frac * sum(len(members[g]) for g in gs)
    current = np.zeros(len(names))
    for g in gs:
      s = int(np.argmax(target - current))
      current[s] += len(members[g])
      for i in members[g]:
        out[i] = names[s]
  return out


def find_duplicates(items):
  """Groups (lists of items, at least two) of identical pixels, each ordered
  by split (train, val, test) then id: the first is the one kept."""
  by_hash = collections.defaultdict(list)
  for it in items:
    by_hash[it.hash].append(it)
  order = {s: i for i, s in enumerate(SPLITS)}
  groups = [sorted(g, key=lambda it: (order[it.split], it.id))
            for g in by_hash.values() if len(g) > 1]
  return sorted(groups, key=lambda g: g[0].id)


# ----------------------------------------------------------------------------
# The tfds builder.


def _fingerprint(obj):
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str)
                      .encode()).hexdigest()[:10]


class RealBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds builder of a data set read from a user's folder.

  Subclasses set `name`, `CATEGORIES` (or override `categories`) and
  implement `scan(log) -> list[Item]` (resolving the layout under
  `self.root`); they may override `split_items` for official splits.
  The builder config name encodes seed, dedup and a fingerprint of the root
  and options, so different folders or options never share prepared files.
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  CATEGORIES = ()
  DESCRIPTION = ""
  BANK = None  # Descriptor bank whose phrases label the ROIs.
  DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
  # tfds looks for a download-checksums file beside the builder's code, and
  # that lookup needs the `importlib_resources` backport; nothing is
  # downloaded here, so there is no code path to search.
  code_path = None

  def __init__(self, *, root, data_dir=None, seed=0, dedup=False,
               workers=None, **options):
    self.root = os.path.abspath(os.fspath(root))
    self.seed = int(seed)
    self.dedup = bool(dedup)
    self.workers = workers or default_workers()
    self.options = self.check_options(options)
    self.summary = None
    self._content = self.content_tag()
    tag = _fingerprint({"root": self.root, "options": self.options,
                        "content": self._content})
    config = tfds.core.BuilderConfig(
        name=f"seed{self.seed}{'_dedup' if self.dedup else ''}_{tag}",
        description=f"{self.root} options={self.options}")
    super().__init__(data_dir=data_dir, config=config,
                     file_format="array_record")
    # tfds re-creates builders from `_original_state` when unpickling.
    self._original_state = dict(root=self.root, data_dir=data_dir,
                                seed=self.seed, dedup=self.dedup,
                                workers=workers, **self.options)

  # -- to override ------------------------------------------------------------

  OPTIONS = {}  # name -> default of the data-set specific options.

  def check_options(self, options):
    unknown = sorted(set(options) - set(self.OPTIONS))
    if unknown:
      raise TypeError(f"{self.name}: unknown option(s) {unknown}; known: "
                      f"{sorted(self.OPTIONS)} plus seed, dedup, workers.")
    return {**self.OPTIONS, **options}

  def content_tag(self):
    """Part of the config name that changes when the data change: by
    default the fingerprint of every file under the root (names, sizes,
    modification times), so an edited folder is built anew."""
    return folder_fingerprint(self.root)

  def content_fingerprint(self):
    """Identity of the built data without the root's path (a moved folder
    keeps it): builder, version, seed, dedup, options and content."""
    return _fingerprint({"name": self.name, "version": str(self.VERSION),
                         "seed": self.seed, "dedup": self.dedup,
                         "options": self.options, "content": self._content})

  def categories(self):
    return list(self.CATEGORIES)

  def check_classes(self, items, log):
    """Fails, naming the folder, when a category has no readable image."""
    counts = collections.Counter(it.label for it in items)
    cats = self.categories()
    empty = [c for i, c in enumerate(cats) if not counts[i]]
    if empty:
      found = {c: counts[i] for i, c in enumerate(cats) if counts[i]}
      skipped = [s for s in log.skipped if any(
          c.lower() in s["path"].lower() for c in empty)][:5]
      raise ValueError(
          f"{self.name} under {self.root}: class(es) {empty} have no "
          f"readable images (images per class: {found}). "
          "Check those classes' folders (or labels) under the root"
          + (f"; skipped there: {skipped}" if skipped else "") + ".")

  def scan(self, log):
    raise NotImplementedError

  def split_items(self, items, log):
    """Assigns `item.split`: seeded stratified patient-grouped split where
    no official one exists (fractions from the `fractions` option)."""
    fractions = self.options.get("fractions") or self.DEFAULT_FRACTIONS
    splits = stratified_group_split([it.label for it in items],
                                     group_keys(items), fractions, self.seed)
    for it, s in zip(items, splits):
      it.split = s

  # -- tfds -------------------------------------------------------------------

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=schema.features(self.categories()))

  def bank(self):
    if self.BANK is None:
      return {"categories": {}}
    from hica_jax.data import descriptors  # pylint: disable=g-import-not-at-top
    # The file path, so a folder named like the bank in the cwd cannot shadow it.
    return descriptors.load_bank(
        os.path.join(descriptors.BANK_DIR, self.BANK + ".json"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the data are on the user's disk.
    log = BuildLog(self.root if os.path.isdir(self.root)
                   else os.path.dirname(self.root))
    items = self.scan(log)
    items = probe_items(items, log, self.workers)
    for it in items:
      if it.expect_roi and not it.roi:
        log.warn(it.path, "no ROI (no mask file, an empty mask or no box): "
                 "kept with has_roi=0")
    if not items:
      raise ValueError(f"No readable images under {self.root} "
                       f"({len(log.skipped)} files skipped).")
    self.check_classes(items, log)
    self.split_items(items, log)
    duplicates = find_duplicates(items)
    dropped = []
    if self.dedup:
      dropped = [it for g in duplicates for it in g[1:]]
      ids = {it.id for it in dropped}
      items = [it for it in items if it.id not in ids]
    bank = self.bank()
    cats = self.categories()
    for it in items:
      if it.roi and not it.phrase:
        it.phrase = pick_phrase(bank, cats[it.label], it.id)
    by_split = {s: [it for it in items if it.split == s] for s in SPLITS}
    empty = [s for s, its in by_split.items() if not its]
    if empty:
      raise ValueError(
          f"{self.name} under {self.root}: split(s) {empty} would be empty "
          f"({len(items)} usable images). The folder holds too few images for "
          "a train/validation/test split; check the files skipped: "
          f"{log.skipped[:5]}")
    self.summary = make_summary(self, items, log, duplicates, dropped)
    return {s: self._generate_examples(its) for s, its in by_split.items()}

  def _generate_examples(self, items):
    for key, example in ordered_map(self._example, items, self.workers):
      yield key, example

  def _example(self, item):
    rgb, mask, _, _, _ = load_example_arrays(item)
    return item.id, {
        "image": encode_png(rgb),
        "mask": encode_png(mask.astype(np.uint8) * 255),
        "label": item.label,
        "text": item.text,
        "phrase": item.phrase if item.roi else "",
        "has_roi": np.int32(item.roi),
        "id": item.id,
        "patient_id": item.patient_id,
    }

  def download_and_prepare(self, *args, **kwargs):
    """tfds prepare, then the JSON summary of the build next to the data."""
    kwargs.setdefault("download_config", tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    super().download_and_prepare(*args, **kwargs)
    if self.summary is not None:
      self.summary["data_dir"] = os.fspath(self.data_dir)
      with open(os.path.join(os.fspath(self.data_dir), SUMMARY_FILE), "w") as f:
        json.dump(self.summary, f, indent=1)

  def read_summary(self):
    path = os.path.join(os.fspath(self.data_dir), SUMMARY_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)


def make_summary(builder, items, log, duplicates, dropped):
  """The JSON-able account of a build (see `build_dataset`)."""
  cats = builder.categories()
  splits = {}
  for s in SPLITS:
    its = [it for it in items if it.split == s]
    per_class = collections.Counter(cats[it.label] for it in its)
    splits[s] = {"total": len(its),
                 "per_class": {c: per_class.get(c, 0) for c in cats},
                 "with_roi": sum(it.roi for it in its),
                 "patients": len({it.patient_id for it in its
                                  if it.patient_id})}
  patient_splits = collections.defaultdict(set)
  for it in items:
    if it.patient_id:
      patient_splits[it.patient_id].add(it.split)
  mask_counts = collections.Counter(len(it.mask_paths) for it in items)
  heights = [it.shape[0] for it in items]
  widths = [it.shape[1] for it in items]
  reasons = collections.Counter(
      s["reason"].split(":")[0].split(" (")[0] for s in log.skipped)
  return {
      "dataset": builder.name,
      "root": builder.root,
      "seed": builder.seed,
      "dedup": builder.dedup,
      "options": builder.options,
      "categories": cats,
      "splits": splits,
      "images": len(items),
      "masks": {
          "mask_files": sum(len(it.mask_paths) for it in items),
          "images_with_mask_file": sum(n for k, n in mask_counts.items() if k),
          "images_with_several_masks": sum(
              n for k, n in mask_counts.items() if k > 1),
          "images_with_boxes": sum(bool(it.boxes) for it in items),
          "images_with_roi": sum(it.roi for it in items),
      },
      "patients": {
          "with_id": len(patient_splits),
          "in_two_splits": sorted(p for p, s in patient_splits.items()
                                  if len(s) > 1),
      },
      "duplicates": {
          "groups": [[{"id": it.id, "split": it.split,
                       "label": cats[it.label]} for it in g]
                     for g in duplicates],
          "cross_split_groups": sum(len({it.split for it in g}) > 1
                                    for g in duplicates),
          "dropped": [it.id for it in dropped],
      },
      "image_modes": dict(sorted(collections.Counter(
          it.mode for it in items).items())),
      "exif_rotated": sorted(it.id for it in items if it.exif_rotated),
      "sizes": {"min_hw": [min(heights), min(widths)],
                "max_hw": [max(heights), max(widths)],
                "distinct": len(set(zip(heights, widths)))},
      "skipped": log.skipped,
      "skipped_by_reason": dict(sorted(reasons.items())),
      "warnings": log.warnings,
      "notes": log.notes,
  }
