"""The report's figures as PNGs under <workdir>/plots/ (matplotlib, Agg).

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never
through pyplot, so importing this module changes no global backend. Each
figure reads only report sections (and the interpretability gallery file);
`write_all` draws those whose sections exist.
"""
import os
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRIC = "balanced_accuracy"
LABEL = "balanced accuracy"


def _figure(width=6.4, height=4.0):
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path):
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


def _chance(ax, report):
  k = len(report["dataset"]["categories"])
  ax.axhline(1.0 / k, color="grey", ls=":", lw=1, label=f"chance (1/{k})")


def _mean_std(summary, metric=METRIC):
  m = summary[metric]
  return (np.nan if m["mean"] is None else m["mean"]), (m["std"] or 0.0)


def few_shot_curves(report, path):
  """Balanced accuracy vs K (log2 axis) per method, band = mean +- 1 std."""
  fs = report["few_shot"]
  ks = sorted(int(k) for k in fs)
  methods = list(dict.fromkeys(m for k in ks for m in fs[str(k)]))
  fig = _figure()
  ax = fig.add_subplot()
  for method in methods:
    pts = [(k, *_mean_std(fs[str(k)][method])) for k in ks
           if method in fs[str(k)]]
    x, mean, std = (np.asarray(v, float) for v in zip(*pts))
    style = dict(ls="--") if method == "zero_shot" else {}
    line, = ax.plot(x, mean, marker="o", ms=4, label=method, **style)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(),
                    alpha=0.15, lw=0)
  _chance(ax, report)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("shots per class K (log2)")
  ax.set_ylabel(f"{LABEL} (mean ± std over seeds)")
  ax.set_title("Few-shot classification")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  return _save(fig, path)


def ablation_bars(report, path):
  """Bars of balanced accuracy per ablation variant (error bars: std)."""
  ab = report["ablations"]
  ks = sorted(ab, key=int)
  variants = list(ab[ks[0]])
  fig = _figure(max(5.0, 1.2 * len(variants) * len(ks)), 3.8)
  ax = fig.add_subplot()
  width = 0.8 / len(ks)
  for i, k in enumerate(ks):
    mean, std = zip(*(_mean_std(ab[k][v]) for v in variants))
    x = np.arange(len(variants)) + (i - (len(ks) - 1) / 2) * width
    ax.bar(x, mean, width, yerr=std, capsize=3, label=f"K={k}")
  _chance(ax, report)
  ax.set_xticks(np.arange(len(variants)), variants)
  ax.set_ylabel(f"{LABEL} (mean ± std)")
  ax.set_title("Ablations (full HiCA is the reference)")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def noise_curve(report, path):
  """Balanced accuracy vs descriptor noise rate (mean +- std)."""
  rates = report["noise"]["rates"]
  x = sorted(rates, key=float)
  fig = _figure(5.6, 3.8)
  ax = fig.add_subplot()
  for key, style in (("noisy_bank", "-"), ("clean_prototypes", "--")):
    mean, std = zip(*(_mean_std(rates[r][key]) for r in x))
    ax.errorbar([float(r) for r in x], mean, yerr=std, ls=style, marker="o",
                capsize=3, label=key.replace("_", " "))
  _chance(ax, report)
  ax.set_xlabel("descriptor noise rate")
  ax.set_ylabel(f"{LABEL} (mean ± std)")
  ax.set_title(f"Robustness to noisy descriptors "
               f"(HiCA, K={report['noise']['shots']})")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return _save(fig, path)


def sweep_deltas(report, path):
  """Horizontal bars: each sweep variant's paired difference in balanced
  accuracy to HiCA (error bars: 95% interval over seeds)."""
  sw = report["sweep"]
  specs = list(sw["variants"])
  deltas = [sw["variants"][v]["delta"][METRIC] for v in specs]
  mean = np.array([d["mean"] for d in deltas])
  lo = mean - np.array([d["ci95"][0] for d in deltas])
  hi = np.array([d["ci95"][1] for d in deltas]) - mean
  fig = _figure(6.4, 0.9 + 0.45 * len(specs))
  ax = fig.add_subplot()
  y = np.arange(len(specs))[::-1]
  ax.barh(y, mean, xerr=[lo, hi], capsize=3,
          color=np.where(mean >= 0, "tab:green", "tab:red"))
  ax.axvline(0, color="black", lw=1)
  ax.set_yticks(y, specs, fontsize=8)
  ax.set_xlabel(f"Δ {LABEL} vs HiCA defaults (paired, 95% interval)")
  ax.set_title(f"Sweep at K={sw['shots']} ({sw['seeds']} seeds)")
  ax.grid(axis="x", alpha=0.3)
  return _save(fig, path)


