"""The study end to end on tiny data: report sections, plots, resume."""
import glob
import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from hica_jax import context as context_lib
from hica_jax import evaluators
from hica_jax import losses
from hica_jax import predict
from hica_jax import report as report_lib
from hica_jax import stages
from hica_jax import study as study_lib
from hica_jax import testing
from hica_jax.evaluators import grid
from hica_jax.evaluators import hica
from hica_jax.training import supervised

PLOTS = ("few_shot", "ablations", "noise", "unseen", "sweep", "heatmaps")


def study_config():
  config = testing.config("chestxray", "tiny,study")
  # Two of the four ablations keep the test short (each zeroed loss weight
  # is one more compiled step); the others run the same code.
  config.study.ablations = ("no_stage1", "no_cross")
  return config


def _cells(workdir):
  return {os.path.basename(p): os.path.getmtime(p)
          for p in glob.glob(os.path.join(workdir, "cells", "*.json"))}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  report = stages.run(study_config(), workdir)
  return workdir, report


def test_report_sections(study_run):
  workdir, _ = study_run
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  report_lib.validate(report)
  assert report["config_name"] == "chestxray_study"
  # The eval stage ran first and computed its cells; the study computed the
  # rest of its grid and found those cached.
  assert report["evaluation"]["cached"] == 0
  assert report["study"]["cells"] == (report["study"]["computed"] +
                                      report["evaluation"]["computed"])
  assert report["study"]["cached"] == report["evaluation"]["cells"]
  fs = report["few_shot"]
  assert sorted(fs) == ["1", "2"]
  for k in fs:
    assert set(fs[k]) == set(evaluators.METHODS)
    assert fs[k]["zero_shot"]["n_seeds"] == 1
    assert fs[k]["supervised_ce"]["n_seeds"] == 2
  # zero_shot of the grid is the stage-1 prototype classifier that eval
  # reports: the seen task cut out of the all-category probabilities.
  for m in report_lib.REPORT_METRICS:
    assert fs["1"]["zero_shot"][m]["mean"] == pytest.approx(
        report["zero_shot"][m], abs=1e-6)

  ab = report["ablations"]["2"]
  assert list(ab) == ["full", "no_stage1", "no_cross"]
  assert ab["full"] == fs["2"]["hica"]   # the reference row is HiCA's cell

  un = report["unseen"]
  assert un["categories"] == ["pleural_effusion"]
  assert set(un["models"]) == {"zero_shot", "stage2"}
  hica = un["few_shot"]["2"]["hica"]
  assert hica["n_seeds"] == 2
  assert set(hica["recall"]) == set(un["seen"]) | {"pleural_effusion"}
  assert hica["unseen_accuracy"]["mean"] == pytest.approx(
      hica["recall"]["pleural_effusion"]["mean"])
  assert hica["seen_task_balanced_accuracy"]["mean"] == pytest.approx(
      fs["2"]["hica"]["balanced_accuracy"]["mean"])

  nz = report["noise"]
  assert nz["shots"] == 2 and sorted(nz["rates"]) == ["0.0", "0.5"]
  assert nz["rates"]["0.0"]["drop"]["balanced_accuracy"] == 0.0
  assert nz["rates"]["0.0"]["noisy_bank"] == ab["full"]
  noisy = nz["rates"]["0.5"]
  assert noisy["drop"]["balanced_accuracy"] == pytest.approx(
      ab["full"]["balanced_accuracy"]["mean"] -
      noisy["noisy_bank"]["balanced_accuracy"]["mean"])

  sw = report["sweep"]
  assert (sw["shots"], sw["seeds"]) == (2, 2)
  assert sw["reference"] == fs["2"]["hica"]
  assert list(sw["variants"]) == ["cross_weight=1.0,logit_scale=30",
                                  "init=text_stage1"]
  # Δ is paired: the mean of per-seed differences to HiCA's own cells.
  cells = {}
  for path in glob.glob(os.path.join(workdir, "cells", "*.json")):
    with open(path) as f:
      cell = json.load(f)
    if "metrics" in cell["result"]:
      cells[cell["name"]] = cell["result"]["metrics"]["balanced_accuracy"]
  for spec, res in sw["variants"].items():
    name = study_lib.parse_sweep_variant(
        spec, study_config().stage2.loss).name
    diffs = [cells[f"{name}_K2_s{s}"] - cells[f"hica_K2_s{s}"]
             for s in range(2)]
    assert res["delta"]["balanced_accuracy"]["mean"] == pytest.approx(
        np.mean(diffs))
    assert res["n_seeds"] == 2
  # Ablations and HiCA-versus-baseline are paired the same way.
  for v in ("no_stage1", "no_cross"):
    diffs = [cells[f"{v}_K2_s{s}"] - cells[f"hica_K2_s{s}"] for s in range(2)]
    assert ab[v]["delta"]["balanced_accuracy"]["mean"] == pytest.approx(
        np.mean(diffs))
  vs = report["versus"]
  assert sorted(vs) == ["1", "2"]
  assert list(vs["2"]) == list(study_lib.VERSUS)
  for b in study_lib.VERSUS:
    diffs = [cells[f"hica_K2_s{s}"] - cells[f"{b}_K2_s{s}"] for s in range(2)]
    assert vs["2"][b]["balanced_accuracy"]["mean"] == pytest.approx(
        np.mean(diffs))
    lo, hi = vs["2"][b]["balanced_accuracy"]["ci95"]
    assert lo <= np.mean(diffs) <= hi
  # The frozen features against the pixel floor, paired the same way.
  pf = report["probe_floor"]
  assert sorted(pf) == ["1", "2"]
  diffs = [cells[f"linear_probe_K2_s{s}"] - cells[f"pixel_probe_K2_s{s}"]
           for s in range(2)]
  assert pf["2"]["balanced_accuracy"]["mean"] == pytest.approx(
      np.mean(diffs))
  with open(os.path.join(workdir, "report.md")) as f:
    assert "Frozen stage-1 features against the pixel floor" in f.read()

  it = report["interpretability"]
  assert it["n_images"] > 0 and it["threshold"] == "roi_area"
  assert set(it["models"]) == {"stage1", "stage2", "random"}
  for scores in it["models"].values():
    assert 0.0 <= scores["pointing_game"] <= 1.0
    assert 0.0 <= scores["iou"] <= 1.0
    assert sum(c["n"] for c in scores["per_category"].values()) == \
        it["n_images"]

  ef = report["efficiency"]
  p = ef["params"]
  assert p["total"] == p["image"] + p["text"] + p["projections_and_scale"]
  assert p["image"] > 0 and p["text"] > 0
  ts = ef["train_step"]
  assert ts["images_per_second"] == pytest.approx(
      ts["batch_size"] / ts["median_seconds"])
  assert ef["eval"]["ms_per_image"] > 0
  assert ef["cell_seconds"]["hica"]["n"] == 4


