"""The README's headline table, read from committed study reports.

  python bench/headline.py results/kermany_study results/busi_study

Prints one markdown table: for each study, HiCA (mean ± std), global-only,
supervised CE, the frozen linear probe and the pixel floor at every K of
the study (balanced accuracy, AUC at the largest K), HiCA − floor as the
paired difference with its 95% interval, and the stage-2 model on all
labels beside the linear probe and the pixel floor fitted on the same
labels (the report's `all_labels` section, where it has one). Every
number is read from `report.json`; nothing is computed here but the
formatting.
"""
import argparse
import json
import os
import sys

COLUMNS = ("global_only", "supervised_ce", "linear_probe", "pixel_probe")
HEADER = ("| data set, K | HiCA | global-only | supervised CE | "
          "linear probe (stage 1) | pixel floor | HiCA − floor |\n"
          "|---|---|---|---|---|---|---|")
NAMES = {"kermany": "Kermany", "busi": "BUSI"}


def _mean(stats, metric="balanced_accuracy"):
  return stats[metric]["mean"]


def _signed(x):
  return f"{x:+.3f}"


def rows(report):
  """Markdown rows of one study report (dict of report.json)."""
  data = report["dataset"]
  name = NAMES.get(data["name"], data["name"])
  classes = len(data["categories"])
  shots = sorted(report["few_shot"], key=int)
  out = []
  for i, k in enumerate(shots):
    cells = report["few_shot"][k]
    hica = cells["hica"]["balanced_accuracy"]
    top = k == shots[-1]
    label = (f"{name} ({classes} classes), K={k}" if i == 0
             else f"{name}, K={k}")
    hica_text = f"{hica['mean']:.3f} ± {hica['std']:.3f}"
    if top:
      hica_text += f" (AUC {_mean(cells['hica'], 'auc'):.3f})"
    others = []
    for method in COLUMNS:
      text = f"{_mean(cells[method]):.3f}" if method in cells else "—"
      if top and method == "pixel_probe":
        text += f" (AUC {_mean(cells[method], 'auc'):.3f})"
      others.append(text)
    diff = report["versus"][k]["pixel_probe"]["balanced_accuracy"]
    lo, hi = diff["ci95"]
    diff_text = f"{_signed(diff['mean'])} [{_signed(lo)}, {_signed(hi)}]"
    if lo > 0:
      diff_text = f"**{diff_text}**"
    out.append(f"| {label} | {hica_text} | " + " | ".join(others)
               + f" | {diff_text} |")
  train = sum(data["splits"]["train"].values())
  s2 = report["stage2_eval"]
  probes = [_all_labels_text(report, m) for m in COLUMNS]
  out.append(f"| {name}, all {train} labels (stage-2 model; probes) | "
             f"{s2['balanced_accuracy']:.3f} (AUC {s2['auc']:.3f}) | "
             + " | ".join(probes) + " | |")
  return out


def _all_labels_text(report, method):
  """"0.930 (AUC 0.986)" for a probe fitted on the train split's labels
  (the report's `all_labels` section), "" where the report has none."""
  cell = report.get("all_labels", {}).get(method)
  if cell is None:
    return ""
  m = cell["metrics"]
  return f"{m['balanced_accuracy']:.3f} (AUC {m['auc']:.3f})"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("studies", nargs="+",
                      help="study workdirs or folders holding report.json")
  args = parser.parse_args(argv)
  lines = [HEADER]
  for folder in args.studies:
    path = os.path.join(folder, "report.json")
    if not os.path.exists(path):
      sys.exit(f"{path}: no report.json; give a finished study's folder.")
    with open(path) as f:
      lines += rows(json.load(f))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
