"""Input pipelines: tfds array_record sources read through grain.

Everything a step consumes comes from here: decoding (Pillow, no TensorFlow),
aspect-preserving resize and pad, normalisation, augmentation, descriptor
sentence sampling, tokenisation and batching. Training iterators are grain
datasets whose example order is a pure function of (seed, position): the same
seed gives the same batches, each process reads only its own rows of every
global batch, and the iterator state (saved in checkpoints) resumes exactly.
"""
import dataclasses
import io
import json
import os

import grain
from absl import logging
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from hica_jax import tokenizer as tokenizer_lib
from hica_jax.data import descriptors

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
  desc_category: i32[D] its class index; phrase_ids/phrase_mask: i32[P+1, Lp]
  every local phrase of the bank, the last row the empty phrase.
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
                    max_len=max_len)


def text_corpus(bank, extra_texts=()):
  """Every sentence and phrase of a bank plus extra texts (reports)."""
  out = []
  for entry in bank["categories"].values():
    out.extend(entry["sentences"])
    out.extend(entry.get("phrases", []))
  out.extend(t for t in extra_texts if t)
  return out


# ----------------------------------------------------------------------------
# Image preprocessing.


def decode_image(data):
  """Encoded bytes (or array) -> u8[H, W, 3]."""
  if isinstance(data, np.ndarray):
    arr = data
  else:
    with Image.open(io.BytesIO(data)) as im:
      arr = np.asarray(im.convert("RGB") if im.mode != "L" else im)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  return arr[..., :3].astype(np.uint8)


def decode_mask(data):
  """Encoded bytes (or array) -> bool[H, W]."""
  if isinstance(data, np.ndarray):
    arr = data
  else:
    with Image.open(io.BytesIO(data)) as im:
      arr = np.asarray(im)
  if arr.ndim == 3:
    arr = arr.max(-1)
  return arr > 0


def resize_and_pad(image, mask, size):
  """Aspect-preserving resize of the long side to `size`, centred zero pad."""
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


def augment(image, mask, rng, aug):
  """Mild geometric and photometric augmentation. image u8[S,S,3], mask bool."""
  size = image.shape[0]
  pil_im = Image.fromarray(image)
  pil_mk = Image.fromarray(mask.astype(np.uint8) * 255)
  lo, hi = aug.get("crop_scale", (1.0, 1.0))
  if hi < 1.0 or lo < 1.0:
    scale = rng.uniform(lo, hi)
    crop = max(8, int(round(size * np.sqrt(scale))))
    top = rng.integers(0, size - crop + 1)
    left = rng.integers(0, size - crop + 1)
    box = (left, top, left + crop, top + crop)
    pil_im = pil_im.resize((size, size), Image.BILINEAR, box=box)
    pil_mk = pil_mk.resize((size, size), Image.NEAREST, box=box)
  angle = aug.get("rotate", 0.0)
  if angle:
    a = rng.uniform(-angle, angle)
    pil_im = pil_im.rotate(a, resample=Image.BILINEAR)
    pil_mk = pil_mk.rotate(a, resample=Image.NEAREST)
  if aug.get("hflip", False) and rng.random() < 0.5:
    pil_im = pil_im.transpose(Image.FLIP_LEFT_RIGHT)
    pil_mk = pil_mk.transpose(Image.FLIP_LEFT_RIGHT)
  image = np.asarray(pil_im).astype(np.float32) / 255.0
  mask = np.asarray(pil_mk) > 0
  b, c = aug.get("brightness", 0.0), aug.get("contrast", 0.0)
  if b or c:
    mean = image.mean()
    image = (image - mean) * rng.uniform(1 - c, 1 + c) + mean
    image = image + rng.uniform(-b, b)
  speckle = aug.get("speckle", 0.0)
  if speckle:
    image = image * (1.0 + speckle * rng.standard_normal(image.shape[:2]))[..., None]
  return np.clip(image, 0.0, 1.0), mask