def test_report_html_embeds_every_plot(study_run):
  workdir, _ = study_run
  with open(os.path.join(workdir, "report.json")) as f:
    plots = json.load(f)["plots"]
  assert sorted(plots) == sorted(PLOTS)
  with open(os.path.join(workdir, "report.html")) as f:
    page = f.read()
  sources = re.findall(r'<img src="([^"]+)"', page)
  assert len(sources) == len(PLOTS)
  assert all(s.startswith("data:image/png;base64,") for s in sources)
  assert "<table>" in page and "plots/" not in page
  for name in PLOTS:
    assert os.path.getsize(os.path.join(workdir, plots[name])) > 1000


def test_second_run_reuses_cells_and_resumes_a_missing_one(study_run):
  workdir, first = study_run
  before = _cells(workdir)
  missing = next(n for n in before if n.startswith("linear_probe_K1_s0-"))
  os.remove(os.path.join(workdir, "cells", missing))
  report = stages.run(study_config(), workdir)
  after = _cells(workdir)
  assert set(after) == set(before)
  # The eval stage recomputes the missing cell; the study then finds it.
  assert (report["evaluation"]["computed"], report["study"]["computed"]) == (
      1, 0)
  assert [n for n in before if after[n] != before[n]] == [missing]
  # Cached cells give the same numbers; the recomputed probe too (it is
  # deterministic given the support set).
  assert report["few_shot"] == first["few_shot"]


