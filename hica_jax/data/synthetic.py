"""Procedural chest-X-ray-like and breast-ultrasound-like data, as tfds builders.

The built-in default data of every run. Two families:
- "chestxray": grayscale radiograph look (body, lungs, heart, spine, ribs,
  clavicles, vessels) with lobar consolidation, interstitial opacities or a
  pleural effusion inside the lungs.
- "busi": speckled ultrasound look (skin, fat, fibroglandular tissue, muscle,
  Cooper ligaments, fat lobules) with oval/circumscribed, irregular/spiculated
  or anechoic masses.

The category structure comes from the descriptor bank
`banks/synthetic_<family>.json`: a category with local phrases is a lesion
class; each phrase is one lesion variant, rendered by
`synthetic_chestxray.LESIONS` / `synthetic_busi.LESIONS`, and is the
example's `phrase` verbatim. A category without phrases is normal (no ROI,
all-zero mask).

Class evidence is local: only the lesion (inside its mask, at its margin, and
the posterior acoustic column behind an ultrasound mass) depends on the label. Anatomy size
and position, brightness, contrast, gamma, blur, noise and distractors (rib
crossings, granulomas, nipple shadows, lead wires; fat lobules, ligaments) are
drawn from one distribution for every class. `difficulty` in [0, 1] lowers
lesion contrast, raises noise and makes the shape/texture parameters of the
classes overlap more.

This module holds the families and their category structure, `generate`
(labels -> images, masks, phrases), the tfds builders (`build_synthetic`) and
a contact sheet; the drawing is in `synthetic_chestxray`, `synthetic_busi`
and their shared `synthetic_fields`. Generation is vectorised numpy, seeded
per (seed, family, split) and deterministic. Records are written by a `tfds.core.GeneratorBasedBuilder` as
`array_record` with images/masks as PNG bytes, so no TensorFlow is needed to
write or read them.
"""
import dataclasses
import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from hica_jax.data import descriptors
from hica_jax.data import schema
from hica_jax.data import synthetic_busi
from hica_jax.data import synthetic_chestxray

FAMILIES = ("chestxray", "busi")
# From `git show 7ec2ded:bench/synthetic_difficulty.py` (since deleted): at
# 0.25 a small CNN trained from scratch on K=16 per class reaches ~0.6
# balanced accuracy (3 seen classes), far from saturation, while the ROI-crop
# oracle is ~0.95+.
DEFAULT_DIFFICULTY = 0.25
SPLITS = ("train", "val", "test")
# Images rendered at once: bounds memory (a few [chunk, H, W] f32 fields).
_CHUNK = 128


def bank_name(family):
  _check_family(family)
  return f"synthetic_{family}"


def _check_family(family):
  if family not in FAMILIES:
    raise ValueError(f"synthetic family {family!r} is unknown; use one of "
                     f"{FAMILIES}.")


def _check_params(image_size, difficulty):
  if not 0.0 <= difficulty <= 1.0:
    raise ValueError(f"synthetic difficulty={difficulty}: use a value in "
                     "[0, 1].")
  if image_size < 32:
    raise ValueError(f"synthetic image_size={image_size}: use at least 32 "
                     "(smaller lesions vanish).")


# family -> (render(rng, variant, size, difficulty, lesions), lesion renderers
# keyed by the bank's phrases).
_RENDER = {"chestxray": (synthetic_chestxray.render,
                         synthetic_chestxray.LESIONS),
           "busi": (synthetic_busi.render, synthetic_busi.LESIONS)}


# ----------------------------------------------------------------------------
# Category structure from the descriptor bank.


def category_variants(family):
  """(categories, unseen, {category: [phrase, ...]}) from the family's bank.

  Raises ValueError when a bank phrase has no renderer in its family's
  module (`_RENDER`).
  """
  bank = descriptors.load_bank(bank_name(family))
  lesions = _RENDER[family][1]
  cats = list(bank["categories"])
  phrases = {c: list(bank["categories"][c].get("phrases", [])) for c in cats}
  for c, ps in phrases.items():
    for p in ps:
      if p not in lesions:
        raise ValueError(
            f"bank {bank_name(family)}.json: phrase {p!r} of category {c!r} "
            f"has no renderer in hica_jax/data/synthetic_{family}.py; use "
            f"one of {sorted(lesions)} or add a renderer.")
  return cats, list(bank.get("unseen", [])), phrases


