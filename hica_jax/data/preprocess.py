"""Record -> example: everything that turns one stored record into arrays.

Decoding (Pillow, no TensorFlow; the general path is `real.files`),
aspect-preserving resize and pad, augmentation (one affine resampling, then
brightness, contrast and speckle; a horizontal flip only where the text
allows it, or with left and right swapped in the text), descriptor sentence
sampling and tokenisation (`Preprocessor`), and the normalisation of the
image tower's checkpoint (`normalization`). An example is a function of its
record and an explicit numpy rng only, so `pipeline` can seed it per global
position.
"""
import dataclasses
import hashlib
import io
import json
import os
import re

from absl import logging
import numpy as np
from PIL import Image

from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import text_tables
from hica_jax.data.real import files

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_str(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


# ----------------------------------------------------------------------------
# Laterality: a horizontal flip turns a left-sided finding into a right-sided
# one, so the text must follow the image or the flip must not happen.

_LATERAL = re.compile(r"\b(left|right)(wards?)?\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def has_laterality(text):
  """True if `text` names a side (left/right, leftward, right-sided, ...)."""
  return bool(text) and _LATERAL.search(text) is not None


def swap_laterality(text):
  """`text` with left and right exchanged, keeping each word's case."""
  def swap(m):
    word = m.group(1)
    new = _SWAP[word.lower()]
    if word.isupper():
      new = new.upper()
    elif word[0].isupper():
      new = new.capitalize()
    return new + (m.group(2) or "")
  return _LATERAL.sub(swap, text) if text else text


# config.data.augment.hflip: False/"off" never flips; True/"no_laterality"
# flips (p=0.5) only examples whose text and phrase name no side; "swap"
# flips (p=0.5) and exchanges left and right in the text and phrase.
_HFLIP_MODES = {None: False, False: False, "off": False, True: True,
                "no_laterality": True, "swap": "swap"}


def _hflip_mode(value):
  try:
    return _HFLIP_MODES[value]
  except (KeyError, TypeError):
    raise ValueError(
        f"config.data.augment.hflip={value!r}: use False/'off' (never), "
        "True/'no_laterality' (only texts without left/right) or 'swap' "
        "(flip and swap left/right in the text).") from None


# ----------------------------------------------------------------------------
# Image preprocessing.


def decode_image(data):
  """Encoded bytes (or an array) -> u8[H, W, 3].

  Any input the real builders accept decodes the same way here (one place:
  `real.files`): grayscale repeated to 3 channels, alpha composited onto
  black, 16-bit rescaled min-max to 8 bits, EXIF orientation applied.
  """
  if isinstance(data, np.ndarray):
    arr = data
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # LA / RGBA arrays
      alpha = arr[..., -1:].astype(np.float32) / float(
          np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0)
      arr = np.round(arr[..., :-1] * alpha).astype(arr.dtype)
    return files.gray_to_rgb(files.to_uint8(arr))
  canonical = _open_canonical(data, "RGB")
  if canonical is not None:
    return canonical
  try:
    return files.read_pil(io.BytesIO(data))[0]
  except files.BadImage as e:
    raise ValueError(f"Record image does not decode ({e}); rebuild the data "
                     "set (python -m hica_jax.data build ...).") from e


def decode_mask(data):
  """Encoded bytes (or an array) -> bool[H, W] (foreground above half max)."""
  if isinstance(data, np.ndarray):
    arr = data.max(-1) if data.ndim == 3 else data
  else:
    arr = _open_canonical(data, "L")
    if arr is None:
      return files.read_mask(io.BytesIO(data))
  hi = float(arr.max()) if arr.size else 0.0
  return arr > hi / 2.0 if hi > 0 else np.zeros(arr.shape, bool)


def _open_canonical(data, mode):
  """The pixels of a PNG already in `mode` without EXIF, else None.

  Records written by our builders are such PNGs (RGB images, L masks); they
  skip the general conversion of `real.files` (EXIF transpose, copies),
  which costs about as much again as the PNG decode itself.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.format != "PNG" or im.mode != mode:
        return None
      im.load()  # reads the chunks after the pixels too (eXIf)
      return None if "exif" in im.info else np.asarray(im)
  except (OSError, ValueError, SyntaxError):
    return None  # the general path reports what is wrong


def resize_and_pad(image, mask, size):
  """Aspect-preserving resize of the long side to `size`, centred zero pad.

  image u8[H, W, 3], mask bool[H, W] -> u8[size, size, 3], bool[size, size].
  The image is resampled bilinearly (antialiased when shrinking), the mask by
  nearest neighbour, onto the same pixel grid, so ROIs stay on their pixels.
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image, mask
  scale = size / max(h, w)
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  im = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  mk = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
      (nw, nh), Image.NEAREST)) > 0
  out_im = np.zeros((size, size, 3), np.uint8)
  out_mk = np.zeros((size, size), bool)
  top, left = (size - nh) // 2, (size - nw) // 2
  out_im[top:top + nh, left:left + nw] = im
  out_mk[top:top + nh, left:left + nw] = mk
  return out_im, out_mk