def test_eval_stage_reports_the_study_cells_numbers(study_run):
  """One few-shot path: the eval stage on the study's workdir computes no
  cell and reports the study's numbers for the same (method, K)."""
  workdir, _ = study_run
  with open(os.path.join(workdir, "report.json")) as f:
    study_fs = json.load(f)["few_shot"]
  config = study_config()
  config.stages = ("eval",)
  report = stages.run(config, workdir)
  assert report["evaluation"]["computed"] == 0
  for k, methods in report["few_shot"].items():
    assert set(methods) == set(config.eval.methods)
    for m, res in methods.items():
      for metric in report_lib.REPORT_METRICS:
        assert res[metric]["mean"] == pytest.approx(
            study_fs[k][m][metric]["mean"], abs=1e-12), (k, m, metric)


def test_cell_key_follows_its_dependencies():
  config = study_config()
  cell = grid.Cell("hica_K2_s0", None, grid.TRAIN_DEPS, {"k": 2})
  probe = grid.Cell("linear_probe_K2_s0", None, grid.BASE_DEPS, {"k": 2})
  pixels = grid.Cell("pixel_probe_K2_s0", None, grid.PIXEL_DEPS, {"k": 2})
  key, probe_key = cell.key(config), probe.key(config)
  pixel_key = pixels.key(config)
  config.eval.fewshot_steps = 7
  assert cell.key(config) != key
  assert probe.key(config) == probe_key   # the probe trains nothing
  config.model.embed_dim = 16
  assert probe.key(config) != probe_key
  assert pixels.key(config) == pixel_key   # the pixel floor has no model
  config.eval.pixel_size = 4
  assert pixels.key(config) != pixel_key
  # A method whose computation changed (revision > 1) keys on its revision,
  # so a workdir's cells of the earlier definition are not read back.
  revised = grid.method_cell(None, "linear_probe", 2, 0)
  assert revised.params["revision"] > 1
  earlier = grid.Cell(revised.name, None, revised.deps,
                      {"name": revised.name, "k": 2, "seed": 0})
  assert revised.key(config) != earlier.key(config)
  assert "revision" not in grid.method_cell(None, "hica", 2, 0).params
  # eval.hica_freeze is an input of HiCA's runs, not of supervised CE's.
  hica_cell = grid.method_cell(None, "hica", 2, 0)
  ablation = grid.method_cell(None, "global_only", 2, 0)
  sup = grid.method_cell(None, "supervised_ce", 2, 0)
  keys = [c.key(config) for c in (hica_cell, ablation, sup)]
  config.eval.hica_freeze = (r"^params/image/",)
  assert hica_cell.key(config) != keys[0]
  assert ablation.key(config) != keys[1]
  assert sup.key(config) == keys[2]
  held = [c.key(config) for c in (hica_cell, sup)]
  # 'none' is neutral: a config from before the field has the same keys.
  older = ml_collections.ConfigDict(config.to_dict())
  del older.eval["hica_feature_norm"]
  assert hica_cell.key(older) == held[0]
  config.eval.hica_feature_norm = "center"
  assert hica_cell.key(config) != held[0]
  assert sup.key(config) == held[1]
  centred = hica_cell.key(config)
  config.eval.hica_proj_init = "pool_pca"
  assert hica_cell.key(config) != centred
  assert sup.key(config) == held[1]
  # The held logit scale: 0.0 (stage 1's, trained) is neutral.
  older = ml_collections.ConfigDict(config.to_dict())
  del older.eval["hica_logit_scale"]
  assert hica_cell.key(older) == hica_cell.key(config)
  pca = hica_cell.key(config)
  config.eval.hica_logit_scale = 3.0
  assert hica_cell.key(config) != pca
  assert sup.key(config) == held[1]
  # Test-time crops change the frozen-feature readouts' cells only; ()
  # is neutral.
  readouts = [grid.method_cell(None, m, 2, 0) for m in
              ("linear_probe", "zs_linear_probe", "tip_adapter")]
  whole = (hica_cell, sup, pixels, grid.method_cell(None, "zero_shot", 2, 0))
  before = [c.key(config) for c in readouts + list(whole)]
  older = ml_collections.ConfigDict(config.to_dict())
  del older.eval["probe_crops"]
  assert [c.key(older) for c in readouts + list(whole)] == before
  config.eval.probe_crops = (0.8,)
  assert all(c.key(config) != b for c, b in zip(readouts, before))
  assert [c.key(config) for c in whole] == before[len(readouts):]


def test_variant_loss_zeroes_only_its_weights():
  loss = testing.config("chestxray", "").stage2.loss
  weights = losses.loss_weights(hica.variant_loss(loss, "global_only"))
  assert (weights["global"], weights["local"], weights["cross"]) == (
      1.0, 0.0, 0.0)
  assert losses.loss_weights(hica.variant_loss(loss, "hica")) == \
      losses.loss_weights(loss)


