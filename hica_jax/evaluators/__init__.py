"""Evaluators, chosen by name (config.eval.methods, config.study.methods).

Each is a small module whose `cell(env, k, seed)` fits on the (K, seed)
support set and scores the test split, given an env.EvalEnv (test and
support arrays, stage-1 params, prediction functions). grid.py turns
methods x K x seeds into cached cells; the eval stage and the study run the
same cells, so both report the same number for the same cell.
"""
import dataclasses
import functools

from hica_jax.evaluators import hica
from hica_jax.evaluators import linear_probe
from hica_jax.evaluators import pixel_probe
from hica_jax.evaluators import supervised_ce
from hica_jax.evaluators import tip_adapter
from hica_jax.evaluators import zero_shot
from hica_jax.evaluators import zs_linear_probe


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """name; cell(env, k, seed) -> {"metrics": ..., ["unseen": ...]}; what its
  cells depend on: "model" (the stage-1 model only), "probe" (a readout
  fitted on its frozen features, which also reads eval.probe_crops),
  "train" (also a few-shot training run), "hica" (a run of HiCA's
  objective, which also reads eval.hica_freeze) or "pixels" (the
  preprocessed images only);
  revision: raised when what a cell computes changes, so cells cached in old
  workdirs are recomputed (grid.method_cell keys on it when above 1)."""
  name: str
  cell: object
  depends_on: str
  revision: int = 1


EVALUATORS = {e.name: e for e in (
    Evaluator("zero_shot", zero_shot.cell, "model"),
    Evaluator("hica", hica.cell, "hica"),
    Evaluator("global_only",
              functools.partial(hica.cell, variant="global_only"), "hica"),
    # 2: features standardised by the train pool's statistics.
    Evaluator("linear_probe", linear_probe.cell, "probe", revision=2),
    Evaluator("zs_linear_probe", zs_linear_probe.cell, "probe"),
    Evaluator("tip_adapter", tip_adapter.cell, "probe"),
    Evaluator("supervised_ce", supervised_ce.cell, "train"),
    Evaluator("pixel_probe", pixel_probe.cell, "pixels"),
)}
METHODS = tuple(EVALUATORS)


def get(name, field="config.eval.methods"):
  if name not in EVALUATORS:
    raise ValueError(f"{field}: unknown method {name!r}; choose from "
                     f"{list(EVALUATORS)}.")
  return EVALUATORS[name]