def _geometry(size, rng, aug, flip):
  """PIL AFFINE coefficients (output -> input coordinates) of a random resized
  crop, then a rotation about the centre, then the horizontal flip `flip`;
  None when that is the identity. One resampling instead of one per step."""
  scale, left, top = 1.0, 0.0, 0.0
  lo, hi = aug.get("crop_scale", (1.0, 1.0))
  if hi < 1.0 or lo < 1.0:
    crop = max(8, int(round(size * np.sqrt(rng.uniform(lo, hi)))))
    top = float(rng.integers(0, size - crop + 1))
    left = float(rng.integers(0, size - crop + 1))
    scale = crop / size
  degrees = rng.uniform(-aug["rotate"], aug["rotate"]) if aug.get(
      "rotate") else 0.0
  if scale == 1.0 and degrees == 0.0 and not flip:
    return None
  # Image.rotate's matrix: counter-clockwise by `degrees` about the centre.
  cos, sin = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
  centre = size / 2.0
  rot = (cos, -sin, centre - cos * centre + sin * centre,
         sin, cos, centre - sin * centre - cos * centre)
  # Then the crop: rotated coordinates are in the crop, scaled into it.
  a, b, c, d, e, f = (scale * v for v in rot)
  c, f = c + left, f + top
  if flip:  # x_out -> size - x_out
    a, c, d, f = -a, c + a * size, -d, f + d * size
  return (a, b, c, d, e, f)


def augment(image, mask, rng, aug, flip=False):
  """Mild geometric and photometric augmentation.

  image u8[S, S, 3], mask bool[S, S] -> f32[S, S, 3] in [0, 1], bool[S, S].
  Geometric steps (random resized crop, rotation, the horizontal flip decided
  by the caller) are one affine map applied to image (bilinear) and mask
  (nearest) alike; photometric steps (brightness, contrast, multiplicative
  speckle) touch the image only.
  """
  size = image.shape[0]
  matrix = _geometry(size, rng, aug, flip)
  if matrix is not None:
    image = np.asarray(Image.fromarray(image).transform(
        (size, size), Image.AFFINE, matrix, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).transform(
        (size, size), Image.AFFINE, matrix, Image.NEAREST)) > 0
  image = image.astype(np.float32) * np.float32(1 / 255)
  b, c = aug.get("brightness", 0.0), aug.get("contrast", 0.0)
  if b or c:
    mean = image.mean()
    image = (image - mean) * np.float32(rng.uniform(1 - c, 1 + c)) + mean
    image = image + np.float32(rng.uniform(-b, b))
  speckle = aug.get("speckle", 0.0)
  if speckle:
    # Ultrasound speckle is multiplicative: it scales the echo, so black
    # (anechoic) regions stay black.
    noise = 1.0 + speckle * rng.standard_normal(image.shape[:2],
                                                dtype=np.float32)
    image = image * noise[..., None]
  return np.clip(image, 0.0, 1.0), mask


# The most bytes of resized pixels one Preprocessor keeps (Preprocessor.
# _resized): 256 MiB is 16k images at 64 px, 1.3k at 224 px.
PIXEL_CACHE_BYTES = 256 << 20


