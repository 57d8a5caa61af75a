"""The bench scripts that read finished runs (bench/paired_runs.py,
bench/stage1_curve.py, bench/headline.py) on cells written here: known
differences, pairing by seed, a workdir that mixes two runs' cells, and
the README's headline table against the committed studies; and the "+"
overrides of bench/fewshot_settings.py."""
import json
import os
import sys
import types

from flax import traverse_util
import jax
import numpy as np
import pytest

from hica_jax import testing
from hica_jax.models import build_model

sys.path.insert(0, os.path.join(testing.REPO, "bench"))

import headline  # noqa: E402  pylint: disable=g-import-not-at-top
import paired_runs  # noqa: E402  pylint: disable=g-import-not-at-top
import stage1_curve  # noqa: E402  pylint: disable=g-import-not-at-top
import stage1_seeds  # noqa: E402  pylint: disable=g-import-not-at-top


def write_cell(folder, method, k, seed, bacc, extra=""):
  os.makedirs(folder / "cells", exist_ok=True)
  metrics = dict(accuracy=bacc, balanced_accuracy=bacc, macro_f1=bacc,
                 auc=min(1.0, bacc + 0.1))
  cell = dict(name=f"{method}_K{k}_s{seed}", params=dict(k=k, seed=seed),
              result=dict(metrics=metrics))
  with open(folder / "cells" / f"{method}_K{k}_s{seed}{extra}.json", "w") as f:
    json.dump(cell, f)


