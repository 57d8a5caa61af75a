r"""HiCA few-shot cells under config overrides, paired to the defaults.

  python bench/fewshot_settings.py --family chestxray \
      --data_root ../shared/data/chest_xray --workdir runs/chestxray_fewshot_real \
      --variant 'lr5e-4={"stage2.optim.lr": 5e-4}' \
      --variant 'crop50={"data.augment.crop_scale": [0.5, 1.0]}' \
      --shots 16 --seeds 5 --out /tmp/fewshot_settings.jsonl

The study's sweep varies the stage-2 loss, the logit scale and the starting
towers; this varies any config field a few-shot run reads (optimiser,
augmentation, the step rule), or swaps in another text tower
(`--text_tower minilm`: stage 1's image tower beside the pretrained
all-MiniLM-L6-v2), on the finished stage 1 of --workdir (a run of
the README command with the same --data_root). Each variant is run on the
same support sets and seeds as the defaults (`--base`: the stage-1 run's
own overrides, for every run; a key "+a.b" adds a model option the
configs do not expose, its params at their initialisation:
`--variant 'bias={"+model.image_proj": {"kind": "linear", "bias": true}}'`),
and the summary line gives the
paired difference in balanced accuracy with its 95% interval. One JSON line
per cell and per summary goes to --out (and stdout).
"""
import argparse
import json

from hica_jax import metrics as metrics_lib
from hica_jax import study
from hica_jax import testing
from hica_jax.evaluators import hica


def run_cells(args, name, overrides, text_arg=None):
  if text_arg:
    _, env = testing.stage1_env_with_text_tower(
        args.family, args.config_arg, text_arg, args.data_root, args.workdir,
        {**args.base, **overrides})
  else:
    _, env = testing.stage1_env(args.family, args.config_arg, args.data_root,
                                args.workdir, {**args.base, **overrides})
  out = {}
  for k in args.shots:
    for seed in range(args.seeds):
      metrics = hica.cell(env, k, seed)["metrics"]
      out[(k, seed)] = metrics
      testing.emit_json_line(args.out, {
          "variant": name, "overrides": overrides, "K": k, "seed": seed,
          "balanced_accuracy": metrics["balanced_accuracy"],
          "auc": metrics["auc"]})
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  testing.add_stage1_run_args(parser)
  parser.add_argument("--base", type=json.loads, default={},
                      help="json object of the dotted config fields the "
                      "stage-1 run was given (its overrides), applied to "
                      "every run here")
  parser.add_argument("--variant", action="append", default=[],
                      help="name={json object of dotted config fields}")
  parser.add_argument("--text_tower", action="append", default=[],
                      help="config arg of another text tower (e.g. minilm): "
                      "a variant 'text:<arg>' with stage 1's image tower "
                      "and that tower (and its tokenizer) at its "
                      "initialisation")
  parser.add_argument("--out", default="/tmp/fewshot_settings.jsonl")
  args = parser.parse_args(argv)
  variants = {}
  for spec in args.variant:
    name, sep, blob = spec.partition("=")
    if not sep:
      raise SystemExit(f"--variant {spec!r}: expected name={{json}}.")
    variants[name] = json.loads(blob)
  base = run_cells(args, "defaults", {})
  summaries = {}
  runs = [(name, overrides, None) for name, overrides in variants.items()]
  runs += [(f"text:{arg}", {}, arg) for arg in args.text_tower]
  for name, overrides, text_arg in runs:
    cells = run_cells(args, name, overrides, text_arg)
    for k in args.shots:
      keys = [(k, s) for s in range(args.seeds)]
      row = {"variant": name, "K": k, "summary": metrics_lib.summarize(
          [cells[c]["balanced_accuracy"] for c in keys]),
             "delta_vs_defaults": study.paired_delta(
                 [cells[c] for c in keys],
                 [base[c] for c in keys])["balanced_accuracy"]}
      summaries[(name, k)] = row
      testing.emit_json_line(args.out, row)
  return summaries


if __name__ == "__main__":
  main()