@dataclasses.dataclass
class Preprocessor:
  """Record -> training/eval example (numpy) for one task.

  `class_of` maps the data set's label index to the task's class index.
  `aug` (config.data.augment) is applied when called with an rng; its
  `hflip` is False/'off', True/'no_laterality' or 'swap' (see _HFLIP_MODES).
  `class_phrases` (stage2.loss.phrases='class'): a training example without
  a phrase of its own draws one of its class's bank phrases (after the
  augmentation draws, so the images equal those of a run without), and
  takes part in the local term without an ROI.
  """
  tables: text_tables.TextTables
  class_of: dict
  image_size: int
  mean: tuple = (0.5, 0.5, 0.5)   # None (with std None): per image
  std: tuple = (0.5, 0.5, 0.5)
  aug: dict = None
  class_phrases: bool = False

  def __post_init__(self):
    self._hflip = _hflip_mode((self.aug or {}).get("hflip", False))
    self._pixels = {}        # see _resized
    self._pixel_bytes = 0
    if (self.mean is None) != (self.std is None):
      raise ValueError("Preprocessor: mean and std must both be set or both "
                       "be None (per-image standardisation).")
    if self.mean is not None:
      self._mean = np.asarray(self.mean, np.float32)
      self._inv_std = 1.0 / np.asarray(self.std, np.float32)

  def __getstate__(self):
    # Worker processes start with an empty cache of their own.
    state = dict(self.__dict__)
    state["_pixels"], state["_pixel_bytes"] = {}, 0
    return state

  def _resized(self, record):
    """(u8[S, S, 3], bool[S, S]) of a record: its image and mask decoded and
    resize_and_pad-ed, before any augmentation; read-only.

    A pure function of the encoded bytes, so it is cached by their digest
    (up to PIXEL_CACHE_BYTES): a training run reads each record once per
    epoch, tens of times, and decoding was about half of what the loader
    threads spent per example, on the cores the step needs (BENCHMARKS.md).
    The digest costs about 7% of a decode (0.07 ms against 1.1 ms for a
    Kermany record of 43 kB).
    """
    image_bytes, mask_bytes = record["image"], record["mask"]
    key = None
    if isinstance(image_bytes, bytes) and isinstance(mask_bytes, bytes):
      # The image's length first: no two (image, mask) pairs share a stream.
      h = hashlib.blake2b(len(image_bytes).to_bytes(8, "little"),
                          digest_size=16)
      h.update(image_bytes)
      h.update(mask_bytes)
      key = h.digest()
      cached = self._pixels.get(key)
      if cached is not None:
        return cached
    try:
      image = decode_image(image_bytes)
      mask = decode_mask(mask_bytes)
    except (ValueError, files.BadImage) as e:
      raise ValueError(f"Record {_as_str(record.get('id', '?'))!r}: {e}") from e
    if mask.shape != image.shape[:2]:
      mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
          image.shape[1::-1], Image.NEAREST)) > 0
    image, mask = resize_and_pad(image, mask, self.image_size)
    image, mask = np.array(image, np.uint8), np.array(mask, bool)
    image.flags.writeable = mask.flags.writeable = False
    if key is not None and (self._pixel_bytes + image.nbytes + mask.nbytes
                            <= PIXEL_CACHE_BYTES):
      # Loader threads may race here; both write the same value.
      self._pixels[key] = (image, mask)
      self._pixel_bytes += image.nbytes + mask.nbytes
    return image, mask

  def _text(self, record, label, rng):
    """(text or None, ids, mask): the report, else a descriptor sentence."""
    t = self.tables
    text = _as_str(record.get("text", b""))
    if text:
      ids, mask = tokenizer_lib.tokenize(t.tokenizer, [text], t.max_len)
      return text, ids[0], mask[0]
    rows = t.sentence_rows(label)
    row = rows[rng.integers(len(rows))] if rng is not None else rows[0]
    sentence = t.sentences[row] if t.sentences is not None else None
    return sentence, t.desc_ids[row], t.desc_mask[row]

  def _phrase(self, phrase, swap):
    """(ids, mask, phrase_id) of a phrase, its sides swapped if `swap`."""
    t = self.tables
    if swap and has_laterality(phrase):
      phrase = swap_laterality(phrase)
      if phrase not in t._phrase_index:  # pylint: disable=protected-access
        ids, mask = tokenizer_lib.tokenize(t.tokenizer, [phrase],
                                           t.max_phrase_len)
        return ids[0], mask[0], -1
    row, pid = t.phrase_row(phrase)
    return t.phrase_ids[row], t.phrase_mask[row], pid

  def __call__(self, record, rng=None, index=-1):
    t = self.tables
    label = self.class_of[int(record["label"])]
    text, text_ids, text_mask = self._text(record, label, rng)
    phrase = _as_str(record.get("phrase", b""))
    image, mask = self._resized(record)
    flip = False
    if rng is not None and self.aug:
      if self._hflip and rng.random() < 0.5:
        if self._hflip == "swap":
          flip = True
        else:  # Flip only what the text cannot contradict.
          flip = (text is not None and not has_laterality(text)
                  and not has_laterality(phrase))
      image, mask = augment(image, mask, rng, self.aug, flip=flip)
    else:
      image = image.astype(np.float32) * np.float32(1 / 255)
    swap = flip and self._hflip == "swap"
    if swap and has_laterality(text):
      text_ids, text_mask = tokenizer_lib.tokenize(
          t.tokenizer, [swap_laterality(text)], t.max_len)
      text_ids, text_mask = text_ids[0], text_mask[0]
    from_class = False
    if not phrase and self.class_phrases and rng is not None:
      rows = t.class_phrase_rows[label]
      drawn = t.phrases[rows[rng.integers(len(rows))]] if len(rows) else ""
      # A flip that the text may not contradict leaves a lateral phrase out.
      if drawn and not (flip and not swap and has_laterality(drawn)):
        phrase, from_class = drawn, True
    phrase_ids, phrase_mask, pid = self._phrase(phrase, swap)
    if self.mean is None:
      image = (image - image.mean()) / np.float32(image.std() + 1e-3)
    else:
      image = (image - self._mean) * self._inv_std
    has_roi = float(int(record.get("has_roi", 0)) > 0 and mask.any())
    return {
        "image": image.astype(np.float32),
        "roi_mask": mask.astype(np.float32),
        "has_roi": np.float32(has_roi),
        "label": np.int32(label),
        "text_ids": text_ids.astype(np.int32),
        "text_mask": text_mask.astype(np.int32),
        "phrase_ids": np.asarray(phrase_ids, np.int32),
        "phrase_mask": np.asarray(phrase_mask, np.int32),
        "phrase_id": np.int32(pid if has_roi or from_class else -1),
        "index": np.int32(index),
    }


