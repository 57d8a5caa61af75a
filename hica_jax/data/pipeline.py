"""Input pipelines: tfds array_record sources read through grain.

Everything a step consumes comes from here: decoding (Pillow, no TensorFlow),
aspect-preserving resize and pad, normalisation, augmentation (a horizontal
flip only where the text allows it), descriptor sentence sampling,
tokenisation and batching. A training run's batches (`train_dataset`) are a
grain MapDataset of steps read by loader threads and, optionally, worker
processes. The records of a step and their augmentation are a pure function
of (seed, global position): the same seed gives the same batches, each
process reads only its rows of every global batch, and the iterator state
({"step": n}, saved in checkpoints) resumes exactly, under any number of
threads, workers or processes.
"""
import dataclasses
import io
import json
import os
import re

import grain
from absl import flags
from absl import logging
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import descriptors
from hica_jax.data.real import common

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------
# Data set handle.


@dataclasses.dataclass
class DatasetHandle:
  """A prepared data set: its tfds builder, category names and descriptor bank."""
  name: str
  builder: object
  categories: list          # every category in the data set, label order
  bank: dict                # descriptor bank (descriptors.load_bank format)
  unseen: list              # categories held out of stage 2

  @property
  def seen(self):
    return [c for c in self.categories if c not in self.unseen]

  def source(self, split):
    return SplitSource(self.builder, split)

  def split_counts(self):
    out = {}
    for split in self.builder.info.splits:
      labels = self.source(split).labels()
      out[split] = {c: int((labels == i).sum())
                    for i, c in enumerate(self.categories)}
    return out


class SplitSource:
  """Random access to one split; images stay encoded until preprocessing."""

  def __init__(self, builder, split):
    self.split = split
    self._builder = builder
    self._ds = builder.as_data_source(split, decoders={
        "image": tfds.decode.SkipDecoding(),
        "mask": tfds.decode.SkipDecoding()})

  def __len__(self):
    return len(self._ds)

  def __getitem__(self, i):
    return self._ds[int(i)]

  def labels(self):
    """i32[N] labels of every record, cached next to the data."""
    cache = os.path.join(os.fspath(self._builder.data_dir),
                         f"labels-{self.split}.json")
    if os.path.exists(cache):
      with open(cache) as f:
        return np.asarray(json.load(f), np.int32)
    labels = [int(self._ds[i]["label"]) for i in range(len(self._ds))]
    try:
      with open(cache, "w") as f:
        json.dump(labels, f)
    except OSError:
      pass  # A read-only data dir only costs a re-scan next time.
    return np.asarray(labels, np.int32)

  def indices_of(self, category_ids):
    """Indices of the records whose label is in `category_ids`."""
    return np.flatnonzero(np.isin(self.labels(), list(category_ids)))


