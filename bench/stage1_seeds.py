r"""How far one stage-1 run's few-shot figures move with the stage-1 seed.

  python bench/stage1_seeds.py --out results/stage1_seeds/kermany \
      /tmp/s1200/kermany_s1200 /tmp/seeds/kermany_seed1 /tmp/seeds/kermany_seed2

Each argument is a workdir of the same command that differs only in
`--config.seed` (the towers' initialisation, stage 1's batch order and
views; the data split and the few-shot support sets do not depend on it).
Every comparison of two stage-1 settings in `results/` pairs over few-shot
seeds on one stage-1 run per setting, so its interval leaves out how much
a second stage-1 run of the same setting would move. This measures that:
for every method and K cached in all runs, each run's mean over the
few-shot seeds, the mean and standard deviation of those means across
runs, their range, and the paired difference of every run to the first
(`study.paired_delta`, 95% interval over few-shot seeds), so that a
reader can see whether such an interval excludes zero between two runs of
one setting; and per run HiCA's paired lead over the pixel floor,
supervised CE and the frozen linear probe, with its mean and spread across
runs. Writes `seeds.json` and `seeds.md` to --out; nothing is trained
here.
"""
import argparse
import os
import sys

import numpy as np

from hica_jax import testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paired_runs  # noqa: E402  pylint: disable=g-import-not-at-top
import stage1_curve  # noqa: E402  pylint: disable=g-import-not-at-top


def spread(runs):
  """{"rows": [{method, k, n_seeds, run_means, mean, std, range,
  minus_first: [paired delta per later run]}], "all_labels": [per run]}.

  A (method, K) enters when every run holds the same few-shot seeds of it.
  """
  if len(runs) < 2:
    raise SystemExit("Pass at least two workdirs of one command that "
                     "differ only in --config.seed.")
  from hica_jax import study  # pylint: disable=g-import-not-at-top
  cells = [stage1_curve.read_cells(r) for r in runs]
  keys = set.intersection(*({(m, k) for m, k, _ in c} for c in cells))
  rows = []
  for method, k in sorted(keys):
    seeds = sorted(set.intersection(*(
        {s for m, kk, s in c if (m, kk) == (method, k)} for c in cells)))
    per_run = [[c[(method, k, s)] for s in seeds] for c in cells]
    means = [float(np.mean([x["balanced_accuracy"] for x in r]))
             for r in per_run]
    rows.append(dict(
        method=method, k=k, n_seeds=len(seeds), run_means=means,
        mean=float(np.mean(means)), std=float(np.std(means, ddof=1)),
        range=float(max(means) - min(means)),
        minus_first=[study.paired_delta(r, per_run[0])["balanced_accuracy"]
                     for r in per_run[1:]]))
  if not rows:
    raise SystemExit(f"{runs} share no (method, K) cell.")
  return {"rows": rows, "hica_minus": hica_minus(cells),
          "all_labels": [paired_runs.all_labels(r) for r in runs]}


def hica_minus(cells):
  """[{baseline, k, per_run: paired mean of HiCA - baseline in each run,
  mean, std}]: whether HiCA's lead over a baseline holds from one stage-1
  run to the next."""
  from hica_jax import study  # pylint: disable=g-import-not-at-top
  out = []
  for baseline in ("pixel_probe", "supervised_ce", "linear_probe"):
    for k in sorted({k for c in cells for m, k, _ in c if m == "hica"}):
      per_run = []
      for c in cells:
        seeds = sorted(s for m, kk, s in c if (m, kk) == ("hica", k)
                       and (baseline, k, s) in c)
        if not seeds:
          break
        per_run.append(study.paired_delta(
            [c[("hica", k, s)] for s in seeds],
            [c[(baseline, k, s)] for s in seeds])["balanced_accuracy"]["mean"])
      if len(per_run) == len(cells):
        out.append(dict(baseline=baseline, k=k, per_run=per_run,
                        mean=float(np.mean(per_run)),
                        std=float(np.std(per_run, ddof=1))))
  return out


def markdown(result, labels):
  head = (["method", "K", "few-shot seeds"] + labels +
          ["mean", "std across runs", "range"] +
          [f"{b} − {labels[0]}, paired (95% interval)" for b in labels[1:]])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in result["rows"]:
    cells = [r["method"], str(r["k"]), str(r["n_seeds"])]
    cells += [f"{m:.3f}" for m in r["run_means"]]
    cells += [f"{r['mean']:.3f}", f"{r['std']:.3f}", f"{r['range']:.3f}"]
    cells += [f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
              for d in r["minus_first"]]
    lines.append("| " + " | ".join(cells) + " |")
  for r in result["hica_minus"]:
    lines.append(f"| hica − {r['baseline']} (paired, per run) | {r['k']} | "
                 "| " + " | ".join(f"{d:+.3f}" for d in r["per_run"]) +
                 f" | {r['mean']:+.3f} | {r['std']:.3f} | "
                 f"{max(r['per_run']) - min(r['per_run']):.3f} |" +
                 " |" * (len(r["per_run"]) - 1))
  al = result["all_labels"]
  if all(al):
    vals = [v["balanced_accuracy"] for v in al]
    lines.append("| stage-2 model, all labels | | | " + " | ".join(
        f"{v['balanced_accuracy']:.3f} (AUC {v['auc']:.3f})" for v in al) +
                 f" | {np.mean(vals):.3f} | {np.std(vals, ddof=1):.3f} | "
                 f"{max(vals) - min(vals):.3f} |" + " |" * (len(al) - 1))
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+")
  parser.add_argument("--labels", default="",
                      help="comma-separated column names (default: seed 0, "
                      "seed 1, ...)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  labels = ([s.strip() for s in args.labels.split(",")] if args.labels
            else [f"seed {i}" for i in range(len(args.runs))])
  if len(labels) != len(args.runs):
    raise SystemExit(f"--labels names {len(labels)} runs; "
                     f"{len(args.runs)} were given.")
  result = spread(args.runs)
  result.update(runs=[os.path.normpath(r) for r in args.runs], labels=labels)
  testing.write_report(args.out, "seeds", result, markdown(result, labels))
  return result


if __name__ == "__main__":
  main()