def generate(family, labels, *, image_size, seed, difficulty=DEFAULT_DIFFICULTY,
             stream=0, lesions=True):
  """Renders one image per label.

  Args:
    family: "chestxray" or "busi".
    labels: i32[N] category indices (bank order).
    image_size: side S in pixels.
    seed, stream: the random stream is SeedSequence([seed, family, stream]).
    difficulty: float in [0, 1].
    lesions: False renders the lesion-free twins of the same images (same
      anatomy, nuisance and noise; mask/phrase still say where and what the
      lesion would be): a counterfactual for locality checks.
  Returns dict: image u8[N,S,S] grayscale, mask u8[N,S,S] in {0, 255},
    phrase list[str] ("" without ROI), has_roi i32[N].
  """
  _check_family(family)
  _check_params(image_size, difficulty)
  render, renderers = _RENDER[family]
  cats, _, phrases = category_variants(family)
  labels = np.asarray(labels, np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= len(cats)):
    raise ValueError(f"labels must lie in [0, {len(cats)}) for {family}.")
  rng = np.random.default_rng(
      np.random.SeedSequence([seed, FAMILIES.index(family), stream]))
  names = list(renderers)
  variant = np.full(labels.shape, -1, np.int64)
  phrase = [""] * len(labels)
  for i, y in enumerate(labels):
    ps = phrases[cats[y]]
    if ps:
      p = ps[rng.integers(len(ps))]
      variant[i], phrase[i] = names.index(p), p
  images, masks = [], []
  for start in range(0, len(labels), _CHUNK):
    img, m = render(rng, variant[start:start + _CHUNK], image_size,
                    float(difficulty), lesions)
    images.append(np.round(img * 255).astype(np.uint8))
    masks.append(m.astype(np.uint8) * 255)
  shape = (0, image_size, image_size)
  image = np.concatenate(images) if images else np.zeros(shape, np.uint8)
  mask = np.concatenate(masks) if masks else np.zeros(shape, np.uint8)
  has_roi = (mask.reshape(len(labels), -1).max(-1) > 0).astype(np.int32)
  lost = np.flatnonzero(has_roi != (variant >= 0))
  if len(lost):
    raise RuntimeError(f"synthetic {family}: {len(lost)} lesion(s) rendered "
                       f"with an empty mask at image_size={image_size} "
                       "(a generator bug); try a larger image_size.")
  return dict(image=image, mask=mask, phrase=phrase, has_roi=has_roi)