def _as_str(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


# ----------------------------------------------------------------------------
# Text tables: the descriptor bank tokenised once.


@dataclasses.dataclass
class TextTables:
  """Tokenised descriptor bank for one task (an ordered list of classes).

  desc_ids/desc_mask: i32[D, L] every sentence of every class in `classes`;
  desc_category: i32[D] its class index; sentences: the D sentences as text
  (re-tokenised when a flip swaps their laterality); phrase_ids/phrase_mask:
  i32[P+1, Lp] every local phrase of the bank, the last row the empty phrase.
  """
  classes: list
  desc_ids: np.ndarray
  desc_mask: np.ndarray
  desc_category: np.ndarray
  phrases: list
  phrase_ids: np.ndarray
  phrase_mask: np.ndarray
  tokenizer: object
  max_len: int
  sentences: list = None
  max_phrase_len: int = None

  @property
  def num_classes(self):
    return len(self.classes)

  def sentence_rows(self, class_index):
    return np.flatnonzero(self.desc_category == class_index)

  def phrase_row(self, phrase):
    """Row of `phrase` in the phrase table and its id (-1 for none/unknown)."""
    if phrase and phrase in self._phrase_index:
      i = self._phrase_index[phrase]
      return i, i
    return len(self.phrases), -1

  def __post_init__(self):
    self._phrase_index = {p: i for i, p in enumerate(self.phrases)}
    if self.max_phrase_len is None:
      self.max_phrase_len = self.phrase_ids.shape[1]


def build_text_tables(bank, classes, tokenizer, max_len, max_phrase_len):
  sentences, cats = [], []
  for ci, c in enumerate(classes):
    if c not in bank["categories"]:
      raise KeyError(f"Category {c!r} has no entry in the descriptor bank; add "
                     f"sentences for it (bank has {list(bank['categories'])}).")
    for s in bank["categories"][c]["sentences"]:
      sentences.append(s)
      cats.append(ci)
  ids, mask = tokenizer_lib.tokenize(tokenizer, sentences, max_len)
  phrases = descriptors.phrase_list(bank)
  pids, pmask = tokenizer_lib.tokenize(tokenizer, phrases + [""],
                                       max_phrase_len)
  return TextTables(classes=list(classes), desc_ids=ids, desc_mask=mask,
                    desc_category=np.asarray(cats, np.int32), phrases=phrases,
                    phrase_ids=pids, phrase_mask=pmask, tokenizer=tokenizer,
                    max_len=max_len, sentences=sentences,
                    max_phrase_len=max_phrase_len)


def text_corpus(bank, extra_texts=()):
  """Every sentence and phrase of a bank plus extra texts (reports)."""
  out = []
  for entry in bank["categories"].values():
    out.extend(entry["sentences"])
    out.extend(entry.get("phrases", []))
  out.extend(t for t in extra_texts if t)
  return out


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
  `real.common`): grayscale repeated to 3 channels, alpha composited onto
  black, 16-bit rescaled min-max to 8 bits, EXIF orientation applied.
  """
  if isinstance(data, np.ndarray):
    arr = data
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # LA / RGBA arrays
      alpha = arr[..., -1:].astype(np.float32) / float(
          np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0)
      arr = np.round(arr[..., :-1] * alpha).astype(arr.dtype)
    return common.gray_to_rgb(common.to_uint8(arr))
  canonical = _open_canonical(data, "RGB")
  if canonical is not None:
    return canonical
  try:
    return common.read_pil(io.BytesIO(data))[0]
  except common.BadImage as e:
    raise ValueError(f"Record image does not decode ({e}); rebuild the data "
                     "set (python -m hica_jax.data build ...).") from e


def decode_mask(data):
  """Encoded bytes (or an array) -> bool[H, W] (foreground above half max)."""
  if isinstance(data, np.ndarray):
    arr = data.max(-1) if data.ndim == 3 else data
  else:
    arr = _open_canonical(data, "L")
    if arr is None:
      return common.read_mask(io.BytesIO(data))
  hi = float(arr.max()) if arr.size else 0.0
  return arr > hi / 2.0 if hi > 0 else np.zeros(arr.shape, bool)


def _open_canonical(data, mode):
  """The pixels of a PNG already in `mode` without EXIF, else None.

  Records written by our builders are such PNGs (RGB images, L masks); they
  skip the general conversion of `real.common` (EXIF transpose, copies),
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


@dataclasses.dataclass
class Preprocessor:
  """Record -> training/eval example (numpy) for one task.

  `class_of` maps the data set's label index to the task's class index.
  `aug` (config.data.augment) is applied when called with an rng; its
  `hflip` is False/'off', True/'no_laterality' or 'swap' (see _HFLIP_MODES).
  """
  tables: TextTables
  class_of: dict
  image_size: int
  mean: tuple = (0.5, 0.5, 0.5)   # None (with std None): per image
  std: tuple = (0.5, 0.5, 0.5)
  aug: dict = None

  def __post_init__(self):
    self._hflip = _hflip_mode((self.aug or {}).get("hflip", False))
    if (self.mean is None) != (self.std is None):
      raise ValueError("Preprocessor: mean and std must both be set or both "
                       "be None (per-image standardisation).")
    if self.mean is not None:
      self._mean = np.asarray(self.mean, np.float32)
      self._inv_std = 1.0 / np.asarray(self.std, np.float32)

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
    try:
      image = decode_image(record["image"])
      mask = decode_mask(record["mask"])
    except (ValueError, common.BadImage) as e:
      raise ValueError(f"Record {_as_str(record.get('id', '?'))!r}: {e}") from e
    if mask.shape != image.shape[:2]:
      mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
          image.shape[1::-1], Image.NEAREST)) > 0
    image, mask = resize_and_pad(image, mask, self.image_size)
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
        "phrase_id": np.int32(pid if has_roi else -1),
        "index": np.int32(index),
    }


def _stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------
# Training iterators.


