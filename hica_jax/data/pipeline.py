"""Input pipelines: tfds array_record sources read through grain.

A prepared data set (`open_dataset` -> `DatasetHandle`: the real one under
config.data.root or the built-in synthetic family), random access to its
splits (`SplitSource`), and the batches a step consumes. A training run's
batches (`train_dataset`) are a grain MapDataset of steps read by loader
threads and, optionally, worker processes; each record becomes an example
through a preprocessing callable (`preprocess.Preprocessor`). The records of
a step and their augmentation are a pure function of (seed, global
position): the same seed gives the same batches, each process reads only its
rows of every global batch, and the iterator state ({"step": n}, saved in
checkpoints) resumes exactly, under any number of threads, workers or
processes. `eval_arrays` stacks examples for evaluation (no augmentation).
"""
import dataclasses
import json
import os

import grain
from absl import flags
from absl import logging
import jax
import numpy as np
import tensorflow_datasets as tfds

from hica_jax.data import descriptors


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


# ----------------------------------------------------------------------------
# Batches: training iterators and evaluation arrays.


def _stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


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
# Data set.


# The built-in synthetic family that stands in for a data set without root.
SYNTHETIC_FAMILY = {"kermany": "chestxray", "kermany3": "chestxray",
                    "rsna": "chestxray", "busi": "busi"}


def unseen_categories(spec, bank, categories):
  """config.data.unseen -> the categories held out of both training stages.

  "" (default): none, every category is classified; "bank": the categories
  the descriptor bank suggests for the unseen-category experiment (the
  study's `:study` arg); else comma-separated category names.
  """
  if spec == "bank":
    return [c for c in bank.get("unseen", []) if c in categories]
  names = [n.strip() for n in spec.split(",") if n.strip()]
  unknown = [n for n in names if n not in categories]
  if unknown:
    raise ValueError(f"config.data.unseen={spec!r}: {unknown} are not "
                     f"categories of this data set {categories}; use \"\", "
                     "\"bank\" or some of those names.")
  if len(names) >= len(categories) - 1:
    raise ValueError(f"config.data.unseen={spec!r} leaves fewer than two "
                     "categories to train on.")
  return names


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
    if "stored_max_side" in options:
      raise ValueError(
          "config.data.builder_options sets stored_max_side; set "
          "config.data.stored_max_side instead (one place for the bound).")
    builder, summary = real.build_dataset(
        data_config.dataset, root, data_dir, seed=data_config.split_seed,
        dedup=data_config.dedup, stored_max_side=data_config.stored_max_side,
        **options)
    stored = summary["stored"]
    logging.info("%s: %d images %s in %s; %s.", data_config.dataset,
                 summary["images"],
                 "reused" if summary.get("reused") else "built",
                 os.fspath(builder.data_dir),
                 f"stored long side <= {stored['max_side']}: "
                 f"{stored['downsampled']} downsampled"
                 if stored["max_side"] else "stored at full size")
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
  unseen = unseen_categories(data_config.get("unseen") or "", bank,
                             categories)
  return DatasetHandle(name=name, builder=builder, categories=categories,
                       bank=bank, unseen=unseen)