@dataclasses.dataclass
class Preprocessor:
  """Record -> training/eval example (numpy) for one task.

  `class_of` maps the data set's label index to the task's class index.
  """
  tables: TextTables
  class_of: dict
  image_size: int
  mean: tuple = (0.5, 0.5, 0.5)
  std: tuple = (0.5, 0.5, 0.5)
  aug: dict = None

  def __call__(self, record, rng=None, index=-1):
    image = decode_image(record["image"])
    mask = decode_mask(record["mask"])
    if mask.shape != image.shape[:2]:
      mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
          image.shape[1::-1], Image.NEAREST)) > 0
    image, mask = resize_and_pad(image, mask, self.image_size)
    if rng is not None and self.aug:
      image, mask = augment(image, mask, rng, self.aug)
    else:
      image = image.astype(np.float32) / 255.0
    image = (image - np.asarray(self.mean, np.float32)) / np.asarray(
        self.std, np.float32)
    label = self.class_of[int(record["label"])]
    t = self.tables
    text = _as_str(record.get("text", b""))
    if text:
      text_ids, text_mask = tokenizer_lib.tokenize(t.tokenizer, [text],
                                                   t.max_len)
      text_ids, text_mask = text_ids[0], text_mask[0]
    else:
      rows = t.sentence_rows(label)
      row = rows[rng.integers(len(rows))] if rng is not None else rows[0]
      text_ids, text_mask = t.desc_ids[row], t.desc_mask[row]
    prow, pid = t.phrase_row(_as_str(record.get("phrase", b"")))
    has_roi = float(int(record.get("has_roi", 0)) > 0 and mask.any())
    return {
        "image": image.astype(np.float32),
        "roi_mask": mask.astype(np.float32),
        "has_roi": np.float32(has_roi),
        "label": np.int32(label),
        "text_ids": text_ids.astype(np.int32),
        "text_mask": text_mask.astype(np.int32),
        "phrase_ids": t.phrase_ids[prow],
        "phrase_mask": t.phrase_mask[prow],
        "phrase_id": np.int32(pid if has_roi else -1),
        "index": np.int32(index),
    }


# ----------------------------------------------------------------------------
# Iterators.


class _EpochShuffled:
  """Global example position -> record index: a fresh permutation per epoch."""

  def __init__(self, indices, seed):
    self.indices = np.asarray(indices)
    self.seed = seed
    self._cache = (None, None)

  def __call__(self, position):
    n = len(self.indices)
    epoch, offset = divmod(int(position), n)
    if self._cache[0] != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(n)
      self._cache = (epoch, perm)
    return int(self.indices[self._cache[1][offset]])


def train_dataset(source, indices, preprocess, global_batch, num_steps, seed,
                  num_threads=4):
  """grain IterDataset of this process's rows of `num_steps` global batches.

  Example order depends only on (seed, position), never on the number of
  processes: process p of P reads rows [p*B/P, (p+1)*B/P) of every global
  batch. Augmentation randomness is seeded by (seed, global position).
  """
  if len(indices) == 0:
    raise ValueError(f"No training examples in split {source.split!r} for "
                     "this task; check the data set and the category lists.")
  nproc, pid = jax.process_count(), jax.process_index()
  local_batch = global_batch // nproc
  order = _EpochShuffled(indices, seed)

  def load(local_position):
    step, row = divmod(local_position, local_batch)
    position = step * global_batch + pid * local_batch + row
    rng = np.random.default_rng([seed, 1, position])
    return preprocess(source[order(position)], rng=rng, index=order(position))

  ds = grain.MapDataset.range(num_steps * local_batch).map(load)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=8))


def eval_arrays(source, indices, preprocess, desc="loading"):
  """Preprocessed examples stacked into numpy arrays (no augmentation)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  examples = [preprocess(source[i], rng=None, index=int(i))
              for i in tqdm(indices, desc=desc, leave=False,
                            disable=jax.process_index() != 0)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def normalization(name):
  """(mean, std) matching a tower checkpoint family: 'clip' or 'half'."""
  if name == "clip":
    return CLIP_MEAN, CLIP_STD
  if name == "imagenet":
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  if name == "half":
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
  raise ValueError(f"config.data.normalization={name!r}: use 'clip', "
                   "'imagenet' or 'half'.")


def open_dataset(data_config, data_dir):
  """Builds (once) and opens the configured data set.

  Without `data_config.root` this is the built-in synthetic family
  `data_config.family`; with it, the real data set `data_config.dataset`
  read from that folder.
  """
  root = data_config.get("root")
  if root:
    from hica_jax.data import real  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(root):
      raise FileNotFoundError(f"config.data.root={root!r} is not a folder; "
                              "point it at the data set as downloaded.")
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
    syn = data_config.synthetic
    builder = synthetic.build_synthetic(
        data_config.family, data_dir, image_size=data_config.image_size,
        num_train_per_class=syn.num_train_per_class,
        num_val_per_class=syn.num_val_per_class,
        num_test_per_class=syn.num_test_per_class,
        seed=syn.seed, difficulty=syn.difficulty)
    name = f"synthetic_{data_config.family}"
  bank = descriptors.load_bank(data_config.get("bank") or name)
  categories = list(builder.info.features["label"].names)
  unseen = [c for c in bank["unseen"] if c in categories]
  return DatasetHandle(name=name, builder=builder, categories=categories,
                       bank=bank, unseen=unseen)
