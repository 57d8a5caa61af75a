"""The tfds builder base of the real data sets.

A builder only says where the images of its layout are (a list of
`files.Item`s, with official splits where the data set has them). Everything
else is done here, once for every data set: probing every file (decoding it
once, in threads), hashing for duplicates, patient-grouped stratified
splits, the tfds builder (`RealBuilder`, whose config name fingerprints the
root, its files and the options, among them the bounded stored size every
builder takes) and the JSON summary of the build. Reading
the files themselves is `files`.
"""
import collections
import concurrent.futures
import hashlib
import itertools
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from hica_jax.data import schema
from hica_jax.data.real import files

SPLITS = ("train", "val", "test")  # As the synthetic builders name them.
SUMMARY_FILE = "build_summary.json"
# Options every real builder takes. stored_max_side: images whose long side
# exceeds it are stored downsampled to it (0: full size), because training
# decodes the stored PNG at every step and uses at most data.image_size of
# it; the default is base_config's c.data.stored_max_side, so a build made
# from the command line is the one training reuses.
COMMON_OPTIONS = {"stored_max_side": 256}


# ----------------------------------------------------------------------------
# Build helpers.


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


# The probe keeps the stored PNGs of the images it decodes, up to this
# many bytes, so that the writer need not decode them again (5856 X-rays
# stored at 256 px: 278 MB).
KEEP_STORED_BYTES = 1 << 30


def probe_items(items, log, workers, max_side=0, keep_bytes=None):
  """Decodes every item once; returns those that decode, with hash, shape
  (the file's), mode and ROI filled in, and `stored` (files.stored_pngs)
  while their total stays within keep_bytes (None: KEEP_STORED_BYTES).
  Undecodable images are logged as skipped. max_side: the stored bound
  (files.read_pil)."""
  keep_bytes = KEEP_STORED_BYTES if keep_bytes is None else keep_bytes
  kept_bytes = [0]

  def probe(item):
    try:
      rgb, mask, mode, rotated, warnings, shape = files.load_example_arrays(
          item, max_side)
    except files.BadImage as e:
      return item, None, str(e)
    item.hash, item.shape = files.pixel_hash(rgb), shape
    item.mode = mode
    item.exif_rotated, item.roi = rotated, bool(mask.any())
    # Read unlocked: a thread may encode one image past the budget, which
    # the loop below then drops.
    if kept_bytes[0] < keep_bytes:
      item.stored = files.stored_pngs(rgb, mask, max_side, shape)
    return item, warnings, None

  kept = []
  for item, warnings, error in ordered_map(probe, items, workers):
    if error is not None:
      log.skip(item.path, error)
      continue
    for path, message in warnings:
      log.warn(path, message)
    if item.stored is not None:
      size = sum(map(len, item.stored))
      if kept_bytes[0] + size > keep_bytes:
        item.stored = None
      else:
        kept_bytes[0] += size
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
  implement `scan(log) -> list[files.Item]` (resolving the layout under
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
    # Content digests of the root's files, kept beside the build.
    self._fingerprint_cache = (os.path.join(os.fspath(data_dir), "fingerprints")
                               if data_dir else None)
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
    known = {**COMMON_OPTIONS, **self.OPTIONS}
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise TypeError(f"{self.name}: unknown option(s) {unknown}; known: "
                      f"{sorted(known)} plus seed, dedup, workers.")
    options = {**known, **options}
    bound = options["stored_max_side"]
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
      raise ValueError(
          f"{self.name}: option stored_max_side={bound!r} must be an integer "
          ">= 0 (the long side, in pixels, above which images are stored "
          "downsampled; 0 stores them at full size).")
    return options

  def content_tag(self):
    """Part of the config name that changes when the data change: by
    default the fingerprint of every file under the root (names, sizes,
    contents), so an edited folder is built anew and a copied one is not."""
    return files.folder_fingerprint(self.root, self._fingerprint_cache)

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
    return schema.LocalDatasetInfo(
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
    log = files.BuildLog(self.root if os.path.isdir(self.root)
                         else os.path.dirname(self.root))
    items = self.scan(log)
    items = probe_items(items, log, self.workers,
                        self.options["stored_max_side"])
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
    image, mask = item.stored or self._stored_pngs(item)
    item.stored = None  # Written once; free it.
    return item.id, {
        "image": image,
        "mask": mask,
        "label": item.label,
        "text": item.text,
        "phrase": item.phrase if item.roi else "",
        "has_roi": np.int32(item.roi),
        "id": item.id,
        "patient_id": item.patient_id,
    }

  def _stored_pngs(self, item):
    bound = self.options["stored_max_side"]
    rgb, mask, _, _, _, shape = files.load_example_arrays(item, bound)
    return files.stored_pngs(rgb, mask, bound, shape)

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
  bound = builder.options["stored_max_side"]
  stored = [files.bounded_shape(it.shape, bound) for it in items]
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
      "stored": {"max_side": bound,
                 "downsampled": sum(s != tuple(it.shape)
                                    for s, it in zip(stored, items)),
                 "max_hw": [max(s[0] for s in stored),
                            max(s[1] for s in stored)]},
      "skipped": log.skipped,
      "skipped_by_reason": dict(sorted(reasons.items())),
      "warnings": log.warnings,
      "notes": log.notes,
  }
