"""The files of a real data set on disk, read once for every layout.

What a layout's scan finds (`Item`) and what a build skipped, ignored or
repaired (`BuildLog`); walking folders past the known junk (OS metadata
files, `__MACOSX` and hidden folders, nested copies of a layout) and the
fingerprint of a folder's files; decoding any image (8/16-bit, alpha,
palette, EXIF-rotated, DICOM) to 8-bit RGB, any mask to a boolean one, and
boxes into the same ROI mask; undecodable files raise `BadImage`. Also the
PNG encoding of the records, their bounded stored size (`bound_long_side`)
and the pixel hash that finds duplicates.
"""
import collections
import dataclasses
import hashlib
import io
import json
import os
import re

import numpy as np
from PIL import Image
from PIL import ImageOps

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
  # The probe's stored_pngs (None: not kept, the writer decodes again).
  stored: tuple = dataclasses.field(default=None, repr=False)


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


def file_digest(path):
  """sha1 hex digest of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def folder_fingerprint(root, cache_dir=None):
  """Hash of every file under `root`: relative name, size and content, so
  a copy of the folder (new modification times) keeps its fingerprint and
  an edited file changes it. A file root (a CSV manifest) hashes that file.

  cache_dir: where the content digests are kept between runs, keyed by
  (size, modification time): a file whose stat is unchanged is not read
  again. None hashes every file's bytes each time.
  """
  root = os.path.abspath(os.fspath(root))
  cache_path, cache = None, {}
  if cache_dir:
    cache_path = os.path.join(cache_dir, hashlib.sha1(
        root.encode("utf-8", "surrogateescape")).hexdigest()[:16] + ".json")
    try:
      with open(cache_path) as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}
  fresh = {}

  def entry(path, rel):
    st = os.stat(path)
    known = cache.get(rel)
    if known and known[:2] == [st.st_size, st.st_mtime_ns]:
      digest = known[2]
    else:
      digest = file_digest(path)
    fresh[rel] = [st.st_size, st.st_mtime_ns, digest]
    return f"{rel}\0{st.st_size}\0{digest}\n".encode(
        "utf-8", "surrogateescape")

  h = hashlib.sha1()
  if os.path.isfile(root):
    h.update(entry(root, os.path.basename(root)))
  else:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      for f in sorted(filenames):
        p = os.path.join(dirpath, f)
        try:
          h.update(entry(p, os.path.relpath(p, root)))
        except OSError:  # A dangling link or a file deleted meanwhile.
          continue
  if cache_path and fresh != cache:
    try:
      os.makedirs(cache_dir, exist_ok=True)
      with open(cache_path + ".tmp", "w") as f:
        json.dump(fresh, f)
      os.replace(cache_path + ".tmp", cache_path)
    except OSError:  # A read-only data dir: the next run hashes again.
      pass
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


def jpeg_draft_size(size, max_side):
  """(w, h) to ask a JPEG decoder for (`Image.draft`) when the image will
  be stored with its long side at most `max_side` (0: no bound, None
  returned): a square of twice the bound. libjpeg then decodes at the
  smallest of 1/8, 1/4, 1/2 and full scale that keeps both sides at least
  that large, so the stored image is still shrunk, antialiased, from at
  least twice its size (Pillow's `thumbnail` keeps the same margin)."""
  if not max_side or max(size) <= 2 * max_side:
    return None
  return (2 * max_side, 2 * max_side)


def read_pil(path, max_side=0):
  """uint8[H, W, 3] RGB from any Pillow image, EXIF orientation applied.

  Returns (rgb, mode, exif_rotated, full_shape). Alpha is composited onto
  black (the background of radiographs and ultrasound), 16-bit/32-bit/float
  images are rescaled to 8 bits, grayscale is repeated into three channels.
  max_side: the stored bound (`bound_long_side`); a JPEG over twice it is
  decoded at a reduced scale (`jpeg_draft_size`), 2-4x faster on a
  full-size X-ray, so `rgb` may be smaller than the file's (h, w), which
  `full_shape` gives (after EXIF rotation) in every case.
  """
  try:
    with Image.open(path) as img:
      full_size = img.size
      draft = (jpeg_draft_size(full_size, max_side)
               if img.format == "JPEG" else None)
      if draft is not None:
        img.draft(None, draft)
      img.load()  # Truncated files fail here, not later in the writer.
      mode = img.mode
      orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
      rotated = orientation not in (0, 1)
      full_shape = (full_size[0], full_size[1]) if orientation in (
          5, 6, 7, 8) else (full_size[1], full_size[0])
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
  return np.ascontiguousarray(rgb), mode, rotated, full_shape


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


def read_image(path, max_side=0):
  """(uint8[h, w, 3], source mode, exif_rotated, full (H, W)) for an image
  or DICOM file; see read_pil for max_side (DICOMs are decoded whole)."""
  if os.path.splitext(path)[1].lower() in (".dcm", ".dicom"):
    rgb, mode, rotated = read_dicom(path)
    return rgb, mode, rotated, rgb.shape[:2]
  return read_pil(path, max_side)


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


def load_example_arrays(item, max_side=0):
  """(rgb uint8[h, w, 3], mask bool[H, W], mode, exif_rotated, warnings,
  full (H, W)).

  max_side: the stored bound, which lets a large JPEG decode at a reduced
  scale (read_pil): then rgb is smaller than the file's (H, W), and the
  mask (mask files and boxes) stays on the file's grid, for
  bound_long_side to put both on the stored one. Raises BadImage when the
  image itself cannot be read; unreadable or mis-sized masks only produce
  warnings (the image is kept).
  """
  rgb, mode, rotated, shape = read_image(item.path, max_side)
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
  return rgb, mask, mode, rotated, warnings, tuple(shape)


def bounded_shape(shape, max_side):
  """(h, w) with the long side at most `max_side`, aspect kept (the rounding
  of preprocess.resize_and_pad); `shape` itself when within it or when
  max_side is 0 (no bound)."""
  h, w = shape[:2]
  if not max_side or max(h, w) <= max_side:
    return (h, w)
  scale = max_side / max(h, w)
  return max(1, round(h * scale)), max(1, round(w * scale))


def bound_long_side(rgb, mask, max_side, full_shape=None):
  """The stored arrays: (uint8[h, w, 3], bool[h, w]) at bounded_shape.

  rgb uint8[h, w, 3], mask bool[H, W]; full_shape: the file's (H, W) where
  rgb was decoded at a reduced scale (read_pil), so that the stored shape
  is bounded_shape of the file's, whatever the decoder's rounding. Arrays
  within the bound are returned as they are (pixel-identical). Larger
  ones are shrunk with Lanczos, which antialiases (reduce() by an integer
  factor first where the factor is 3 or more: on a 2000 px X-ray to 256,
  within 2 grey levels, mean 0.2, of the plain Lanczos resize and ~1.3x
  faster); the mask by nearest neighbour onto the same pixel grid, as
  training resizes masks, so ROIs stay where they were, proportionally.
  """
  h, w = bounded_shape(full_shape or rgb.shape, max_side)
  if rgb.shape[:2] != (h, w):
    resize = lambda a: np.asarray(Image.fromarray(a).resize(
        (w, h), Image.LANCZOS, reducing_gap=3.0))
    gray = rgb[..., 0]
    if (np.array_equal(gray, rgb[..., 1])
        and np.array_equal(gray, rgb[..., 2])):
      # Pillow resizes each channel alike: the same pixels, for a third
      # of the channels (BENCHMARKS.md, "Each image decoded once").
      rgb = np.repeat(resize(gray)[..., None], 3, axis=-1)
    else:
      rgb = resize(rgb)
  if mask.shape != (h, w):
    # Most images have no ROI: an empty mask needs no resize.
    mask = (np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (w, h), Image.NEAREST)) > 0 if mask.any() else np.zeros((h, w), bool))
  return rgb, mask


def stored_pngs(rgb, mask, max_side, full_shape=None):
  """(image, mask) PNG bytes as the build stores them: bound_long_side's
  arrays of load_example_arrays' (rgb, mask, full_shape)."""
  rgb, mask = bound_long_side(rgb, mask, max_side, full_shape)
  return encode_png(rgb), encode_png(mask.astype(np.uint8) * 255)


def encode_png(a):
  """PNG bytes of uint8[H, W, C]; level 1 because builds are decode-bound and
  the size gain of higher levels is small on noisy medical images."""
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def pixel_hash(rgb):
  """Hash of the decoded pixels: equal for identical images in any file
  (a JPEG decoded at a reduced scale, read_pil, is hashed at that scale:
  a copy of the same file matches, a lossless re-encoding of its pixels
  in another format does not)."""
  h = hashlib.sha1(np.asarray(rgb.shape, np.int64).tobytes())
  h.update(rgb.tobytes())
  return h.hexdigest()

