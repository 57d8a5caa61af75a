"""report.json (a contract later work extends, never breaks), report.md and
report.html (report.md as one self-contained page, plots embedded).

The eval stage writes `zero_shot`, `stage2_eval`, `all_labels` (the
stage-2 model, the frozen linear probe and the pixel floor trained on the
train split's labels), `few_shot` and `evaluation` (cell counts); the
study (hica_jax/study.py) replaces `few_shot` with its wider grid and
adds `ablations`, `unseen`, `noise`, `sweep`, `interpretability`,
`efficiency` and `study`; `plots` maps figure names to PNGs under the
workdir; `code` names the commit, library versions and cores of the run
that wrote the report and of each stage it loaded.
"""
import json
import math
import os

import jax

from hica_jax import plots as plots_lib
from hica_jax import report_html

REPORT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def validate(report):
  """Raises ValueError if `report` breaks the report.json contract."""
  def need(cond, what):
    if not cond:
      raise ValueError(f"report.json: {what}")
  need(isinstance(report.get("config_name"), str), "config_name must be str")
  ds = report.get("dataset", {})
  need(isinstance(ds.get("name"), str), "dataset.name must be str")
  need(isinstance(ds.get("categories"), list), "dataset.categories: list")
  need(isinstance(ds.get("splits"), dict), "dataset.splits: dict")
  for stage in ("stage1", "stage2"):
    st = report.get("stages", {}).get(stage)
    if st is not None:
      need(isinstance(st.get("steps"), int), f"stages.{stage}.steps: int")
      for k in ("final_loss", "seconds"):
        need(isinstance(st.get(k), float), f"stages.{stage}.{k}: float")
  zs = report.get("zero_shot")
  if zs is not None:
    for m in REPORT_METRICS:
      need(isinstance(zs.get(m), float), f"zero_shot.{m}: float")
  for k, methods in report.get("few_shot", {}).items():
    need(k.isdigit(), f"few_shot key {k!r} must be a shot count")
    for method, res in methods.items():
      need(isinstance(res.get("n_seeds"), int),
           f"few_shot.{k}.{method}.n_seeds: int")
      for m in REPORT_METRICS:
        need(isinstance(res.get(m, {}).get("mean"), float) and
             isinstance(res[m].get("std"), float),
             f"few_shot.{k}.{method}.{m}: {{mean, std}}")
  for name, res in report.get("all_labels", {}).items():
    need(isinstance(res.get("n_train"), int),
         f"all_labels.{name}.n_train: int")
    for m in REPORT_METRICS:
      need(isinstance(res.get("metrics", {}).get(m), float),
           f"all_labels.{name}.metrics.{m}: float")
  need(isinstance(report.get("timing", {}).get("total_seconds"), float),
       "timing.total_seconds: float")
  for what, c in report.get("code", {}).items():
    need(isinstance(c, dict) and "git_commit" in c,
         f"code.{what}: {{git_commit, ...}}")


