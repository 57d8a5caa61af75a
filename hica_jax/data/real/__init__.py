"""Real data sets as users have them on disk, built into tfds array_record.

`build_dataset(name, root, data_dir)` is the one entry point; the builders
(one module per layout) share `files` (reading what is on disk) and
`common` (the tfds builder base).
"""
import os

from hica_jax.data.real import busi
from hica_jax.data.real import common
from hica_jax.data.real import csv_manifest
from hica_jax.data.real import kermany
from hica_jax.data.real import rsna

BUILDERS = {
    "kermany": kermany.HicaKermany,
    "kermany3": kermany.HicaKermany3,
    "busi": busi.HicaBusi,
    "rsna": rsna.HicaRsna,
    "csv": csv_manifest.HicaCsv,
}


def build_dataset(name, root, data_dir, *, seed=0, dedup=False, **kw):
  """Builds data set `name` from the folder `root` once; returns
  (tfds builder, summary).

  name: one of BUILDERS; root: the data set as downloaded (any nesting);
  data_dir: where tfds writes (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
  seed: seeds the splits; dedup: drop all but the first copy (by split order
  train, val, test) of identical images. `kw` are the builder's
  options (e.g. `val_fraction`, `fractions`, `categories`, `bank`, `workers`;
  every builder takes `stored_max_side`, the long side above which images
  are stored downsampled, 0 for full size: common.COMMON_OPTIONS).

  A second call with the same arguments reuses the prepared data. The
  summary (also saved as build_summary.json next to the data) holds images
  per split and class, masks, files skipped with the reason for each,
  duplicates, patients in two splits, image modes, source and stored sizes
  (the bound and how many images were downsampled), notes and warnings.
  """
  if name not in BUILDERS:
    raise ValueError(f"Unknown data set {name!r}; choose one of "
                     f"{sorted(BUILDERS)}.")
  builder = BUILDERS[name](root=root, data_dir=data_dir, seed=seed,
                           dedup=dedup, **kw)
  if builder.is_prepared():
    summary = builder.read_summary()
    if summary is None:
      raise FileNotFoundError(
          f"{builder.data_dir} is prepared but has no {common.SUMMARY_FILE}; "
          "delete that folder to rebuild.")
    summary["reused"] = True
    return builder, summary
  if not os.path.isdir(builder.root) and not os.path.isfile(builder.root):
    raise FileNotFoundError(f"Data set root {builder.root} does not exist; "
                            "point it at the data set folder as downloaded.")
  builder.download_and_prepare()
  summary = dict(builder.summary, reused=False)
  for split, counts in summary["splits"].items():
    written = builder.info.splits[split].num_examples
    if written != counts["total"]:
      raise RuntimeError(f"{builder.data_dir}: split {split} has {written} "
                         f"records, planned {counts['total']}.")
  return builder, summary


def summary_path(builder):
  return os.path.join(os.fspath(builder.data_dir), common.SUMMARY_FILE)