def unseen_models(report):
  """(label, summary) of the models in the unseen-category comparison: the
  stage-1 and stage-2 models and the contrastive few-shot models at the
  largest K."""
  un = report["unseen"]
  rows = [(f"{name} model" if name != "zero_shot" else "stage-1 (zero-shot)",
           s) for name, s in un.get("models", {}).items()]
  if un.get("few_shot"):
    k = max(un["few_shot"], key=int)
    rows += [(f"{m} K={k}", s) for m, s in un["few_shot"][k].items()]
  return rows


def unseen_recall(report, path):
  """Per-category recall (generalised: every category a possible answer)."""
  rows = unseen_models(report)
  cats = report["dataset"]["categories"] + report["unseen"]["categories"]
  fig = _figure(max(5.5, 1.3 * len(cats)), 3.8)
  ax = fig.add_subplot()
  width = 0.8 / len(rows)
  for i, (label, s) in enumerate(rows):
    mean = [s["recall"][c]["mean"] for c in cats]
    std = [s["recall"][c]["std"] or 0.0 for c in cats]
    mean = [np.nan if v is None else v for v in mean]
    ax.bar(np.arange(len(cats)) + (i - (len(rows) - 1) / 2) * width, mean,
           width, yerr=std, capsize=2, label=label)
  unseen = report["unseen"]["categories"]
  ax.set_xticks(np.arange(len(cats)), [
      textwrap.fill(c.replace("_", " "), 14) + ("\n(unseen)" if c in unseen
                                                else "") for c in cats],
                fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("recall (seen + unseen prototypes)")
  ax.set_title("Generalised zero-shot: recall per category")
  ax.legend(fontsize=7)
  ax.grid(axis="y", alpha=0.3)
  return _save(fig, path)


def heatmap_gallery(report, workdir, path):
  """Rows: examples; columns: image with the ROI contour, then the
  phrase-to-patch map of each model over the image."""
  interp = report["interpretability"]
  data = np.load(os.path.join(workdir, interp["gallery"]["file"]))
  models = [k[4:] for k in data.files if k.startswith("map_")]
  n = len(data["image"])
  # 3.3 in per row: the category and the wrapped phrase take three lines
  # above each image; constrained layout keeps them off the row above.
  fig = _figure(2.6 * (1 + len(models)), 3.3 * n)
  fig.set_layout_engine("constrained")
  for i in range(n):
    image, mask = data["image"][i], data["mask"][i]
    phrase = textwrap.fill(f"\"{interp['gallery']['phrases'][i]}\"", 30)
    title = f"{interp['gallery']['categories'][i]}\n{phrase}"
    ax = fig.add_subplot(n, 1 + len(models), i * (1 + len(models)) + 1)
    ax.imshow(image)
    ax.contour(mask, levels=[0.5], colors="lime", linewidths=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    for j, m in enumerate(models):
      ax = fig.add_subplot(n, 1 + len(models), i * (1 + len(models)) + 2 + j)
      ax.imshow(image)
      heat = data[f"map_{m}"][i].astype(np.float32)
      ax.imshow(heat, cmap="jet", alpha=0.5)
      ax.contour(mask, levels=[0.5], colors="lime", linewidths=1)
      peak = np.unravel_index(heat.argmax(), heat.shape)
      ax.plot(peak[1], peak[0], "w+", ms=8, mew=2)
      ax.set_title(f"{m} model:\nphrase-patch similarity", fontsize=7)
      ax.axis("off")
  return _save(fig, path)


def write_all(report, workdir):
  """Draws every figure whose section is in `report`; returns {name:
  path relative to workdir}."""
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  interp = report.get("interpretability", {})
  todo = {
      "few_shot": (few_shot_curves, bool(report.get("few_shot"))),
      "ablations": (ablation_bars, bool(report.get("ablations"))),
      "noise": (noise_curve, bool(report.get("noise", {}).get("rates"))),
      "unseen": (unseen_recall, bool(report.get("unseen", {}).get("models"))),
      "sweep": (sweep_deltas, bool(report.get("sweep", {}).get("variants"))),
      "heatmaps": (lambda r, p: heatmap_gallery(r, workdir, p),
                   bool(interp.get("gallery"))),
  }
  out = {}
  for name, (draw, present) in todo.items():
    if present:
      draw(report, os.path.join(out_dir, f"{name}.png"))
      out[name] = f"plots/{name}.png"
  return out