class _EpochShuffled:
  """Global example position -> record index: a fresh permutation per epoch."""

  def __init__(self, indices, seed):
    self.indices = np.asarray(indices)
    self.seed = seed
    self._cache = (None, None)

  def __call__(self, position):
    n = len(self.indices)
    epoch, offset = divmod(int(position), n)
    cached = self._cache  # One read: loader threads replace it concurrently.
    if cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
      self._cache = cached
    return int(self.indices[cached[1][offset]])


@dataclasses.dataclass
class _BatchLoader:
  """Step -> this process's rows of that global batch (a picklable callable).

  Row r of process p in step s is global position s*B + p*B/P + r; the record
  at a position and its augmentation randomness depend only on (seed,
  position), so the global batch is the same for any number of processes.
  """
  source: object
  order: _EpochShuffled
  preprocess: object
  seed: int
  global_batch: int
  local_batch: int
  process_index: int

  def __call__(self, step):
    base = int(step) * self.global_batch + self.process_index * self.local_batch
    examples = []
    for position in range(base, base + self.local_batch):
      record_index = self.order(position)
      rng = np.random.default_rng([self.seed, 1, position])
      examples.append(self.preprocess(self.source[record_index], rng=rng,
                                      index=record_index))
    return _stack(examples)


class TrainBatches:
  """The batches of a training run: `iter()` gives a resumable iterator.

  Each iterator reads steps [start, num_steps) through a grain pipeline
  (`dataset(start)`): a MapDataset of steps, `num_threads` loader threads and,
  with `worker_count` > 0, that many worker processes (grain mp_prefetch;
  absl flags must be parsed first, as `absl.app.run` does).
  """

  def __init__(self, load_batch, num_steps, *, num_threads=4,
               prefetch_batches=8, worker_count=0, worker_buffer_size=2):
    self.load_batch = load_batch
    self.num_steps = int(num_steps)
    self.num_threads = num_threads
    self.prefetch_batches = prefetch_batches
    self.worker_count = worker_count
    self.worker_buffer_size = worker_buffer_size

  def __len__(self):
    return self.num_steps

  def dataset(self, start=0):
    """grain IterDataset of the batches of steps [start, num_steps)."""
    ds = grain.MapDataset.range(start, self.num_steps).map(self.load_batch)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self.num_threads,
        prefetch_buffer_size=self.prefetch_batches if self.num_threads else 0))
    if self.worker_count > 0:
      _require_parsed_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.worker_count,
          per_worker_buffer_size=self.worker_buffer_size))
    return ds

  def __iter__(self):
    return TrainIterator(self)


class TrainIterator:
  """Iterator over TrainBatches whose state is the next step, {"step": n}.

  The state does not depend on threads, worker processes or the number of
  JAX processes, so a checkpoint resumes under any of them. The grain
  pipeline starts lazily at the first `next`, so `set_state` right after
  `iter` costs nothing.
  """

  def __init__(self, batches, step=0):
    self._batches = batches
    self._step = step
    self._it = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._step >= self._batches.num_steps:
      raise StopIteration
    if self._it is None:
      self._it = iter(self._batches.dataset(self._step))
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self):
    return {"step": self._step}

  def set_state(self, state):
    # "next_index" is the state grain's own iterator saved in older
    # checkpoints; with one batch per element it is the same step count.
    step = state.get("step", state.get("next_index")) if isinstance(
        state, dict) else None
    if step is None or not 0 <= int(step) <= self._batches.num_steps:
      raise ValueError(f"Data iterator state {state!r} is not a step in [0, "
                       f"{self._batches.num_steps}]; the checkpoint belongs to "
                       "another run configuration.")
    self.close()
    self._step = int(step)

  def close(self):
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()


def _require_parsed_flags():
  if not flags.FLAGS.is_parsed():
    raise RuntimeError(
        "train_dataset(worker_count>0) starts grain worker processes, which "
        "need absl flags parsed first: run under absl.app.run or call "
        "absl.flags.FLAGS(sys.argv) before iterating.")


