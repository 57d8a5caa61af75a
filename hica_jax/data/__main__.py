"""Data set command line.

  python -m hica_jax.data build --dataset busi --root PATH [--data_dir DIR]
      [--seed N] [--dedup] [--option key=value ...]

builds the data set once (a second run reuses it) and prints the JSON
summary, which is also saved as build_summary.json next to the data. Images
are stored with a long side of at most 256 px, as a run with the default
config stores them (`--option stored_max_side=0` keeps full size).
"""
import argparse
import contextlib
import json
import sys


def _value(text):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text  # A bare string such as a bank name.


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m hica_jax.data")
  sub = parser.add_subparsers(dest="command", required=True)
  build = sub.add_parser("build", help="build a real data set into tfds")
  build.add_argument("--dataset", required=True,
                     choices=["kermany", "kermany3", "busi", "rsna", "csv"])
  build.add_argument("--root", required=True,
                     help="the data set folder as downloaded (for csv: the "
                     "manifest or its folder)")
  build.add_argument("--data_dir", default=None,
                     help="tfds data dir (default $TFDS_DATA_DIR or "
                     "~/tensorflow_datasets)")
  build.add_argument("--seed", type=int, default=0, help="split seed")
  build.add_argument("--dedup", action="store_true",
                     help="drop repeated copies of identical images")
  build.add_argument("--option", action="append", default=[],
                     metavar="KEY=VALUE", help="builder option, value as JSON "
                     "(e.g. val_fraction=0.2, categories='[\"a\",\"b\"]')")
  args = parser.parse_args(argv)

  options = {}
  for kv in args.option:
    key, sep, value = kv.partition("=")
    if not sep:
      parser.error(f"--option {kv!r}: expected KEY=VALUE")
    options[key] = _value(value)
  from hica_jax.data import real  # pylint: disable=g-import-not-at-top
  # tfds prints progress on stdout; stdout carries only the JSON summary.
  try:
    with contextlib.redirect_stdout(sys.stderr):
      _, summary = real.build_dataset(args.dataset, args.root, args.data_dir,
                                      seed=args.seed, dedup=args.dedup,
                                      **options)
  except (FileNotFoundError, ValueError, TypeError) as e:
    sys.stderr.write(f"error: {e}\n")  # The message names the path or field.
    return 2
  json.dump(summary, sys.stdout, indent=1)
  sys.stdout.write("\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
