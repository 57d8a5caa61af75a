r"""Two runs of one eval grid that differ in a setting, paired seed by seed.

  python bench/paired_runs.py --out results/stage1_lr/kermany \
      --label_a "lr 1e-3" /tmp/curve/kermany_s800 \
      --label_b "lr 2e-3" /tmp/lr/kermany_lr2e3

Each run is a workdir whose `cells/` hold the eval stage's cached few-shot
cells (method, K, seed) and whose `report.json` holds the stage-2 model's
evaluation on all labels. The support sets of a (K, seed) depend only on
the data and the seed, so the two runs' cells pair up: for every method and
K in both, the mean balanced accuracy and AUC of each run and the paired
difference B - A with its 95% interval over seeds (`study.paired_delta`).
Writes `paired.json` and `paired.md` to --out. Nothing is trained here.
A method whose cells are equal in both runs (the pixel floor, which does
not read the model) has a difference of exactly 0: a check that the runs
share their support sets.

`--method_a no_stage1 --method_b hica` pairs two methods instead: run A's
cells of one with run B's of the other, over the K and seeds both hold
(e.g. stage 1 on against off: HiCA of a run against the no-stage-1
ablation of a study of the same data and split; that ablation does not
read stage 1, so any run's stage-1 length pairs with it).
"""
import argparse
import json
import os
import sys

import numpy as np

from hica_jax import testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stage1_curve  # noqa: E402  pylint: disable=g-import-not-at-top

METRICS = ("balanced_accuracy", "auc")


def all_labels(folder):
  """The stage-2 model on all labels of <folder>/report.json, or None."""
  path = os.path.join(folder, "report.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return stage1_curve.all_labels(json.load(f))


def compare(run_a, run_b, method_a=None, method_b=None):
  """{"rows": [{method, k, n, a, b, delta}], "all_labels": {a, b}}.

  Every method of both runs against itself, or (method_a and method_b
  given) run A's method_a against run B's method_b, named
  "<method_b> vs <method_a>"."""
  from hica_jax import study  # pylint: disable=g-import-not-at-top
  if (method_a is None) != (method_b is None):
    raise SystemExit("--method_a and --method_b go together.")
  a = stage1_curve.read_cells(run_a, method_a and (method_a,))
  b = stage1_curve.read_cells(run_b, method_b and (method_b,))
  if method_a is not None:
    name = f"{method_b} vs {method_a}"
    a = {(name, k, s): v for (_, k, s), v in a.items()}
    b = {(name, k, s): v for (_, k, s), v in b.items()}
  rows = []
  for method, k in sorted({(m, k) for m, k, _ in a} & {(m, k) for m, k, _ in b}):
    seeds = sorted(s for m, kk, s in a if (m, kk) == (method, k)
                   and (method, k, s) in b)
    runs_a = [a[(method, k, s)] for s in seeds]
    runs_b = [b[(method, k, s)] for s in seeds]
    rows.append(dict(
        method=method, k=k, n=len(seeds),
        a={m: float(np.mean([r[m] for r in runs_a])) for m in METRICS},
        b={m: float(np.mean([r[m] for r in runs_b])) for m in METRICS},
        delta=study.paired_delta(runs_b, runs_a)["balanced_accuracy"]))
  if not rows:
    raise SystemExit(f"{run_a} and {run_b} share no (method, K, seed) cell.")
  return {"rows": rows, "all_labels": {"a": all_labels(run_a),
                                       "b": all_labels(run_b)}}


def markdown(result, label_a, label_b):
  lines = [f"| method | K | seeds | {label_a} | {label_b} | "
           f"{label_b} − {label_a}, paired (95% interval) |",
           "|---|---|---|---|---|---|"]
  for r in result["rows"]:
    d = r["delta"]
    lines.append(
        f"| {r['method']} | {r['k']} | {r['n']} | "
        f"{r['a']['balanced_accuracy']:.3f} | "
        f"{r['b']['balanced_accuracy']:.3f} | {d['mean']:+.3f} "
        f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")
  al = result["all_labels"]
  if al["a"] and al["b"]:
    fmt = lambda v: f"{v['balanced_accuracy']:.3f} (AUC {v['auc']:.3f})"
    lines.append(f"| stage-2 model, all labels | | | {fmt(al['a'])} | "
                 f"{fmt(al['b'])} | |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run_a")
  parser.add_argument("run_b")
  parser.add_argument("--label_a", default="A")
  parser.add_argument("--label_b", default="B")
  parser.add_argument("--method_a", default=None,
                      help="pair this method of run_a (with --method_b)")
  parser.add_argument("--method_b", default=None,
                      help="with this method of run_b")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  result = compare(args.run_a, args.run_b, args.method_a, args.method_b)
  result.update(run_a=os.path.normpath(args.run_a), label_a=args.label_a,
                run_b=os.path.normpath(args.run_b), label_b=args.label_b,
                method_a=args.method_a, method_b=args.method_b)
  testing.write_report(args.out, "paired", result,
                       markdown(result, args.label_a, args.label_b))
  return result


if __name__ == "__main__":
  main()