# ----------------------------------------------------------------------------
# Normalisation.

NORMALIZATIONS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # Each image standardised by its own mean and std: removes exposure and
    # contrast (a nuisance in both synthetic families) from what a tower
    # trained from scratch, and stage 1's k-means, can latch on to.
    "per_image": (None, None),
}


def normalization(name, model_config=None):
  """(mean, std) matching the image tower's checkpoint.

  name: 'clip', 'imagenet', 'half', or 'auto': the image tower's Hugging Face
  folder decides (its preprocessor_config.json image_mean/image_std if it has
  one, else 'clip' for CLIP checkpoints, 'half' for others); a tower trained
  from scratch gets 'per_image' (synthetic busi, few-shot K=16 balanced
  accuracy 0.50 -> 0.69 over 'half': stage 1 stops clustering by exposure). 'auto' needs `model_config` (config.model).
  """
  if name == "auto":
    if model_config is None:
      raise ValueError("config.data.normalization='auto' needs the model "
                       "config: call normalization(name, config.model).")
    return _checkpoint_normalization(model_config)
  if name in NORMALIZATIONS:
    return NORMALIZATIONS[name]
  raise ValueError(f"config.data.normalization={name!r}: use 'auto', 'clip', "
                   "'imagenet', 'half' or 'per_image'.")


def _checkpoint_normalization(model_config):
  from hica_jax.models import hf_import  # pylint: disable=g-import-not-at-top
  path = hf_import.init_specs(model_config).get("image")
  if not path:
    return NORMALIZATIONS["per_image"]
  if path.startswith(hf_import.OPEN_CLIP):  # its preprocess_cfg, or open_clip's default
    from hica_jax.models import open_clip_import  # pylint: disable=g-import-not-at-top
    pre = open_clip_import.preprocess(path)
    return pre["mean"], pre["std"]
  pre = os.path.join(path, "preprocessor_config.json")
  if os.path.isfile(pre):
    with open(pre) as f:
      cfg = json.load(f)
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if mean is not None and std is not None:
      if np.ndim(mean) == 0:
        mean, std = (mean,) * 3, (std,) * 3
      if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{pre}: image_mean/image_std must have 3 values, "
                         f"got {mean} / {std}.")
      return tuple(float(m) for m in mean), tuple(float(s) for s in std)
  model_type = hf_import.read_config(path).get("model_type")
  name = "clip" if model_type in hf_import.CLIP_TYPES else "half"
  logging.info("normalization 'auto': %s for %s (model_type %s)", name, path,
               model_type)
  return NORMALIZATIONS[name]