# ----------------------------------------------------------------------------
# tfds builders.


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Generation parameters; the config name encodes all of them."""
  image_size: int = 64
  num_per_class: tuple = (150, 30, 60)  # train, val, test
  seed: int = 0
  difficulty: float = DEFAULT_DIFFICULTY


def make_config(*, image_size, num_per_class, seed, difficulty):
  """A config whose name (the data folder) is unique per parameter set."""
  _check_params(image_size, difficulty)
  difficulty = round(float(difficulty), 3)
  tr, va, te = (int(x) for x in num_per_class)
  name = (f"s{int(image_size)}_n{tr}-{va}-{te}_seed{int(seed)}"
          f"_d{int(round(difficulty * 1000)):04d}")
  return SyntheticConfig(name=name, image_size=int(image_size),
                         num_per_class=(tr, va, te), seed=int(seed),
                         difficulty=difficulty)


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
  """Shared builder; subclasses set FAMILY."""
  FAMILY = None
  # Bump when the generator's output changes, so old folders are not reused.
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [make_config(image_size=64, num_per_class=(150, 30, 60),
                                 seed=0, difficulty=DEFAULT_DIFFICULTY)]

  def _info(self):
    cats, unseen, _ = category_variants(self.FAMILY)
    cfg = self.builder_config
    return schema.LocalDatasetInfo(
        builder=self,
        description=(f"Procedural {self.FAMILY} data of hica-jax "
                     "(hica_jax/data/synthetic.py)."),
        features=schema.features(cats),
        metadata=tfds.core.MetadataDict(
            family=self.FAMILY, unseen=unseen, image_size=cfg.image_size,
            seed=cfg.seed, difficulty=cfg.difficulty))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in
            zip(SPLITS, self.builder_config.num_per_class)}

  def _generate_examples(self, split, num_per_class):
    cfg = self.builder_config
    cats, _, _ = category_variants(self.FAMILY)
    labels = np.repeat(np.arange(len(cats)), num_per_class)
    data = generate(self.FAMILY, labels, image_size=cfg.image_size,
                    seed=cfg.seed, difficulty=cfg.difficulty,
                    stream=SPLITS.index(split))
    for i, y in enumerate(labels):
      key = f"{self.FAMILY}-{split}-{i:06d}"
      yield key, {
          "image": _png(np.repeat(data["image"][i][..., None], 3, axis=-1)),
          "mask": _png(data["mask"][i]),
          "label": int(y),
          "text": "",
          "phrase": data["phrase"][i],
          "has_roi": int(data["has_roi"][i]),
          "id": key,
          "patient_id": "",
      }


class SyntheticChestxray(_SyntheticBuilder):
  """Chest-X-ray-like procedural data (tfds name `synthetic_chestxray`)."""
  FAMILY = "chestxray"


class SyntheticBusi(_SyntheticBuilder):
  """Breast-ultrasound-like procedural data (tfds name `synthetic_busi`)."""
  FAMILY = "busi"


BUILDERS = {"chestxray": SyntheticChestxray, "busi": SyntheticBusi}


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def build_synthetic(family, data_dir, *, image_size=64, num_train_per_class=150,
                    num_val_per_class=30, num_test_per_class=60, seed=0,
                    difficulty=DEFAULT_DIFFICULTY):
  """Builds the family's array_record data once and returns its builder.

  The data lives in data_dir/synthetic_<family>/<config name>/<version>; the
  config name encodes every parameter, so different parameters never share a
  folder, and an existing folder is reused. Read it with
  `builder.as_data_source(split)` (no TensorFlow needed).
  """
  _check_family(family)
  config = make_config(
      image_size=image_size, seed=seed, difficulty=difficulty,
      num_per_class=(num_train_per_class, num_val_per_class,
                     num_test_per_class))
  if min(config.num_per_class) < 1:
    raise ValueError("synthetic num_{train,val,test}_per_class must be >= 1, "
                     f"got {config.num_per_class}.")
  # tfds refuses a custom config named like a registered one: pass the name.
  registered = {c.name for c in BUILDERS[family].BUILDER_CONFIGS}
  builder = BUILDERS[family](
      data_dir=data_dir,
      config=config.name if config.name in registered else config,
      file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


# ----------------------------------------------------------------------------
# Contact sheet.


def contact_sheet(family, path=None, *, n_per_class=4, image_size=96, seed=0,
                  difficulty=DEFAULT_DIFFICULTY):
  """PNG grid: one row per category, each example plain and with its mask.

  Returns the path written (default /tmp/synthetic_<family>.png).
  """
  path = path or f"/tmp/synthetic_{family}.png"
  cats, unseen, _ = category_variants(family)
  labels = np.repeat(np.arange(len(cats)), n_per_class)
  data = generate(family, labels, image_size=image_size, seed=seed,
                  difficulty=difficulty, stream=99)
  s, label_w, text_h, gap = image_size, 120, 30, 6
  tile_w = 2 * s + gap
  sheet = Image.new("RGB", (label_w + n_per_class * tile_w,
                            len(cats) * (s + text_h + gap)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for i, y in enumerate(labels):
    row, col = y, i % n_per_class
    x0, y0 = label_w + col * tile_w, row * (s + text_h + gap)
    gray = np.repeat(data["image"][i][..., None], 3, axis=-1)
    m = data["mask"][i] > 0
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    overlay = gray.copy()
    overlay[m] = (0.6 * overlay[m] + 0.4 * np.array([255, 0, 0])).astype(
        np.uint8)
    overlay[m & ~inner] = (255, 40, 40)
    sheet.paste(Image.fromarray(gray), (x0, y0))
    sheet.paste(Image.fromarray(overlay), (x0 + s, y0))
    caption = "\n".join(textwrap.wrap(data["phrase"][i] or "(no ROI)",
                                      width=max(10, tile_w // 6))[:2])
    draw.text((x0, y0 + s + 1), caption, fill=(0, 0, 0))
    if col == 0:
      name = cats[y].replace("_", " ") + (
          " (unseen)" if cats[y] in unseen else "")
      draw.text((4, y0 + s // 2), "\n".join(textwrap.wrap(name, 18)),
                fill=(0, 0, 0))
  sheet.save(path)
  return path