def test_supervised_ce_fits_its_support_set(study_run):
  workdir, _ = study_run
  config = testing.config("chestxray")
  config.stage2.optim.update(dict(lr=5e-3, warmup_steps=2))
  ctx = context_lib.build_context(config, workdir)
  init = context_lib.load_final_params(ctx, "stage1")
  support = ctx.support_indices(2, 0)
  from hica_jax.evaluators import env as env_lib  # pylint: disable=g-import-not-at-top
  sup = env_lib.EvalEnv(ctx, init).support(2, 0)
  result = supervised.train(ctx, init, support, 100, 0)
  probs = predict.batched_apply(supervised.probs_fn(ctx.model),
                                result.state.params, [sup["image"]], 64,
                                ctx.mesh)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  # The head and the tower learn the six support images.
  assert (probs.argmax(-1) == sup["label"]).mean() == 1.0


def test_hica_freeze_and_logit_scale_hold_in_runs_from_stage1_only(
    study_run):
  """eval.hica_freeze in a HiCA run is stage2.freeze with the same regexes
  (the same params to the last bit), and eval.hica_logit_scale=s keeps the
  scale at s (its param log s, to the bit) while image_proj trains; at
  0.0 the run trains stage 1's scale; a run from the random tower trains
  the tower and its own scale. One set of runs serves both options."""
  workdir, _ = study_run
  from hica_jax.evaluators import env as env_lib  # pylint: disable=g-import-not-at-top

  def env_with(freeze_field, scale=2.5):
    config = testing.config("chestxray")
    base, leaf = freeze_field.rsplit(".", 1)
    config[base][leaf] = tuple(config[base][leaf]) + (r"^params/image/",)
    config.eval.hica_logit_scale = scale
    ctx = context_lib.build_context(config, workdir)
    return env_lib.EvalEnv(ctx, context_lib.load_final_params(ctx, "stage1"))

  def scale_of(params):
    return np.asarray(params["params"]["logit_scale"])

  jax_tree_equal = lambda a, b: all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b)))
  env = env_with("eval.hica_freeze")
  held = hica.train_variant(env, "hica", 2, 0)
  same = hica.train_variant(env_with("stage2.freeze"), "hica", 2, 0)
  assert jax_tree_equal(held, same)
  assert jax_tree_equal(held["params"]["image"],
                        env.stage1["params"]["image"])
  assert not jax_tree_equal(held["params"]["image_proj"],
                            env.stage1["params"]["image_proj"])
  assert scale_of(held) == np.float32(np.log(np.float32(2.5)))
  learnt = hica.train_variant(env_with("eval.hica_freeze", 0.0), "hica", 2,
                              0)
  assert scale_of(learnt) != scale_of(env.stage1)
  scratch = hica.train_variant(env, "no_stage1", 2, 0)
  assert not jax_tree_equal(scratch["params"]["image"],
                            env.random_init["params"]["image"])
  assert scale_of(scratch) != scale_of(env.random_init)
  assert scale_of(scratch) != scale_of(held)


def test_probe_crops_reach_the_frozen_feature_readouts_only(study_run):
  """eval.probe_crops: the probes' test, support and pool features are
  averaged over the crops; prototype classifiers and HiCA's pool
  statistics see whole images."""
  workdir, _ = study_run
  from hica_jax.evaluators import env as env_lib  # pylint: disable=g-import-not-at-top
  config = testing.config("chestxray")
  plain_ctx = context_lib.build_context(config, workdir)
  stage1_params = context_lib.load_final_params(plain_ctx, "stage1")
  plain = env_lib.EvalEnv(plain_ctx, stage1_params)
  config.eval.probe_crops = (0.5,)
  env = env_lib.EvalEnv(context_lib.build_context(config, workdir),
                        stage1_params)
  crops, _ = predict.embed_images(env.model, env.stage1, env.seen_images,
                                  env.mesh, 64, crop_views=(0.5,))
  np.testing.assert_allclose(env.frozen["emb"], crops, atol=1e-5)
  assert np.abs(env.frozen["feats"] - plain.frozen["feats"]).max() > 1e-3
  assert np.abs(env.pool_feature_stats[0] -
                plain.pool_feature_stats[0]).max() > 1e-4
  for a, b in zip(env.full_image_pool_feature_stats,
                  plain.pool_feature_stats):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(env.prototype_probs(stage1_params,
                                                 env.seen_images),
                             plain.prototype_probs(stage1_params,
                                                   plain.seen_images),
                             atol=1e-6)


