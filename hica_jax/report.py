"""report.json (a contract later work extends, never breaks) and report.md."""
import json
import math
import os

import jax

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
  need(isinstance(report.get("timing", {}).get("total_seconds"), float),
       "timing.total_seconds: float")


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
  if jax.process_index() != 0:
    return
  validate(report)
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(_clean(report), f, indent=2)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(markdown(report))


def _fmt(v):
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) \
      else f"{v:.3f}"


def markdown(report):
  ds = report["dataset"]
  lines = [f"# HiCA report: {report['config_name']}", "",
           f"Data set: **{ds['name']}**, categories: "
           f"{', '.join(ds['categories'])}"]
  if ds.get("unseen"):
    lines.append(f"(held out of stage 2 as unseen: {', '.join(ds['unseen'])})")
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
  if report.get("few_shot"):
    lines += ["", "## Few-shot (mean ± std over seeds)", "",
              "| K | method | seeds | " + " | ".join(REPORT_METRICS) + " |",
              "|---|---|---|" + "---|" * len(REPORT_METRICS)]
    for k, methods in report["few_shot"].items():
      for method, res in methods.items():
        cells = [f"{_fmt(res[m]['mean'])} ± {_fmt(res[m]['std'])}"
                 for m in REPORT_METRICS]
        lines.append(f"| {k} | {method} | {res['n_seeds']} | " +
                     " | ".join(cells) + " |")
  lines += ["", f"Total time: {report['timing']['total_seconds']:.1f} s", ""]
  return "\n".join(lines)