def _clean(x):
  """NaN -> None so the JSON is standard; nested containers recursively."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def write(workdir, report):
  """report.json, the plots, report.md and report.html (process 0 only)."""
  if jax.process_index() != 0:
    return
  validate(report)
  report["plots"] = plots_lib.write_all(report, workdir)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(_clean(report), f, indent=2)
  text = markdown(report)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  report_html.write(workdir, text, f"HiCA report: {report['config_name']}")


def _fmt(v):
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) \
      else f"{v:.3f}"


def _ms(summary):
  """'mean ± std' of a metrics.summarize dict."""
  return f"{_fmt(summary['mean'])} ± {_fmt(summary['std'])}"


def _table(header, rows):
  return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + [
      "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _plot(report, name, caption):
  path = report.get("plots", {}).get(name)
  return ["", f"![{caption}]({path})", f"*{caption}*"] if path else []


def markdown(report):
  ds = report["dataset"]
  lines = [f"# HiCA report: {report['config_name']}", "",
           f"Data set: **{ds['name']}**, categories: "
           f"{', '.join(ds['categories'])}"]
  if ds.get("unseen"):
    lines.append(f"(held out of stage 2 as unseen: {', '.join(ds['unseen'])})")
  if ds.get("local_term"):
    lines += ["", ds["local_term"]]
  lines += ["", "| split | " + " | ".join(ds["categories"]) + " |",
            "|---" * (len(ds["categories"]) + 1) + "|"]
  for split, counts in ds["splits"].items():
    lines.append(f"| {split} | " + " | ".join(
        str(counts.get(c, 0)) for c in ds["categories"]) + " |")
  lines += ["", "## Stages", "", "| stage | steps | final loss | seconds |",
            "|---|---|---|---|"]
  for name, st in report.get("stages", {}).items():
    lines.append(f"| {name} | {st['steps']} | {_fmt(st['final_loss'])} | "
                 f"{st['seconds']:.1f} |")
  header = "| " + " | ".join(REPORT_METRICS + ("ece",)) + " |"
  sep = "|---" * (len(REPORT_METRICS) + 1) + "|"
  for key, title in (("zero_shot", "Zero-shot (stage-1 model, no labels)"),
                     ("stage2_eval", "Stage-2 model on the test split")):
    if key in report:
      lines += ["", f"## {title}", "", header, sep,
                "| " + " | ".join(_fmt(report[key].get(m))
                                  for m in REPORT_METRICS + ("ece",)) + " |"]
  if report.get("all_labels"):
    lines += _all_labels_md(report)
  if report.get("few_shot"):
    lines += _few_shot_md(report)
  for section, fn in (("versus", _versus_md), ("probe_floor", _probe_floor_md),
                      ("ablations", _ablations_md), ("unseen", _unseen_md),
                      ("noise", _noise_md), ("sweep", _sweep_md),
                      ("interpretability", _interpretability_md),
                      ("efficiency", _efficiency_md)):
    if report.get(section):
      lines += fn(report)
  lines += ["", f"Total time: {report['timing']['total_seconds']:.1f} s"]
  lines += _code_md(report.get("code")) + [""]
  return "\n".join(lines)


def _code_md(code):
  """Lines naming the code, libraries and cores behind the report."""
  if not code:
    return []
  lines = ["", "Made by:", ""]
  for what, c in code.items():
    libs = ", ".join(f"{k} {v}" for k, v in c.get("libraries", {}).items()
                     if v is not None)
    lines.append(f"- {what}: commit {c.get('git_commit') or 'unknown'}, "
                 f"{c.get('cpus', '?')} cores" + (f"; {libs}" if libs else ""))
  return lines


METRICS_ECE = REPORT_METRICS + ("ece",)


ALL_LABELS_ROWS = (
    ("stage2_model", "stage-2 model (HiCA's objective)"),
    ("linear_probe", "linear probe on frozen stage-1 features"),
    ("pixel_probe", "raw-pixel floor (logistic regression)"))


def _all_labels_md(report):
  res = report["all_labels"]
  lines = ["", "## Trained on the train split's labels", "",
           "What each classifier reaches with the labels of the train "
           "split (the probes read a seeded sample of a larger split, "
           "their C chosen by cross-validation on those labels), beside "
           "the few-shot grid below. The frozen probe is what a linear "
           "classifier on the stage-1 features reaches with every label.",
           "",
           "| classifier | train labels | C | " + " | ".join(METRICS_ECE)
           + " |", "|---" * (len(METRICS_ECE) + 3) + "|"]
  for key, title in ALL_LABELS_ROWS:
    if key in res:
      c = res[key].get("c")
      lines.append(f"| {title} | {res[key]['n_train']} | "
                   f"{'' if c is None else f'{c:g}'} | " + " | ".join(
          _fmt(res[key]["metrics"].get(m)) for m in METRICS_ECE) + " |")
  return lines


def _few_shot_md(report):
  fs = report["few_shot"]
  ks = sorted(fs, key=int)
  methods = list(dict.fromkeys(m for k in ks for m in fs[k]))
  lines = ["", "## Few-shot (mean ± std over seeds)"]
  if len(ks) > 1:
    lines += ["", "Balanced accuracy by shots per class K:", ""]
    lines += _table(["method"] + [f"K={k}" for k in ks], [
        [m] + [_ms(fs[k][m]["balanced_accuracy"]) if m in fs[k] else ""
               for k in ks] for m in methods])
    lines += _plot(report, "few_shot", "Few-shot curves: balanced accuracy "
                   "vs K (log2 axis), bands mean ± 1 std over seeds.")
  lines += ["", "All metrics (ECE: expected calibration error, lower is "
            "better; 95% intervals over seeds in report.json):", ""]
  lines += _table(["K", "method", "seeds"] + list(METRICS_ECE), [
      [k, m, res["n_seeds"]] + [_ms(res[x]) for x in METRICS_ECE]
      for k in ks for m, res in fs[k].items()])
  return lines


def _delta(d):
  """'+0.012 ± 0.030 [-0.025, +0.049]' of a paired-difference summary."""
  lo, hi = d["ci95"]
  return f"{d['mean']:+.3f} ± {d['std']:.3f} [{lo:+.3f}, {hi:+.3f}]"


def _versus_md(report):
  vs = report["versus"]
  ks = sorted(vs, key=int)
  baselines = list(vs[ks[0]])
  lines = ["", "## HiCA against its baselines (paired)", "",
           "HiCA's balanced accuracy minus each baseline's on the same "
           "support sets, seed by seed: mean ± std [95% interval]. An "
           "interval above 0 is a win the seeds can see; one that contains "
           "0 is no difference; one below 0 is a loss.", ""]
  lines += _table(["K"] + [f"HiCA − {b}" for b in baselines], [
      [k] + [_delta(vs[k][b]["balanced_accuracy"]) for b in baselines]
      for k in ks])
  return lines


def _probe_floor_md(report):
  pf = report["probe_floor"]
  ks = sorted(pf, key=int)
  lines = ["", "## Frozen stage-1 features against the pixel floor (paired)",
           "", "The linear probe on frozen stage-1 features minus logistic "
           "regression on raw pixels, on the same support sets, seed by "
           "seed: mean ± std [95% interval] of balanced accuracy and AUC.",
           ""]
  lines += _table(["K", "Δ balanced accuracy", "Δ AUC"], [
      [k, _delta(pf[k]["balanced_accuracy"]), _delta(pf[k]["auc"])]
      for k in ks])
  return lines


def _ablations_md(report):
  lines = ["", "## Ablations (mean ± std over seeds)", "",
           "`no_stage1`: stage 2 from random initialisation; `no_global`, "
           "`no_local`, `no_cross`: the weight of L_g, L_l or L_c set to 0. "
           "Δ: balanced accuracy minus full HiCA's on the same support sets, "
           "seed by seed: mean ± std [95% interval].", ""]
  rows = []
  for k, variants in sorted(report["ablations"].items(),
                            key=lambda x: int(x[0])):
    for v, res in variants.items():
      rows.append([k, v, res["n_seeds"]] + [_ms(res[x]) for x in METRICS_ECE]
                  + ["" if v == "full" else
                     _delta(res["delta"]["balanced_accuracy"])])
  lines += _table(["K", "variant", "seeds"] + list(METRICS_ECE) + ["Δ bacc"],
                  rows)
  return lines + _plot(report, "ablations", "Ablations: balanced accuracy, "
                       "error bars ± 1 std over seeds.")


def _sweep_md(report):
  sw = report["sweep"]
  ref = sw["reference"]
  lines = ["", f"## Sweep: HiCA's settings at K={sw['shots']} "
           f"({sw['seeds']} seeds)", "",
           "Each row is HiCA with the listed overrides of the stage-2 loss "
           "(`stage2.loss.*`), the starting logit scale (`logit_scale`, "
           "stage 1's otherwise) or the starting weights (`init`: "
           "`image_stage1`/`text_stage1` keep stage 1's weights for that "
           "tower only, the other starts random). Δ: the variant minus "
           "HiCA on the same support set and seed, mean ± std and 95% "
           "interval over seeds; an interval that excludes 0 is a change "
           "the seeds can see.", ""]
  rows = [["HiCA (defaults)"] + [_ms(ref[m]) for m in METRICS_ECE] +
          ["", ""]]
  for spec, res in sw["variants"].items():
    d = res["delta"]["balanced_accuracy"]
    lo, hi = d["ci95"]
    rows.append([f"`{spec}`"] + [_ms(res[m]) for m in METRICS_ECE] +
                [f"{d['mean']:+.3f} ± {d['std']:.3f}",
                 f"[{lo:+.3f}, {hi:+.3f}]"])
  lines += _table(["variant"] + list(METRICS_ECE) + ["Δ bacc", "Δ 95% CI"],
                  rows)
  return lines + _plot(report, "sweep", "Sweep: paired difference in "
                       "balanced accuracy to HiCA with its defaults, error "
                       "bars 95% interval over seeds.")


def _unseen_md(report):
  un = report["unseen"]
  lines = ["", "## Unseen categories (generalised zero-shot)"]
  if not un.get("models"):
    return lines + ["", "The descriptor bank holds no category out of "
                    "training; nothing to report."]
  lines += ["", f"Held out of stages 1 and 2: {', '.join(un['categories'])}."
            " Test images of all categories are classified against the "
            "prototypes of all categories. *Seen task*: seen images, seen "
            "prototypes only (the few-shot task). *Generalised*: balanced "
            "accuracy over all categories; seen/unseen accuracy on the images "
            "of seen/unseen categories; H their harmonic mean.", ""]
  rows = [[label, s["n_seeds"], _ms(s["seen_task_balanced_accuracy"]),
           _ms(s["balanced_accuracy"]), _ms(s["seen_accuracy"]),
           _ms(s["unseen_accuracy"]), _ms(s["harmonic_mean"])] +
          [_ms(s["recall"][c]) for c in un["categories"]]
          for label, s in plots_lib.unseen_models(report)]
  lines += _table(["model", "seeds", "seen task bacc", "generalised bacc",
                   "seen acc", "unseen acc", "H"] +
                  [f"recall {c}" for c in un["categories"]], rows)
  return lines + _plot(report, "unseen", "Recall per category with seen and "
                       "unseen prototypes competing (± 1 std).")


def _noise_md(report):
  nz = report["noise"]
  lines = ["", f"## Noisy descriptors (HiCA, K={nz['shots']})", "",
           f"The bank is corrupted at each rate ({', '.join(nz['kinds'])}: "
           "sentences swapped in from another class, words dropped, typos) "
           "and used both for training and for the prototypes; *clean "
           "prototypes*: the same models with prototypes of the clean bank. "
           "Drop: balanced accuracy at rate 0 minus at this rate.", ""]
  rows = []
  for rate, e in sorted(nz["rates"].items(), key=lambda x: float(x[0])):
    drop = e["drop"]["balanced_accuracy"] if e.get("drop") else None
    rows.append([rate, e["noisy_bank"]["n_seeds"],
                 _ms(e["noisy_bank"]["balanced_accuracy"]), _fmt(drop),
                 _ms(e["noisy_bank"]["macro_f1"]), _ms(e["noisy_bank"]["auc"]),
                 _ms(e["clean_prototypes"]["balanced_accuracy"])])
  lines += _table(["rate", "seeds", "bacc", "drop", "macro-F1", "AUC",
                   "bacc, clean prototypes"], rows)
  return lines + _plot(report, "noise", "Balanced accuracy vs descriptor "
                       "noise rate (± 1 std).")


def _interpretability_md(report):
  it = report["interpretability"]
  lines = ["", "## Interpretability (phrase-to-patch similarity vs ROI masks)"]
  if not it.get("n_images"):
    return lines + ["", "No test image has an ROI mask and a local phrase."]
  if it["threshold"] == "roi_area":
    kept, iou = "as many of the map's top pixels as the ROI has", "IoU"
  else:
    pct = round(100 * it["top_fraction"])
    kept, iou = f"the top {pct}% of the map's pixels", f"IoU (top {pct}%)"
  lines += ["", f"Over the {it['n_images']} test images with an ROI mask, the "
            "cosine similarity of the image's ROI phrase to each projected "
            f"patch embedding ({it['grid'][0]}x{it['grid'][1]} patches) is "
            "upsampled bilinearly to the image. *Pointing game*: the patch "
            "of highest similarity overlaps the mask. *IoU*: "
            f"{kept} against the mask (mean ROI area "
            f"{100 * it['mean_roi_area']:.1f}% of the image). *random*: "
            "i.i.d. uniform patch maps scored the same way (chance level).",
            ""]
  models = it["models"]
  lines += _table(["model", "pointing game", iou],
                  [[m, _fmt(s["pointing_game"]), _fmt(s["iou"])]
                   for m, s in models.items()])
  cats = list(next(iter(models.values()))["per_category"])
  lines += ["", "Per category (pointing game / IoU):", ""]
  lines += _table(["category", "n"] + list(models), [
      [c, models["random"]["per_category"][c]["n"]] +
      [f"{_fmt(s['per_category'][c]['pointing_game'])} / "
       f"{_fmt(s['per_category'][c]['iou'])}" for s in models.values()]
      for c in cats])
  return lines + _plot(report, "heatmaps", "Heatmap gallery: image with the "
                       "ROI contour (green), then each model's phrase-to-patch"
                       " similarity (+: maximum).")


def _efficiency_md(report):
  ef = report["efficiency"]
  p, ts, ev, dev = ef["params"], ef["train_step"], ef["eval"], ef["device"]
  lines = ["", "## Efficiency", "",
           f"Device: {dev['platform']} ({dev['kind']}), {dev['devices']} "
           f"device(s), {dev['cpu_count']} CPU cores.", ""]
  lines += _table(["quantity", "value"], [
      ["parameters: image tower", f"{p['image']:,}"],
      ["parameters: text tower", f"{p['text']:,}"],
      ["parameters: projections + logit scale",
       f"{p['projections_and_scale']:,}"],
      ["parameters: total", f"{p['total']:,}"],
      [f"stage-2 train step (batch {ts['batch_size']}, median of "
       f"{ts['timed_steps']} after {ts['warmup_steps']} warm-up)",
       f"{1e3 * ts['median_seconds']:.1f} ms"],
      ["stage-2 training throughput",
       f"{ts['images_per_second']:.1f} images/s"],
      [f"evaluation latency (batch {ev['batch_size']})",
       f"{ev['ms_per_image']:.2f} ms/image"],
      ["evaluation latency (one image)", f"{ev['ms_single_image']:.2f} ms"]])
  if ef.get("cell_seconds"):
    lines += ["", "Study cost by cell kind (seconds, as computed; cached "
              "cells keep the time of their first computation):", ""]
    lines += _table(["cell kind", "cells", "mean s", "total s"], [
        [k, v["n"], f"{v['mean']:.1f}", f"{v['total']:.1f}"]
        for k, v in ef["cell_seconds"].items()])
  return lines