def train_dataset(source, indices, preprocess, global_batch, num_steps, seed,
                  num_threads=4, *, worker_count=0, worker_buffer_size=2,
                  prefetch_batches=8, process_index=None, process_count=None):
  """This process's rows of `num_steps` global batches, as TrainBatches.

  Example order depends only on (seed, position), never on the number of
  processes: process p of P reads rows [p*B/P, (p+1)*B/P) of every global
  batch B. Augmentation randomness is seeded by (seed, global position).
  `process_index`/`process_count` default to JAX's (given explicitly in
  tests and benchmarks). `iter()` of the result has get_state/set_state.
  """
  if len(indices) == 0:
    raise ValueError(f"No training examples in split {source.split!r} for "
                     "this task; check the data set and the category lists.")
  nproc = jax.process_count() if process_count is None else int(process_count)
  pid = jax.process_index() if process_index is None else int(process_index)
  if global_batch % nproc:
    raise ValueError(f"Global batch {global_batch} is not divisible by the "
                     f"{nproc} processes; change the stage's batch_size.")
  if not 0 <= pid < nproc:
    raise ValueError(f"process_index={pid} is not in [0, {nproc}).")
  local_batch = global_batch // nproc
  loader = _BatchLoader(source=source, order=_EpochShuffled(indices, seed),
                        preprocess=preprocess, seed=seed,
                        global_batch=global_batch, local_batch=local_batch,
                        process_index=pid)
  return TrainBatches(loader, num_steps, num_threads=num_threads,
                      prefetch_batches=prefetch_batches,
                      worker_count=worker_count,
                      worker_buffer_size=worker_buffer_size)


def eval_arrays(source, indices, preprocess, desc="loading"):
  """Preprocessed examples stacked into numpy arrays (no augmentation)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  examples = [preprocess(source[i], rng=None, index=int(i))
              for i in tqdm(indices, desc=desc, leave=False,
                            # a support set loads in a blink: no bar
                            disable=jax.process_index() != 0 or
                            len(indices) < 500)]
  return _stack(examples)


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


# ----------------------------------------------------------------------------
# Data set.


# The built-in synthetic family that stands in for a data set without root.
SYNTHETIC_FAMILY = {"kermany": "chestxray", "kermany3": "chestxray",
                    "rsna": "chestxray", "busi": "busi"}


def open_dataset(data_config, data_dir):
  """Builds (once) and opens the configured data set.

  With `data_config.root`, the real data set `data_config.dataset` read from
  that folder; without it, the built-in synthetic family of the same
  modality (SYNTHETIC_FAMILY).
  """
  root = data_config.get("root")
  if root:
    from hica_jax.data import real  # pylint: disable=g-import-not-at-top
    is_manifest = data_config.dataset == "csv" and os.path.isfile(root)
    if not os.path.isdir(root) and not is_manifest:
      raise FileNotFoundError(
          f"config.data.root={root!r} is not a folder" +
          (" or a CSV file" if data_config.dataset == "csv" else "") +
          "; point it at the data set as downloaded.")
    if data_config.dataset == "csv" and not data_config.get("bank"):
      raise ValueError(
          "config.data.dataset='csv' has no built-in descriptor bank: set "
          "--config.data.bank to a bank JSON file (or a built-in bank name) "
          "whose categories are the manifest's labels.")
    try:
      options = json.loads(data_config.builder_options or "{}")
    except json.JSONDecodeError as e:
      raise ValueError("config.data.builder_options must be a JSON object, "
                       f"e.g. '{{\"val_fraction\": 0.1}}': {e}") from e
    builder, summary = real.build_dataset(
        data_config.dataset, root, data_dir, seed=data_config.split_seed,
        dedup=data_config.dedup, **options)
    if summary.get("skipped"):
      logging.warning("%s: %d files skipped while building (see %s).",
                      data_config.dataset, len(summary["skipped"]),
                      os.fspath(builder.data_dir))
    name = data_config.dataset
  else:
    from hica_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    family = SYNTHETIC_FAMILY.get(data_config.dataset)
    if family is None:
      raise ValueError(
          f"config.data.dataset={data_config.dataset!r} needs "
          "config.data.root (a folder or CSV manifest); the synthetic "
          f"stand-ins exist for {sorted(SYNTHETIC_FAMILY)}.")
    syn = data_config.synthetic
    builder = synthetic.build_synthetic(
        family, data_dir, image_size=data_config.image_size,
        num_train_per_class=syn.num_train_per_class,
        num_val_per_class=syn.num_val_per_class,
        num_test_per_class=syn.num_test_per_class,
        seed=syn.seed, difficulty=syn.difficulty)
    name = f"synthetic_{family}"
  bank = descriptors.load_bank(data_config.get("bank") or name)
  categories = list(builder.info.features["label"].names)
  unseen = [c for c in bank["unseen"] if c in categories]
  return DatasetHandle(name=name, builder=builder, categories=categories,
                       bank=bank, unseen=unseen)