def test_paired_runs_known_differences(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  for seed, (hica, floor) in enumerate([(0.60, 0.50), (0.70, 0.55),
                                        (0.80, 0.52)]):
    write_cell(a, "hica", 4, seed, hica)
    write_cell(a, "pixel_probe", 4, seed, floor)
    write_cell(b, "pixel_probe", 4, seed, floor)
    # B's HiCA gains 0.03, 0.06, 0.09: paired mean 0.06. Seed 2 is missing
    # from B at K=16, so that pair is left out, not matched to another.
    write_cell(b, "hica", 4, seed, hica + 0.03 * (seed + 1))
  write_cell(a, "hica", 16, 0, 0.8)
  write_cell(a, "hica", 16, 1, 0.9)
  write_cell(b, "hica", 16, 1, 0.85)
  write_cell(b, "hica", 16, 2, 0.99)
  out = paired_runs.main([str(a), str(b), "--out", str(tmp_path / "out"),
                          "--label_a", "base", "--label_b", "variant"])
  rows = {(r["method"], r["k"]): r for r in out["rows"]}
  assert rows[("hica", 4)]["delta"]["mean"] == pytest.approx(0.06)
  assert rows[("hica", 4)]["delta"]["n"] == 3
  assert rows[("hica", 4)]["a"]["balanced_accuracy"] == pytest.approx(0.70)
  assert rows[("pixel_probe", 4)]["delta"]["mean"] == 0.0
  assert rows[("hica", 16)]["delta"]["n"] == 1
  assert rows[("hica", 16)]["delta"]["mean"] == pytest.approx(-0.05)
  with open(tmp_path / "out" / "paired.md") as f:
    text = f.read()
  assert "variant − base" in text and "+0.060" in text


def test_paired_runs_two_methods_known_differences(tmp_path):
  """--method_a/--method_b: A's no_stage1 against B's hica, seed by seed;
  other methods and K only one run holds are left out."""
  a, b = tmp_path / "study", tmp_path / "run"
  for seed, (off, on) in enumerate([(0.50, 0.60), (0.55, 0.60),
                                    (0.60, 0.75)]):
    write_cell(a, "no_stage1", 16, seed, off)
    write_cell(a, "hica", 16, seed, 0.99)     # not paired: A's hica
    write_cell(b, "hica", 16, seed, on)
  write_cell(b, "hica", 4, 0, 0.7)            # no no_stage1 at K=4
  out = paired_runs.main([str(a), str(b), "--out", str(tmp_path / "out"),
                          "--method_a", "no_stage1", "--method_b", "hica"])
  (row,) = out["rows"]
  assert (row["method"], row["k"], row["delta"]["n"]) == (
      "hica vs no_stage1", 16, 3)
  assert row["delta"]["mean"] == pytest.approx(0.10)
  assert row["a"]["balanced_accuracy"] == pytest.approx(0.55)
  with pytest.raises(SystemExit, match="go together"):
    paired_runs.compare(str(a), str(b), method_a="no_stage1")


def test_two_runs_cells_in_one_workdir_fail(tmp_path):
  write_cell(tmp_path, "hica", 4, 0, 0.6)
  write_cell(tmp_path, "hica", 4, 0, 0.7, extra="_revision2")
  with pytest.raises(SystemExit, match="two cells"):
    stage1_curve.read_cells(str(tmp_path))
  with pytest.raises(SystemExit, match="share no"):
    os.makedirs(tmp_path / "empty" / "cells")
    paired_runs.compare(str(tmp_path / "empty"), str(tmp_path / "empty"))


def test_readme_headline_table_is_the_committed_studies():
  """Every row of bench/headline.py's table over results/*_study appears in
  the README verbatim: the headline numbers come from the studies."""
  with open(os.path.join(testing.REPO, "README.md")) as f:
    readme = f.read()
  lines = [headline.HEADER]
  for study in ("kermany_study", "busi_study"):
    with open(os.path.join(testing.REPO, "results", study,
                           "report.json")) as f:
      lines += headline.rows(json.load(f))
  missing = [line for line in "\n".join(lines).splitlines()
             if line not in readme]
  assert not missing, ("README headline rows differ from "
                       "`python bench/headline.py results/kermany_study "
                       f"results/busi_study`: {missing}")


def test_curve_image_params_count_the_built_models_image_tower(tmp_path):
  """--axis image_params reads the tower's shape from the stage-1
  provenance record; its count equals the image params of the model the
  config builds, for two widths."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hica_jax import workdir  # pylint: disable=g-import-not-at-top
  from hica_jax.models import hica_model  # pylint: disable=g-import-not-at-top
  counts = []
  for width in (32, 64):
    config = testing.config("chestxray", "tiny")
    config.model.image.width = width
    folder = tmp_path / f"w{width}"
    os.makedirs(folder / "checkpoints" / "stage1")
    with open(folder / "checkpoints" / "stage1" / "provenance.json", "w") as f:
      json.dump({"inputs": workdir.stage_inputs(config, "stage1")}, f)
    got, shape = stage1_curve.image_tower_params(str(folder))
    model = hica_model.build_model(config.model, vocab_size=50)
    size, length = config.data.image_size, config.model.text.max_len
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
        jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))
    want = sum(int(np.prod(x.shape))
               for x in jax.tree.leaves(shapes["params"]["image"]))
    assert got == want and shape["width"] == width
    counts.append(got)
  assert counts[1] > counts[0]


def test_curve_pool_images_from_the_fraction_and_the_train_split(tmp_path):
  """--axis pool_images: stage1.pool_fraction of the stage-1 record times
  the report's seen train images, as stage 1 sampled them; a record
  without the field (written before it existed) is the whole pool."""
  report = {"dataset": {"splits": {"train": {"normal": 593,
                                             "pneumonia": 1642}},
                        "unseen": []}}
  def pool(inputs, unseen=()):
    folder = tmp_path / str(len(os.listdir(tmp_path)))
    os.makedirs(folder / "checkpoints" / "stage1")
    with open(folder / "checkpoints" / "stage1" / "provenance.json", "w") as f:
      json.dump({"inputs": inputs}, f)
    report["dataset"]["unseen"] = list(unseen)
    return stage1_curve.pool_images(str(folder), report)
  assert pool({"stage1.pool_fraction": 0.25}) == 559
  assert pool({"stage1.pool_fraction": 0.5}) == 1118
  assert pool({}) == 2235
  assert pool({"stage1.pool_fraction": 0.25}, unseen=("pneumonia",)) == 148
  with pytest.raises(SystemExit, match="needs the run's workdir"):
    stage1_curve.pool_images(str(tmp_path / "nowhere"), report)


def test_curve_keeps_only_the_shots_asked_for(tmp_path):
  # A study (K = 1, 4, 16, with its paired section) beside runs of a
  # smaller grid: --shots 4,16 drops its K=1 from the row and the pairs.
  summary = lambda x: {m: {"mean": x, "std": 0.0, "ci95": [x, x], "n": 5}
                       for m in ("balanced_accuracy", "auc")}
  report = {"config_name": "study", "stages": {"stage1": {
      "steps": 1200, "seconds": 10.0}},
            "few_shot": {k: {"hica": summary(v), "pixel_probe": summary(0.5)}
                         for k, v in (("1", 0.6), ("4", 0.7), ("16", 0.8))},
            "versus": {k: {"pixel_probe": {"balanced_accuracy": {
                "mean": d, "ci95": [d, d]}}} for k, d in (
                    ("1", 0.1), ("4", 0.2), ("16", 0.3))}}
  with open(tmp_path / "report.json", "w") as f:
    json.dump(report, f)
  every = stage1_curve.read_point(str(tmp_path))
  assert sorted(every["few_shot"]) == sorted(every["hica_minus"]) == [
      "1", "16", "4"]
  kept = stage1_curve.read_point(str(tmp_path), shots={4, 16})
  assert sorted(kept["few_shot"]) == sorted(kept["hica_minus"]) == ["16", "4"]
  assert kept["few_shot"]["4"]["hica"]["balanced_accuracy"]["mean"] == 0.7
  assert kept["hica_minus"]["16"]["pixel_probe"]["mean"] == 0.3
  assert "K=1 " not in stage1_curve.markdown([kept])


def test_stage1_seeds_known_spread(tmp_path):
  """Three runs whose HiCA means are 0.70, 0.74, 0.78 over two shared
  few-shot seeds: std 0.04, range 0.08, paired deltas 0.04 and 0.08; a
  seed held by one run only is left out."""
  runs = [tmp_path / f"r{i}" for i in range(3)]
  for i, run in enumerate(runs):
    for seed, base in enumerate((0.65, 0.75)):
      write_cell(run, "hica", 16, seed, base + 0.04 * i)
  write_cell(runs[0], "hica", 16, 2, 0.1)
  out = stage1_seeds.main([str(r) for r in runs] +
                          ["--out", str(tmp_path / "out")])
  (row,) = out["rows"]
  assert row["n_seeds"] == 2
  assert row["run_means"] == pytest.approx([0.70, 0.74, 0.78])
  assert row["std"] == pytest.approx(0.04)
  assert row["range"] == pytest.approx(0.08)
  assert [d["mean"] for d in row["minus_first"]] == pytest.approx([0.04, 0.08])
  with open(tmp_path / "out" / "seeds.md") as f:
    assert "seed 2 − seed 0" in f.read()
  # The floor sits 0.10 below run 0's HiCA in every run: per-run leads
  # 0.10, 0.14, 0.18.
  for run in runs:
    for seed, base in enumerate((0.55, 0.65)):
      write_cell(run, "pixel_probe", 16, seed, base)
  out = stage1_seeds.main([str(r) for r in runs] +
                          ["--out", str(tmp_path / "out")])
  (lead,) = out["hica_minus"]
  assert lead["baseline"] == "pixel_probe"
  assert lead["per_run"] == pytest.approx([0.10, 0.14, 0.18])
  assert lead["std"] == pytest.approx(0.04)
  with pytest.raises(SystemExit, match="at least two"):
    stage1_seeds.main([str(runs[0]), "--out", str(tmp_path / "o2")])


# Slow: two model inits, one jitted (about 15 s cold); the default set's
# cold time was 11 min 53 s in a slow hour on 712c0d0.
@pytest.mark.slow
def test_plus_override_adds_a_field_and_its_params_start_at_init():
  """fewshot_settings' "+a.b" variants: a model option the configs do not
  expose is added (never one they have), and the params it brings start
  at their initialisation while every other leaf keeps its value."""
  with pytest.raises(KeyError, match="already"):
    testing.apply_overrides(testing.config(), {"+model.image": {}})
  with pytest.raises(KeyError, match="no"):
    testing.apply_overrides(testing.config(), {"+nowhere.bias": True})
  cfg, _, params = testing.tiny_model()
  testing.apply_overrides(cfg, {"+model.image_proj": {"kind": "linear",
                                                      "bias": True}})
  assert cfg.model.image_proj.bias is True
  ctx = types.SimpleNamespace(config=cfg, model_config=cfg.model,
                              model=build_model(cfg.model, testing.VOCAB))
  trained = jax.tree.map(lambda x: x + 1.0, params)
  grown = traverse_util.flatten_dict(testing.with_added_params(ctx, trained))
  have = traverse_util.flatten_dict(trained)
  assert set(grown) - set(have) == {("params", "image_proj", "bias")}
  np.testing.assert_array_equal(grown["params", "image_proj", "bias"], 0.0)
  for key, value in have.items():  # Every other leaf as it was given.
    np.testing.assert_array_equal(grown[key], value, err_msg=str(key))
