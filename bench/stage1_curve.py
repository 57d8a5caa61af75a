r"""Few-shot accuracy against stage-1 steps, from finished runs' reports.

  python bench/stage1_curve.py --out results/stage1_steps/kermany \
      /tmp/curve/kermany_s1600 /tmp/curve/kermany_s3200 \
      results/kermany_study

Each argument is a workdir (or a folder) holding a `report.json` of a run
that differs from the others only in `stage1.steps`. Writes to --out:
`curve.json` (per run: stage-1 steps and seconds, and for every method and K
the balanced accuracy and AUC with their 95% intervals over seeds; HiCA minus
the pixel floor and minus supervised CE, paired seed by seed, from the
study's section or the workdir's cached cells; the stage-2 model trained on
all labels), `curve.md` (the same as a table) and
`curve.png` (balanced accuracy against stage-1 steps per method and K, the
pixel floor dashed). Nothing is trained here: the numbers are the reports'.
"""
import argparse
import glob
import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METHODS = ("hica", "supervised_ce", "linear_probe", "pixel_probe")
BASELINES = ("pixel_probe", "supervised_ce")


def read_cells(folder, methods=None):
  """{(method, K, seed): metrics} of <folder>/cells (the eval stage's cached
  cells), for `methods` (None: every few-shot method). Two cells of one
  (method, K, seed), e.g. from runs of other settings in the same workdir,
  cannot be told apart here: that fails, naming them."""
  metrics, seen = {}, {}
  for path in sorted(glob.glob(os.path.join(folder, "cells", "*.json"))):
    with open(path) as f:
      cell = json.load(f)
    params = cell.get("params", {})
    method = cell["name"].rsplit("_K", 1)[0]
    if "k" not in params or (methods is not None and method not in methods):
      continue
    key = (method, params["k"], params["seed"])
    if key in seen:
      raise SystemExit(f"{folder}: two cells of {key}: {seen[key]} and "
                       f"{path}; pass a workdir that holds one run's cells.")
    seen[key] = path
    metrics[key] = cell["result"]["metrics"]
  return metrics


def paired_from_cells(folder):
  """{K: {baseline: summary of HiCA minus it}} from <folder>/cells, seed by
  seed."""
  from hica_jax import study  # pylint: disable=g-import-not-at-top
  metrics = read_cells(folder, ("hica",) + BASELINES)
  out = {}
  for k in sorted({k for _, k, _ in metrics}):
    for base in BASELINES:
      seeds = sorted(s for m, kk, s in metrics if m == "hica" and kk == k
                     and (base, k, s) in metrics)
      if seeds:
        out.setdefault(str(k), {})[base] = study.paired_delta(
            [metrics[("hica", k, s)] for s in seeds],
            [metrics[(base, k, s)] for s in seeds])["balanced_accuracy"]
  return out


def all_labels(report):
  """{balanced_accuracy, auc} of a report's stage-2 model evaluated on the
  test split after training on all labels, or None."""
  s2 = report.get("stage2_eval") or {}
  if "balanced_accuracy" not in s2:
    return None
  return {m: s2[m] for m in ("balanced_accuracy", "auc")}


def read_point(folder):
  """One run's row: stage-1 steps and seconds, per K and method the summaries."""
  with open(os.path.join(folder, "report.json")) as f:
    report = json.load(f)
  stage1 = report["stages"]["stage1"]
  point = {"source": os.path.normpath(folder), "config_name":
           report["config_name"], "stage1_steps": stage1["steps"],
           "stage1_seconds": round(stage1["seconds"], 1), "few_shot": {}}
  for k, methods in report["few_shot"].items():
    point["few_shot"][k] = {
        m: {metric: {key: methods[m][metric][key]
                     for key in ("mean", "std", "ci95", "n")}
            for metric in ("balanced_accuracy", "auc")}
        for m in METHODS if m in methods}
  if "versus" in report:   # a study: its paired section
    point["hica_minus"] = {k: {b: v[b]["balanced_accuracy"] for b in BASELINES
                               if b in v} for k, v in report["versus"].items()}
  else:
    point["hica_minus"] = paired_from_cells(folder)
  al = all_labels(report)
  if al:
    point["all_labels"] = al
  return point


def markdown(points):
  ks = sorted({int(k) for p in points for k in p["few_shot"]})
  head = ["stage-1 steps", "stage-1 s"]
  for k in ks:
    head += [f"{m} K={k}" for m in METHODS]
  head += [f"HiCA − {b} K={k}" for k in ks for b in BASELINES]
  head += ["all labels (stage-2 model)"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for p in points:
    cells = [str(p["stage1_steps"]), f"{p['stage1_seconds']:.0f}"]
    for k in ks:
      for m in METHODS:
        s = p["few_shot"].get(str(k), {}).get(m)
        cells.append("" if s is None else
                     f"{s['balanced_accuracy']['mean']:.3f} ± "
                     f"{s['balanced_accuracy']['std']:.3f}")
    for k in ks:
      for b in BASELINES:
        d = p.get("hica_minus", {}).get(str(k), {}).get(b)
        cells.append("" if d is None else f"{d['mean']:+.3f} "
                     f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    al = p.get("all_labels")
    cells.append("" if not al else f"{al['balanced_accuracy']:.3f} "
                 f"(AUC {al['auc']:.3f})")
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def plot(points, path):
  ks = sorted({int(k) for p in points for k in p["few_shot"]})
  fig = Figure(figsize=(4.4 * len(ks), 3.6), layout="constrained")
  FigureCanvasAgg(fig)
  steps = np.asarray([p["stage1_steps"] for p in points], float)
  for i, k in enumerate(ks):
    ax = fig.add_subplot(1, len(ks), i + 1)
    for m in METHODS:
      got = [(s, p["few_shot"][str(k)][m]["balanced_accuracy"])
             for s, p in zip(steps, points) if m in p["few_shot"].get(str(k), {})]
      if not got:
        continue
      x = np.asarray([g[0] for g in got])
      mean = np.asarray([g[1]["mean"] for g in got])
      std = np.asarray([g[1]["std"] or 0.0 for g in got])
      style = dict(ls="--", color="grey") if m == "pixel_probe" else {}
      line, = ax.plot(x, mean, marker="o", ms=4, label=m, **style)
      ax.fill_between(x, mean - std, mean + std, color=line.get_color(),
                      alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(int(s)) for s in steps])
    ax.set_xlabel("stage-1 (SwAV) steps, log2")
    if i == 0:
      ax.set_ylabel("balanced accuracy (mean ± std)")
    ax.set_title(f"K={k}")
    ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.savefig(path, dpi=110, bbox_inches="tight")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="folders with a report.json")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  points = sorted((read_point(r) for r in args.runs),
                  key=lambda p: p["stage1_steps"])
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "curve.json"), "w") as f:
    json.dump(points, f, indent=2)
  with open(os.path.join(args.out, "curve.md"), "w") as f:
    f.write(markdown(points))
  plot(points, os.path.join(args.out, "curve.png"))
  print(markdown(points))


if __name__ == "__main__":
  main()