def test_hica_feature_norm_standardises_the_held_tower_of_stage1_runs(
    study_run):
  """eval.hica_feature_norm='standardize' with the tower held: a HiCA run
  keeps stage 1's tower with ln_post folded so that the train pool's pooled
  features have mean 0 and std 1; a no_stage1 run starts from the random
  tower as it is."""
  workdir, _ = study_run
  from hica_jax.evaluators import env as env_lib  # pylint: disable=g-import-not-at-top
  config = testing.config("chestxray")
  config.eval.hica_freeze = (r"^params/image/",)
  config.eval.hica_feature_norm = "standardize"
  ctx = context_lib.build_context(config, workdir)
  env = env_lib.EvalEnv(ctx, context_lib.load_final_params(ctx, "stage1"))
  mean, std = env.full_image_pool_feature_stats
  assert np.abs(mean).max() > 1e-2   # there is something to remove
  params = hica.train_variant(env, "hica", 2, 0)
  test_feats = env.frozen_embeddings(env.stage1, env.seen_images)["feats"]
  normed = env.frozen_embeddings(params, env.seen_images)["feats"]
  np.testing.assert_allclose(normed, (test_feats - mean) / std, atol=1e-3,
                             rtol=1e-3)
  # Standardised by the pool, the test images' features are near it.
  assert np.abs(normed.mean(0)).mean() < 0.5
  assert np.abs(normed.std(0).mean() - 1.0) < 0.5
  # no_stage1 is the same run, to the bit, with the field at 'none'.
  scratch = hica.train_variant(env, "no_stage1", 2, 0)
  config.eval.hica_feature_norm = "none"
  plain = env_lib.EvalEnv(context_lib.build_context(config, workdir),
                          env.stage1)
  unnormed = hica.train_variant(plain, "no_stage1", 2, 0)
  for a, b in zip(jax.tree.leaves(scratch), jax.tree.leaves(unnormed)):
    np.testing.assert_array_equal(a, b)


def test_sweep_variant_parsing_and_typos():
  loss = testing.config("busi", "").stage2.loss
  v = study_lib.parse_sweep_variant(
      "cross_weight=2, local_mode=attention,label_aware=false,"
      "logit_scale=50,init=image_stage1", loss)
  assert v.loss == {"cross_weight": 2.0, "local_mode": "attention",
                    "label_aware": False}
  assert isinstance(v.loss["cross_weight"], float)
  assert (v.logit_scale, v.init) == (50.0, "image_stage1")
  assert v.name == ("sweep[cross_weight=2,_local_mode=attention,"
                    "label_aware=false,logit_scale=50,init=image_stage1]")
  for bad, needle in (("cross_wieght=1.0", "cross_wieght"),
                      ("init=text", "init must be"),
                      ("logit_scale=0", "logit_scale"),
                      ("cross_weight", "key=value"),
                      ("label_aware=maybe", "label_aware"),
                      ("cross_weight=high", "cross_weight"), ("", "no overr")):
    with pytest.raises(ValueError, match=needle):
      study_lib.parse_sweep_variant(bad, loss)
  # A typo in the sweep stops the run before any data or training.
  config = study_config()
  config.study.sweep = ("cross_wieght=1.0",)
  with pytest.raises(ValueError, match="config.study.sweep entry"):
    stages.run(config, "/nonexistent/never-created")


def test_mix_towers_takes_one_tower_from_the_other_tree():
  stage1 = {"params": {"image": 1, "image_proj": 2, "text": 3,
                       "text_proj": 4, "logit_scale": 5}}
  rand = {"params": {"image": -1, "image_proj": -2, "text": -3,
                     "text_proj": -4, "logit_scale": -5}}
  assert study_lib._mix_towers(stage1, rand, ("image", "image_proj")) == {
      "params": {"image": -1, "image_proj": -2, "text": 3, "text_proj": 4,
                 "logit_scale": 5}}
  scaled = study_lib._set_logit_scale(stage1, 50.0)
  assert float(np.exp(scaled["params"]["logit_scale"])) == pytest.approx(50)
