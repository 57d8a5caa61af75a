r"""Few-shot accuracy against stage-1 steps or image-tower size, from
finished runs' reports.

  python bench/stage1_curve.py --out results/stage1_steps/kermany \
      /tmp/curve/kermany_s1600 /tmp/curve/kermany_s3200 \
      results/kermany_study

Each argument is a workdir (or a folder) holding a `report.json` of a run
that differs from the others only in `stage1.steps` (the default
`--axis steps`), or only in the image tower's shape (`--axis image_params`:
the x axis is the tower's parameter count, computed from the
`model.image.*` fields of the run's stage-1 provenance record, so it
needs the workdir), or only in `stage1.pool_fraction` (`--axis
pool_images`: the x axis is the number of unlabelled train images stage 1
trained on, from the same record and the report's train split).
`--shots 4,16` keeps those K only (a study beside runs of a smaller eval
grid). Writes to
--out: `curve.json` (per run: stage-1 steps and seconds, and for every method and K
the balanced accuracy and AUC with their 95% intervals over seeds; HiCA minus
the pixel floor and minus supervised CE, paired seed by seed, from the
study's section or the workdir's cached cells; the stage-2 model trained on
all labels), `curve.md` (the same as a table) and
`curve.png` (balanced accuracy against the axis per method and K, the
pixel floor dashed). Nothing is trained here: the numbers are the reports'.
"""
import argparse
import glob
import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hica_jax import testing

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


def image_tower_params(folder):
  """(parameter count, {field: value}) of the image tower that stage 1 of
  the workdir `folder` trained, from its provenance record's inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hica_jax.models import hica_model  # pylint: disable=g-import-not-at-top
  inputs = stage1_inputs(folder, "image_params")
  image = {k.split(".", 2)[2]: v for k, v in inputs.items()
           if k.startswith("model.image.")}
  tower = hica_model.image_tower(hica_model.image_tower_kwargs({"image": image}))
  size = int(image["image_size"])
  shapes = jax.eval_shape(tower.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3)))
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
  shape = {k: image[k] for k in ("width", "depth", "heads", "mlp_dim")}
  shape["arch"] = image.get("arch", "vit")
  return count, shape


def stage1_inputs(folder, axis):
  """{dotted config field: value} that stage 1 of the workdir `folder` ran
  with (its provenance record's inputs)."""
  path = os.path.join(folder, "checkpoints", "stage1", "provenance.json")
  if not os.path.exists(path):
    raise SystemExit(f"{folder}: no {os.path.relpath(path, folder)}; "
                     f"--axis {axis} needs the run's workdir.")
  with open(path) as f:
    return json.load(f)["inputs"]


def pool_images(folder, report):
  """Unlabelled train images stage 1 of the workdir `folder` trained on:
  its stage1.pool_fraction (absent: 1.0, the whole pool) of the report's
  train images of the seen categories."""
  from hica_jax.training import stage1  # pylint: disable=g-import-not-at-top
  fraction = stage1_inputs(folder, "pool_images").get("stage1.pool_fraction",
                                                      1.0)
  data = report["dataset"]
  train = sum(n for c, n in data["splits"]["train"].items()
              if c not in data.get("unseen", []))
  return stage1.pool_size(train, fraction)


def tower_label(t):
  """'96, 3, 3, 192' (ViT width, depth, heads, MLP) or 'resnet 96, 1'
  (width, blocks per stage)."""
  if t.get("arch", "vit") == "resnet":
    return f"resnet {t['width']}, {t['depth']}"
  return f"{t['width']}, {t['depth']}, {t['heads']}, {t['mlp_dim']}"


def read_point(folder, axis="steps", shots=None):
  """One run's row: stage-1 steps and seconds (and with axis image_params
  the tower's size), per K and method the summaries; only the K in
  `shots` where given (a study beside runs of a smaller eval grid)."""
  with open(os.path.join(folder, "report.json")) as f:
    report = json.load(f)
  stage1 = report["stages"]["stage1"]
  point = {"source": os.path.normpath(folder), "config_name":
           report["config_name"], "stage1_steps": stage1["steps"],
           "stage1_seconds": round(stage1["seconds"], 1), "few_shot": {}}
  if axis == "image_params":
    point["image_params"], point["image_tower"] = image_tower_params(folder)
  if axis == "pool_images":
    point["pool_images"] = pool_images(folder, report)
  for k, methods in report["few_shot"].items():
    if shots and int(k) not in shots:
      continue
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
  point["hica_minus"] = {k: v for k, v in point["hica_minus"].items()
                         if not shots or int(k) in shots}
  al = all_labels(report)
  if al:
    point["all_labels"] = al
  return point


def markdown(points, axis="steps"):
  ks = sorted({int(k) for p in points for k in p["few_shot"]})
  head = ["stage-1 steps", "stage-1 s"]
  if axis == "image_params":
    head = ["image tower (width, depth, heads, MLP)", "parameters"] + head
  if axis == "pool_images":
    head = ["stage-1 pool (train images)"] + head
  for k in ks:
    head += [f"{m} K={k}" for m in METHODS]
  head += [f"HiCA − {b} K={k}" for k in ks for b in BASELINES]
  head += ["all labels (stage-2 model)"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for p in points:
    cells = [str(p["stage1_steps"]), f"{p['stage1_seconds']:.0f}"]
    if axis == "image_params":
      t = p["image_tower"]
      cells = [tower_label(t), f"{p['image_params']:,}"] + cells
    if axis == "pool_images":
      cells = [str(p["pool_images"])] + cells
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


AXIS_FIELD = {"steps": "stage1_steps", "image_params": "image_params",
              "pool_images": "pool_images"}
AXIS_LABEL = {"steps": "stage-1 (SwAV) steps, log2",
              "image_params": "image-tower parameters, log2",
              "pool_images": "unlabelled images in stage 1, log2"}


def plot(points, path, axis="steps"):
  ks = sorted({int(k) for p in points for k in p["few_shot"]})
  fig = Figure(figsize=(4.4 * len(ks), 3.6), layout="constrained")
  FigureCanvasAgg(fig)
  xs = np.asarray([p[AXIS_FIELD[axis]] for p in points], float)
  for i, k in enumerate(ks):
    ax = fig.add_subplot(1, len(ks), i + 1)
    for m in METHODS:
      got = [(s, p["few_shot"][str(k)][m]["balanced_accuracy"])
             for s, p in zip(xs, points) if m in p["few_shot"].get(str(k), {})]
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
    ax.set_xticks(xs, [f"{s / 1e3:.0f}k" if axis == "image_params" else
                       str(int(s)) for s in xs])
    ax.set_xlabel(AXIS_LABEL[axis])
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
  parser.add_argument("--axis", choices=sorted(AXIS_FIELD), default="steps",
                      help="what the runs differ in")
  parser.add_argument("--shots", default="",
                      help="comma-separated K to keep (default: every K "
                      "of any run)")
  args = parser.parse_args()
  shots = {int(k) for k in args.shots.split(",") if k}
  points = sorted((read_point(r, args.axis, shots) for r in args.runs),
                  key=lambda p: p[AXIS_FIELD[args.axis]])
  testing.write_report(args.out, "curve", points,
                       markdown(points, args.axis))
  plot(points, os.path.join(args.out, "curve.png"), args.axis)


if __name__ == "__main__":
  main()
